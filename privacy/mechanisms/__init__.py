"""Differential-privacy mechanisms: ``[privacy] mode`` names one of these."""

from privacy.mechanisms.base import MechanismContext, PrivacyMechanism
from privacy.mechanisms.registry import available, create_privacy_mechanism, register_privacy_mechanism

__all__ = ["MechanismContext", "PrivacyMechanism", "available", "create_privacy_mechanism", "register_privacy_mechanism"]
