"""Registry of defenses: one file plus one line in ``_DEFENSES`` each."""

from __future__ import annotations

from robustness._registry import Registry
from robustness.defenses.base import Defense
from robustness.defenses.bulyan import Bulyan
from robustness.defenses.centered_clip import CenteredClip
from robustness.defenses.krum import Krum
from robustness.defenses.median import CoordinateMedian
from robustness.defenses.multi_krum import MultiKrum
from robustness.defenses.none import NoDefense
from robustness.defenses.norm_bound import NormBound
from robustness.defenses.trimmed_mean import TrimmedMean

_DEFENSES: Registry[Defense] = Registry(
    "defense",
    "robustness.defense",
    {
        "none": NoDefense,
        "norm-bound": NormBound,
        "median": CoordinateMedian,
        "trimmed-mean": TrimmedMean,
        "krum": Krum,
        "multi-krum": MultiKrum,
        "bulyan": Bulyan,
        "centered-clip": CenteredClip,
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
