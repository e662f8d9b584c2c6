"""Simulated attacker behaviours for evaluation: ``[attack] kind`` names one of these."""

from robustness.attacks.base import Attack, AttackContext
from robustness.attacks.registry import available, create_attack, register_attack

__all__ = ["Attack", "AttackContext", "available", "create_attack", "register_attack"]
