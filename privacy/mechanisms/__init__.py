"""Differential-privacy mechanisms: ``[privacy] mode`` names one of these."""

from privacy.mechanisms.base import PrivacyMechanism
from privacy.mechanisms.registry import available, create_privacy_mechanism, register_privacy_mechanism

__all__ = ["PrivacyMechanism", "available", "create_privacy_mechanism", "register_privacy_mechanism"]
