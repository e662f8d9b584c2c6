"""Byzantine-robust aggregation: ``[robustness] defense`` names one of these."""

from robustness.defenses.base import Defense, DefenseResult
from robustness.defenses.registry import available, create_defense, register_defense

__all__ = ["Defense", "DefenseResult", "available", "create_defense", "register_defense"]
