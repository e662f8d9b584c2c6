"""Registry of secure-aggregation protocols: ``[secure] mode`` names one of these.

Adding a protocol is one file plus one line in ``_PROTOCOLS`` (or one call to
:func:`register_secure_aggregation` from user code).
"""

from __future__ import annotations

from typing import Any

from protocols._registry import Registry
from protocols.secagg.base import SecureAggregation
from protocols.secagg.plain import PlainAggregation

_PROTOCOLS: Registry[SecureAggregation] = Registry(
    "secure-aggregation mode",
    "secure.mode",
    {
        "plain": PlainAggregation,
    },
)


def register_secure_aggregation(name: str, cls: type[SecureAggregation], *, force: bool = False) -> None:
    """Register a protocol class under ``name`` (its ``name`` attribute must match)."""
    _PROTOCOLS.register(name, cls, force=force)


def create_secure_aggregation(name: str, **kwargs: Any) -> SecureAggregation:
    """Instantiate the protocol registered under ``name``."""
    return _PROTOCOLS.create(name, **kwargs)


def available() -> tuple[str, ...]:
    """Names of the registered protocols, sorted."""
    return _PROTOCOLS.names()
