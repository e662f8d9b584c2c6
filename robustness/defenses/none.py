"""``none``: no defense; every row is kept with its weight (plain weighted averaging downstream)."""

from __future__ import annotations

import numpy as np

from robustness.defenses.base import Defense, DefenseResult


class NoDefense(Defense):
    """Keep every input row unchanged."""

    name = "none"

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        """Return the inputs as they are."""
        return DefenseResult(updates=updates, weights=weights)
