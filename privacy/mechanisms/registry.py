"""Registry of privacy mechanisms: one file plus one line in ``_MECHANISMS`` each."""

from __future__ import annotations

from typing import Any

from privacy._registry import Registry
from privacy.mechanisms.base import PrivacyMechanism
from privacy.mechanisms.none import NoPrivacy

_MECHANISMS: Registry[PrivacyMechanism] = Registry(
    "privacy mode",
    "privacy.mode",
    {
        "none": NoPrivacy,
    },
)


def register_privacy_mechanism(name: str, cls: type[PrivacyMechanism], *, force: bool = False) -> None:
    """Register a mechanism class under ``name`` (its ``name`` attribute must match)."""
    _MECHANISMS.register(name, cls, force=force)


def create_privacy_mechanism(name: str, **kwargs: Any) -> PrivacyMechanism:
    """Instantiate the mechanism registered under ``name``."""
    return _MECHANISMS.create(name, **kwargs)


def available() -> tuple[str, ...]:
    """Names of the registered mechanisms, sorted."""
    return _MECHANISMS.names()
