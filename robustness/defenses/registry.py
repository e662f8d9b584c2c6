"""Registry of defenses: one file plus one line in ``_DEFENSES`` each."""

from __future__ import annotations

from robustness._registry import Registry
from robustness.defenses.base import Defense
from robustness.defenses.none import NoDefense

_DEFENSES: Registry[Defense] = Registry(
    "defense",
    "robustness.defense",
    {
        "none": NoDefense,
    },
)


#: ``register_defense(name, cls, force=False)``: add a plug-in class (its ``name`` attribute must match).
register_defense = _DEFENSES.register
#: ``create_defense(name, **kwargs)``: instantiate the plug-in registered under ``name``.
create_defense = _DEFENSES.create
#: ``available()``: the registered names, sorted.
available = _DEFENSES.names
#: ``plugin_class(name)``: the class registered under ``name`` (its settings are its keyword arguments).
plugin_class = _DEFENSES.get
