"""Registry of simulated attacks: one file plus one line in ``_ATTACKS`` each."""

from __future__ import annotations

from typing import Any

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


def register_attack(name: str, cls: type[Attack], *, force: bool = False) -> None:
    """Register an attack class under ``name`` (its ``name`` attribute must match)."""
    _ATTACKS.register(name, cls, force=force)


def create_attack(name: str, **kwargs: Any) -> Attack:
    """Instantiate the attack registered under ``name``."""
    return _ATTACKS.create(name, **kwargs)


def available() -> tuple[str, ...]:
    """Names of the registered attacks, sorted."""
    return _ATTACKS.names()
