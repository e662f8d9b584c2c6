"""Exceptions raised by the robustness package."""

from __future__ import annotations


class RobustnessError(Exception):
    """Base class of every robustness error."""


class InsufficientHonestClients(RobustnessError, ValueError):
    """A defense's precondition on the number of inputs versus attackers does not hold."""
