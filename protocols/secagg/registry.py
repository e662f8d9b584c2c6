"""Registry of secure-aggregation protocols: ``[secure] mode`` names one of these.

Adding a protocol is one file plus one line in ``_PROTOCOLS`` (or one call to
`register_secure_aggregation` from user code).
"""

from __future__ import annotations

from protocols._registry import Registry
from protocols.secagg.base import SecureAggregation
from protocols.secagg.he import BFVAggregation, CKKSAggregation
from protocols.secagg.plain import PlainAggregation
from protocols.secagg.secaggplus import SecAggPlus

_PROTOCOLS: Registry[SecureAggregation] = Registry(
    "secure-aggregation mode",
    "secure.mode",
    {
        "plain": PlainAggregation,
        "secagg+": SecAggPlus,
        "bfv": BFVAggregation,
        "ckks": CKKSAggregation,
    },
)


#: ``register_secure_aggregation(name, cls, force=False)``: add a plug-in class (its ``name`` attribute must match).
register_secure_aggregation = _PROTOCOLS.register
#: ``create_secure_aggregation(name, **kwargs)``: instantiate the plug-in registered under ``name``.
create_secure_aggregation = _PROTOCOLS.create
#: ``available()``: the registered names, sorted.
available = _PROTOCOLS.names
#: ``plugin_class(name)``: the class registered under ``name`` (its settings are its keyword arguments).
plugin_class = _PROTOCOLS.get
