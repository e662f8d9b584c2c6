"""``trimmed-mean``: the coordinate-wise trimmed mean (Yin et al. 2018)."""

from __future__ import annotations

import math

import numpy as np

from robustness.defenses import _rules
from robustness.defenses._common import one_row, setting_float
from robustness.defenses.base import Defense, DefenseResult


class TrimmedMean(Defense):
    """Coordinate-wise mean after dropping the ``b = floor(trim_fraction n)`` largest and smallest values.

    Unweighted by definition; one row is returned with the sum of the input weights. Tolerates up
    to ``b`` Byzantine rows per coordinate (so choose ``trim_fraction >= f / n``). Its precondition
    ``2b < n`` holds for every n because ``trim_fraction < 0.5``: `min_rows` is 1.

    Parameters
    ----------
    trim_fraction:
        Fraction of the rows dropped on each side, in [0, 0.5).
    """

    name = "trimmed-mean"
    paper = "https://proceedings.mlr.press/v80/yin18a.html"

    def __init__(self, *, trim_fraction: float = 0.2) -> None:
        self.trim_fraction = setting_float("trim_fraction", trim_fraction, low=0.0, low_open=False, high=0.5)

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        """Return the trimmed-mean row."""
        row = _rules.trimmed_mean(updates, self.trim_fraction)
        return one_row(row, weights, trimmed_per_side=float(math.floor(self.trim_fraction * len(updates))))
