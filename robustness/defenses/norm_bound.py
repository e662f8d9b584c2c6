"""``norm-bound``: scale every row to a bounded L2 norm (Sun et al. 2019)."""

from __future__ import annotations

import numpy as np

from robustness.defenses import _rules
from robustness.defenses._common import setting_float
from robustness.defenses.base import Defense, DefenseResult


class NormBound(Defense):
    """Scale each row to L2 norm at most M: ``x * min(1, M / |x|)``; the rows keep their weights.

    With ``norm_bound = 0``, M is the median row norm of the round (adaptive: at least half the
    rows pass unchanged; when that median is 0, every non-zero row becomes 0). A bound does not
    remove a Byzantine row, it limits how far each one can pull the weighted mean.

    Parameters
    ----------
    norm_bound:
        Largest L2 norm of a row (> 0), or 0 for the median row norm of each round.
    """

    name = "norm-bound"
    paper = "https://arxiv.org/abs/1911.07963"

    def __init__(self, *, norm_bound: float = 0.0) -> None:
        self.norm_bound = setting_float("norm_bound", norm_bound, low=0.0, low_open=False)

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        """Return the bounded rows with their weights."""
        x = _rules.as_updates(updates, "norm-bound")
        bound = self.norm_bound or _rules.median_norm(x)
        if bound > 0:
            rows, clipped = _rules.norm_bound(x, bound)
        else:
            clipped = int((np.abs(x).max(axis=1) > 0).sum())
            rows = np.zeros_like(x)
        return DefenseResult(rows, np.asarray(weights, dtype=np.float64), (), {"norm_bound": bound, "norm_clipped": float(clipped)})
