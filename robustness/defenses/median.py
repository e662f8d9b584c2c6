"""``median``: the coordinate-wise median (Yin et al. 2018)."""

from __future__ import annotations

import numpy as np

from robustness.defenses import _rules
from robustness.defenses._common import one_row
from robustness.defenses.base import Defense, DefenseResult


class CoordinateMedian(Defense):
    """Coordinate-wise median of the rows (mean of the two middle values for an even count).

    Unweighted by definition; one row is returned with the sum of the input weights. Each
    coordinate stays within the range of the honest values while fewer than half the rows are
    Byzantine.
    """

    name = "median"
    paper = "https://proceedings.mlr.press/v80/yin18a.html"

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        """Return the median row."""
        return one_row(_rules.coordinate_median(updates), weights)
