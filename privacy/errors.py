"""Exceptions raised by the privacy package."""

from __future__ import annotations


class PrivacyError(Exception):
    """Base class of every privacy error."""


class PrivacyBudgetExhausted(PrivacyError):
    """The next release would spend more privacy budget than the run allows."""
