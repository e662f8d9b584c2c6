"""PEFT-aware aggregation rules: ``[peft] rule`` names one of these."""

from secure_fl.peft_agg.base import AggregationRule
from secure_fl.peft_agg.registry import available, create_rule, register_rule

__all__ = ["AggregationRule", "available", "create_rule", "register_rule"]
