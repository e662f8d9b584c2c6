"""Registry of defenses: one file plus one line in ``_DEFENSES`` each."""

from __future__ import annotations

from typing import Any

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


def register_defense(name: str, cls: type[Defense], *, force: bool = False) -> None:
    """Register a defense class under ``name`` (its ``name`` attribute must match)."""
    _DEFENSES.register(name, cls, force=force)


def create_defense(name: str, **kwargs: Any) -> Defense:
    """Instantiate the defense registered under ``name``."""
    return _DEFENSES.create(name, **kwargs)


def available() -> tuple[str, ...]:
    """Names of the registered defenses, sorted."""
    return _DEFENSES.names()
