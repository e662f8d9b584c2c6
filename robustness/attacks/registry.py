"""Registry of simulated attacks: one file plus one line in ``_ATTACKS`` each."""

from __future__ import annotations

from robustness._registry import Registry
from robustness.attacks.alie import ALittleIsEnough
from robustness.attacks.backdoor import Backdoor
from robustness.attacks.base import Attack
from robustness.attacks.gaussian import GaussianNoise
from robustness.attacks.ipm import InnerProductManipulation
from robustness.attacks.label_flip import LabelFlip
from robustness.attacks.min_max import MinMax
from robustness.attacks.min_sum import MinSum
from robustness.attacks.none import NoAttack
from robustness.attacks.scaling import Scaling
from robustness.attacks.sign_flip import SignFlip

_ATTACKS: Registry[Attack] = Registry(
    "attack",
    "attack.kind",
    {
        "none": NoAttack,
        "sign-flip": SignFlip,
        "gaussian": GaussianNoise,
        "scaling": Scaling,
        "alie": ALittleIsEnough,
        "min-max": MinMax,
        "min-sum": MinSum,
        "ipm": InnerProductManipulation,
        "label-flip": LabelFlip,
        "backdoor": Backdoor,
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
