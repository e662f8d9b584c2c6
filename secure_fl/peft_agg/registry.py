"""Registry of PEFT aggregation rules: one file plus one line in ``_RULES`` each."""

from __future__ import annotations

from typing import Any

from protocols._registry import Registry
from secure_fl.peft_agg.base import AggregationRule
from secure_fl.peft_agg.fedit import FedIT

_RULES: Registry[AggregationRule] = Registry(
    "PEFT aggregation rule",
    "peft.rule",
    {
        "fedit": FedIT,
    },
)


def register_rule(name: str, cls: type[AggregationRule], *, force: bool = False) -> None:
    """Register a rule class under ``name`` (its ``name`` attribute must match)."""
    _RULES.register(name, cls, force=force)


def create_rule(name: str, **kwargs: Any) -> AggregationRule:
    """Instantiate the rule registered under ``name``."""
    return _RULES.create(name, **kwargs)


def available() -> tuple[str, ...]:
    """Names of the registered rules, sorted."""
    return _RULES.names()
