"""``bulyan``: repeated Krum, then a coordinate-wise trimmed mean around the median (El Mhamdi et al. 2018)."""

from __future__ import annotations

import numpy as np

from robustness.defenses import _rules
from robustness.defenses._common import one_row, setting_int
from robustness.defenses.base import Defense, DefenseResult


class Bulyan(Defense):
    """Bulyan: ``theta = n - 2f`` rows by repeated Krum, then per coordinate the mean of the
    ``beta = theta - 2f`` selected values closest to their median.

    Unweighted by definition; one row is returned with the sum of the input weights and the rows
    not among the theta are reported excluded. Needs ``n >= 4f + 3``.

    Parameters
    ----------
    f:
        Number of Byzantine rows tolerated (integer >= 0).
    """

    name = "bulyan"
    paper = "https://proceedings.mlr.press/v80/mhamdi18a.html"

    def __init__(self, *, f: int = 1) -> None:
        self.f = setting_int("f", f, 0)

    def min_rows(self) -> int:
        """``4f + 3``."""
        return 4 * self.f + 3

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        """Return the Bulyan aggregate."""
        row, chosen = _rules.bulyan(updates, self.f)
        excluded = tuple(sorted(set(range(len(updates))) - set(chosen.tolist())))
        return one_row(row, weights, excluded, bulyan_selected=float(len(chosen)))
