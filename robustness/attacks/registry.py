"""Registry of simulated attacks: one file plus one line in ``_ATTACKS`` each."""

from __future__ import annotations

from robustness._registry import Registry
from robustness.attacks.base import Attack
from robustness.attacks.none import NoAttack

_ATTACKS: Registry[Attack] = Registry(
    "attack",
    "attack.kind",
    {
        "none": NoAttack,
    },
)


#: ``register_attack(name, cls, force=False)``: add a plug-in class (its ``name`` attribute must match).
register_attack = _ATTACKS.register
#: ``create_attack(name, **kwargs)``: instantiate the plug-in registered under ``name``.
create_attack = _ATTACKS.create
#: ``available()``: the registered names, sorted.
available = _ATTACKS.names
#: ``plugin_class(name)``: the class registered under ``name`` (its settings are its keyword arguments).
plugin_class = _ATTACKS.get
