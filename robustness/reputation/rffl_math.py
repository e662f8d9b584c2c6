"""The formulas of RFFL (Xu and Lyu, "A Reputation Mechanism Is All You Need", FL-ICML 2021).

Pure functions on numpy arrays; `robustness.reputation.tracker.ReputationTracker` holds the state.
The paper scores each client by the cosine of its update with the round's aggregate, smooths
the score over rounds and removes clients whose normalised reputation falls below ``c / |R|``.

>>> import numpy as np
>>> g = np.array([[1.0, 0.0], [0.8, 0.2], [-1.0, 0.5]])
>>> u = (g / 3).sum(axis=0)
>>> np.round(cosine_scores(g, u), 6).tolist()
[0.752577, 0.889817, -0.378633]
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["cosine_scores", "removal_mask", "reputation_weights", "smooth"]

_EPS = 1e-12


def cosine_scores(rows: ArrayLike, aggregate: ArrayLike) -> NDArray[np.float64]:
    """``cos(rows[i], aggregate)`` for every row of a ``(k, d)`` matrix (0 where a norm is 0).

    Computed in float64 in one matrix-vector product, so a million-parameter adapter costs one
    pass over the rows.
    """
    matrix = np.asarray(rows, dtype=np.float64)
    vector = np.asarray(aggregate, dtype=np.float64).reshape(-1)
    if matrix.ndim != 2 or matrix.shape[1] != vector.shape[0]:
        raise ValueError(f"rows must be (k, {vector.shape[0]}), got shape {matrix.shape}")
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector)
    dots = matrix @ vector
    return np.where(norms > _EPS, dots / np.maximum(norms, _EPS), 0.0)


def smooth(previous: ArrayLike, scores: ArrayLike, *, alpha: float) -> NDArray[np.float64]:
    """RFFL's update ``r <- alpha r + (1 - alpha) phi`` (``previous`` is 0 for a new client)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha!r}")
    return alpha * np.asarray(previous, dtype=np.float64) + (1.0 - alpha) * np.asarray(scores, dtype=np.float64)


def reputation_weights(reputations: ArrayLike) -> NDArray[np.float64]:
    """Aggregation weights from reputations: ``max(r, 0) / sum(max(r, 0))``.

    Negative reputations are clamped at 0 *before* normalising. Normalising signed values, as
    the paper's code does, divides by a sum that negatives shrink, so a weight can exceed 1
    (algorithms.md section 2, pitfall); here every weight lies in [0, 1] and they sum to 1.
    All-non-positive reputations give equal weights (nobody has earned more than anybody).
    """
    values = np.clip(np.asarray(reputations, dtype=np.float64), 0.0, None)
    total = float(values.sum())
    if values.size == 0:
        return values
    if total <= 0.0:
        return np.full(values.shape, 1.0 / values.size)
    return values / total


def removal_mask(reputations: ArrayLike, *, threshold: float) -> NDArray[np.bool_]:
    """Which reputable clients RFFL removes: normalised reputation below ``threshold / |R|``.

    Reputations are normalised by the sum of their positive parts (see `reputation_weights`),
    so a client with a negative reputation is always below the line.
    """
    values = np.asarray(reputations, dtype=np.float64)
    if values.size == 0:
        return np.zeros(0, dtype=bool)
    positive = float(np.clip(values, 0.0, None).sum())
    if positive <= 0.0:
        return np.zeros(values.shape, dtype=bool)  # nobody is ahead: removing everybody helps nobody
    return values / positive < threshold / values.size
