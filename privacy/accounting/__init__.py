"""Privacy accountants: compose Gaussian-mechanism releases, report (epsilon, delta)."""

from privacy.accounting.base import Accountant, GaussianEvent
from privacy.accounting.registry import available, create_accountant, register_accountant

__all__ = ["Accountant", "GaussianEvent", "available", "create_accountant", "register_accountant"]
