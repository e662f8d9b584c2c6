"""Privacy accountants: compose Gaussian-mechanism releases, report (epsilon, delta)."""

from privacy.accounting.base import Accountant, GaussianEvent, PrivacySpent
from privacy.accounting.registry import (
    available,
    create_accountant,
    register_accountant,
)

__all__ = ["Accountant", "GaussianEvent", "PrivacySpent", "available", "create_accountant", "register_accountant"]
