"""``multi-krum``: keep the ``m`` rows with the lowest Krum scores (Blanchard et al. 2017)."""

from __future__ import annotations

import numpy as np

from robustness.defenses import _rules
from robustness.defenses._common import setting_int
from robustness.defenses.base import Defense, DefenseResult
from robustness.errors import InsufficientHonestClients


class MultiKrum(Defense):
    """Multi-Krum: the ``m`` rows with the lowest Krum scores, scored once over all rows.

    No re-scoring after each pick (as in the paper and Flower; FRL's code re-scores). The selected
    rows are returned with their own weights, so the aggregation rule takes their weighted mean;
    the others are reported excluded. Needs ``n >= 2f + 3`` and ``m <= n - f``.

    Parameters
    ----------
    f:
        Number of Byzantine rows tolerated (integer >= 0).
    m:
        Rows kept (integer >= 0); 0 means ``n - f`` of the round.
    """

    name = "multi-krum"
    paper = "https://papers.nips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html"

    def __init__(self, *, f: int = 1, m: int = 0) -> None:
        self.f = setting_int("f", f, 0)
        self.m = setting_int("m", m, 0)

    def min_rows(self) -> int:
        """``2f + 3``, and ``m + f`` when ``m`` is fixed."""
        return max(2 * self.f + 3, self.m + self.f)

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        """Return the selected rows (ordered by score) with their weights."""
        x = _rules.as_updates(updates, "multi-krum")
        m = self.m or x.shape[0] - self.f
        scores = _rules.krum_scores(x, self.f)
        if m > x.shape[0] - self.f:
            raise InsufficientHonestClients(
                f"multi-krum needs m <= n - f, got m={m} with n={x.shape[0]}, f={self.f}"
            )
        chosen = np.argsort(scores, kind="stable")[:m]
        w = _rules.check_weights(weights, x.shape[0], "multi-krum")[chosen]
        if not w.sum() > 0:
            raise ValueError("multi-krum: the selected rows all have weight 0")
        excluded = tuple(sorted(set(range(x.shape[0])) - set(chosen.tolist())))
        return DefenseResult(x[chosen], w, excluded, {"multi_krum_selected": float(m)})
