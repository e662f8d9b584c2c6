"""Registry of privacy mechanisms: one file plus one line in ``_MECHANISMS`` each."""

from __future__ import annotations

from privacy._registry import Registry
from privacy.mechanisms.base import PrivacyMechanism
from privacy.mechanisms.central import CentralDP
from privacy.mechanisms.distributed import DistributedDP
from privacy.mechanisms.none import NoPrivacy
from privacy.mechanisms.sample_level import SampleLevelOnly

_MECHANISMS: Registry[PrivacyMechanism] = Registry(
    "privacy mode",
    "privacy.mode",
    {
        "none": NoPrivacy,
        "central": CentralDP,
        "distributed": DistributedDP,
        "dp-sgd": SampleLevelOnly,
    },
)


#: ``register_privacy_mechanism(name, cls, force=False)``: add a plug-in class (its ``name`` attribute must match).
register_privacy_mechanism = _MECHANISMS.register
#: ``create_privacy_mechanism(name, **kwargs)``: instantiate the plug-in registered under ``name``.
create_privacy_mechanism = _MECHANISMS.create
#: ``available()``: the registered names, sorted.
available = _MECHANISMS.names
#: ``plugin_class(name)``: the class registered under ``name`` (its settings are its keyword arguments).
plugin_class = _MECHANISMS.get
