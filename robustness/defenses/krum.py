"""``krum``: keep the one row closest to its ``n - f - 2`` nearest neighbours (Blanchard et al. 2017)."""

from __future__ import annotations

import numpy as np

from robustness.defenses import _rules
from robustness.defenses._common import one_row, setting_int
from robustness.defenses.base import Defense, DefenseResult


class Krum(Defense):
    """Krum: the row with the lowest sum of squared distances to its ``n - f - 2`` nearest rows.

    Unweighted by definition (the weights do not change which row is picked); the row is returned
    with the sum of the input weights. Needs ``n >= 2f + 3`` rows, refused otherwise.

    Parameters
    ----------
    f:
        Number of Byzantine rows tolerated (integer >= 0).
    """

    name = "krum"
    paper = "https://papers.nips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html"

    def __init__(self, *, f: int = 1) -> None:
        self.f = setting_int("f", f, 0)

    def min_rows(self) -> int:
        """``2f + 3``."""
        return 2 * self.f + 3

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        """Return the Krum row; every other row is reported excluded."""
        row, best = _rules.krum(updates, self.f)
        excluded = tuple(i for i in range(len(updates)) if i != best)
        return one_row(row, weights, excluded, krum_selected=float(best))
