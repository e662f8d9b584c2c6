"""Privacy accountants: compose Gaussian and distributed discrete Gaussian releases, report (epsilon, delta)."""

from privacy.accounting.base import Accountant, DiscreteGaussianEvent, GaussianEvent, PrivacyEvent, PrivacySpent
from privacy.accounting.registry import (
    available,
    create_accountant,
    register_accountant,
)

__all__ = ["Accountant", "DiscreteGaussianEvent", "GaussianEvent", "PrivacyEvent", "PrivacySpent", "available", "create_accountant", "register_accountant"]
