"""Robust aggregation rules: pure, vectorised functions of an ``(n, d)`` float32 matrix of updates.

Every function checks its preconditions on every call and refuses (`InsufficientHonestClients`,
naming the rule, n and f) instead of clamping. Rows must be finite (the server already rejects
NaN/inf uploads; a row that slipped through is refused here, by index). The defense classes in
this package hold settings and state and call these functions (style habit 2).

Pairwise squared distances (Krum, Multi-Krum, Bulyan) use the Gram trick on *centred* rows,
accumulated per block of coordinates in float64: ``|x_i - x_j|^2 = |c_i|^2 + |c_j|^2 - 2 c_i.c_j``
with ``c = x - center``. Centring on the mean is exact in exact arithmetic but, with an attacker
at 10^6 next to honest rows at 10^-2, the honest distances would cancel in float32; so when the
centred norms dwarf the distances, the matrix is recomputed centred on the most central row.
Small problems (``n^2 d <= 2^22``) take exact float64 differences instead.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from robustness.defenses._order import closest_to_median_rows, median_rows, trimmed_rows
from robustness.errors import InsufficientHonestClients

_DIRECT_LIMIT = 2**22  # n * n * d up to which distances are exact float64 differences
_GRAM_BLOCK = 65536  # coordinates per Gram block (50 x 65536 float32 = 13 MB)


# ------------------------------------------------------------------------------ checks


def as_updates(updates: Any, rule: str) -> np.ndarray:
    """``updates`` as a C-contiguous finite float32 ``(n, d)`` array (ValueError otherwise).

    No rows at all is `InsufficientHonestClients`: every rule needs at least one.
    """
    x = np.ascontiguousarray(updates, dtype=np.float32)
    if x.ndim == 2 and x.shape[0] == 0:
        raise InsufficientHonestClients(f"{rule} needs n >= 1 inputs, got n=0")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"{rule}: updates must be an (n, d) matrix with n >= 1 and d >= 1, got shape {x.shape}")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"{rule}: update row {bad} holds NaN or infinite values")
    return x


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an int ``>= minimum``; refuse bools, floats and smaller values (ValueError naming it)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _need(rule: str, n: int, f: int, minimum: int, formula: str) -> None:
    if n < minimum:
        raise InsufficientHonestClients(
            f"{rule} needs n >= {formula} = {minimum} inputs to tolerate f={f} Byzantine ones, got n={n}"
        )


def check_weights(weights: Any, n: int, rule: str) -> np.ndarray:
    """``weights`` as ``(n,)`` float64: finite, non-negative, positive sum (else ValueError)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"{rule}: weights must be {n} finite non-negative numbers with a positive sum, got {w!r}")
    return w


# ------------------------------------------------------------------------------ norms


def _norms(x: np.ndarray) -> np.ndarray:
    norms: np.ndarray = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    return norms


def row_norms(updates: Any) -> np.ndarray:
    """L2 norm of every row, ``(n,)`` float64."""
    return _norms(as_updates(updates, "row_norms"))


def median_norm(updates: Any) -> float:
    """Median L2 norm of the rows: the default bound of ``norm-bound`` (``norm_bound = 0``)."""
    return float(np.median(row_norms(updates)))


def norm_bound(updates: Any, bound: float) -> tuple[np.ndarray, int]:
    """Scale every row to L2 norm at most ``bound``: ``x * min(1, bound / |x|)`` (Sun et al. 2019).

    Returns the ``(n, d)`` float32 rows and how many were scaled down. ``bound`` must be > 0.
    """
    if isinstance(bound, bool) or not (np.isfinite(bound) and bound > 0):
        raise ValueError(f"norm_bound: bound must be a finite number > 0, got {bound!r}")
    x = as_updates(updates, "norm_bound")
    norms = _norms(x)
    scale = bound / np.maximum(norms, bound)  # min(1, bound / |x|) without dividing by 0
    clipped = int((scale < 1.0).sum())
    return np.multiply(x, scale[:, None].astype(np.float32)), clipped


# ------------------------------------------------------------------------------ coordinate-wise rules


def coordinate_median(updates: Any) -> np.ndarray:
    """Coordinate-wise median, ``(d,)`` float32 (mean of the two middle values for even n). Unweighted."""
    x = as_updates(updates, "median")
    _need("median", x.shape[0], 0, 1, "1")
    return median_rows(x)


def trimmed_mean(updates: Any, trim_fraction: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the ``b = floor(trim_fraction n)`` largest and smallest values.

    Unweighted by definition. Needs ``0 <= trim_fraction < 0.5`` and ``2 b < n``.
    """
    if isinstance(trim_fraction, bool) or not (0.0 <= trim_fraction < 0.5):
        raise ValueError(f"trimmed-mean: trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    x = as_updates(updates, "trimmed-mean")
    n = x.shape[0]
    b = int(np.floor(trim_fraction * n))
    if 2 * b >= n:
        raise InsufficientHonestClients(f"trimmed-mean needs 2b < n, got n={n}, b={b} (trim_fraction={trim_fraction})")
    return trimmed_rows(x, b)


# ------------------------------------------------------------------------------ distances and Krum


def _gram_distances(x: np.ndarray, center: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances via blocked Gram products of ``x - center`` (mean if None), plus the centred squared norms."""
    n, d = x.shape
    gram = np.zeros((n, n), dtype=np.float64)
    buffer = np.empty((n, min(d, _GRAM_BLOCK)), dtype=np.float32)
    for start in range(0, d, _GRAM_BLOCK):  # blocks of coordinates, not single ones
        block = x[:, start : start + _GRAM_BLOCK]
        out = buffer[:, : block.shape[1]]
        np.subtract(block, block.mean(axis=0) if center is None else center[start : start + _GRAM_BLOCK], out=out)
        gram += out @ out.T  # float32 product of one block, accumulated in float64
    sq = np.diag(gram).copy()
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
    dist = (dist + dist.T) * 0.5
    np.fill_diagonal(dist, 0.0)
    return dist, sq


def pairwise_sq_distances(updates: Any) -> np.ndarray:
    """``(n, n)`` float64 matrix of squared L2 distances between rows (diagonal 0)."""
    return _distances(as_updates(updates, "distances"))


def _distances(x: np.ndarray) -> np.ndarray:
    n, d = x.shape
    if n * n * d <= _DIRECT_LIMIT:
        x64 = x.astype(np.float64)
        diff = x64[:, None, :] - x64[None, :, :]
        exact: np.ndarray = np.einsum("ijk,ijk->ij", diff, diff)
        return exact
    with np.errstate(over="ignore", invalid="ignore"):
        dist, sq = _gram_distances(x, None)
        typical = float(np.median(dist[~np.eye(n, dtype=bool)]))
        if not np.isfinite(dist).all() or sq.max() > 1e3 * max(typical, np.finfo(np.float64).tiny):
            central = int(np.argmin(np.median(np.nan_to_num(dist, nan=np.inf), axis=1)))  # an honest-majority row
            dist, sq = _gram_distances(x, x[central].copy())
    overflow = np.flatnonzero(~np.isfinite(dist).all(axis=1))
    if overflow.size:  # float32 products overflowed (rows near 1e19 or beyond): exact float64 rows
        exact = _exact_rows(x, overflow)
        dist[overflow, :] = exact
        dist[:, overflow] = exact.T
    return dist


def _exact_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Squared distances from ``x[rows]`` to every row in float64, one pass per block of coordinates."""
    out = np.zeros((len(rows), x.shape[0]))
    for start in range(0, x.shape[1], _GRAM_BLOCK):
        block = x[:, start : start + _GRAM_BLOCK].astype(np.float64)
        for k, i in enumerate(rows):  # a loop over the (few) overflowing rows, vectorised inside
            diff = block - block[i]
            out[k] += np.einsum("ij,ij->i", diff, diff)
    return out


def _scores_from(dist: np.ndarray, f: int) -> np.ndarray:
    n = dist.shape[0]
    k = n - f - 2
    others = np.where(np.eye(n, dtype=bool), np.inf, dist)
    scores: np.ndarray = np.sort(others, axis=1)[:, :k].sum(axis=1)
    return scores


def _krum_check(rule: str, updates: Any, f: Any) -> tuple[np.ndarray, int]:
    f = check_count(f"{rule}: f", f)
    x = as_updates(updates, rule)
    _need(rule, x.shape[0], f, 2 * f + 3, "2f + 3")
    return x, f


def krum_scores(updates: Any, f: int) -> np.ndarray:
    """Krum score of every row: the sum of squared distances to its ``n - f - 2`` nearest other rows.

    Blanchard et al., NeurIPS 2017. Needs ``n >= 2f + 3``. Returns ``(n,)`` float64.
    """
    x, f = _krum_check("krum", updates, f)
    return _scores_from(_distances(x), f)


def krum(updates: Any, f: int) -> tuple[np.ndarray, int]:
    """The row with the lowest Krum score and its index (ties: the lowest index). Unweighted."""
    x, f = _krum_check("krum", updates, f)
    best = int(np.argmin(_scores_from(_distances(x), f)))
    return x[best].copy(), best


def multi_krum(updates: Any, f: int, m: int | None = None, weights: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the ``m`` rows with the lowest Krum scores, and their indices (by score).

    The scores are computed once over all n rows and the ``m`` best are kept (Blanchard et al.
    2017; Flower does the same). FRL's code instead re-scores the remaining rows after each pick;
    on the 1-D oracle both give 0.666667. ``m`` defaults to ``n - f`` and must be in
    ``[1, n - f]``. The mean is weighted by ``weights`` when given (Multi-Krum itself is
    unweighted: the weights only combine the selected rows).
    """
    x, f = _krum_check("multi-krum", updates, f)
    n = x.shape[0]
    m = n - f if m is None else check_count("multi-krum: m", m, 1)
    if m > n - f:
        raise InsufficientHonestClients(f"multi-krum needs m <= n - f, got m={m} with n={n}, f={f}")
    chosen = np.argsort(_scores_from(_distances(x), f), kind="stable")[:m]
    w = np.ones(n) if weights is None else check_weights(weights, n, "multi-krum")
    if not w[chosen].sum() > 0:
        raise ValueError("multi-krum: the selected rows all have weight 0")
    coef = np.zeros(n, dtype=np.float32)
    coef[chosen] = w[chosen] / w[chosen].sum()
    return coef @ x, chosen  # one pass over x: no copy of the selected rows


def bulyan_selection(dist: np.ndarray, f: int, theta: int) -> np.ndarray:
    """Indices of ``theta`` rows picked by repeated Krum: each pick re-scores the rows still left.

    With ``r`` rows left, a score sums the ``max(1, r - f - 2)`` nearest distances (the last picks
    of f = 1 would otherwise score nothing). Ties go to the lowest index. A loop over the theta
    picks, vectorised inside (only the ``(n, n)`` matrix is touched).
    """
    n = dist.shape[0]
    left = np.ones(n, dtype=bool)
    chosen: list[int] = []
    for _ in range(theta):
        r = int(left.sum())
        k = max(1, r - f - 2) if r > 1 else 0
        sub = np.where(left[None, :] & left[:, None] & ~np.eye(n, dtype=bool), dist, np.inf)
        scores = np.sort(sub, axis=1)[:, :k].sum(axis=1) if k else np.zeros(n)
        scores[~left] = np.inf
        pick = int(np.argmin(scores))
        chosen.append(pick)
        left[pick] = False
    return np.asarray(chosen, dtype=np.int64)


def bulyan(updates: Any, f: int) -> tuple[np.ndarray, np.ndarray]:
    """Bulyan (El Mhamdi, Guerraoui, Rouault, ICML 2018): aggregate and the indices it selected.

    Picks ``theta = n - 2f`` rows by repeated Krum (`bulyan_selection`), then per coordinate
    averages the ``beta = theta - 2f`` selected values closest to their median. Needs
    ``n >= 4f + 3``. Unweighted by definition.
    """
    f = check_count("bulyan: f", f)
    x = as_updates(updates, "bulyan")
    n = x.shape[0]
    _need("bulyan", n, f, 4 * f + 3, "4f + 3")
    theta, beta = n - 2 * f, n - 4 * f
    chosen = bulyan_selection(_distances(x), f, theta)
    return closest_to_median_rows(x, sorted(chosen.tolist()), beta), chosen


# ------------------------------------------------------------------------------ centred clipping


def centered_clip(
    updates: Any, center: Any, tau: float, iterations: int = 1, weights: Any = None
) -> np.ndarray:
    """Centred clipping (Karimireddy, He, Jaggi, ICML 2021), ``(d,)`` float32.

    ``v <- v + sum_i w_i (x_i - v) min(1, tau / |x_i - v|) / sum_i w_i``, ``iterations`` times,
    from ``v = center``. Weighted by ``weights`` (uniform when None). Each Byzantine row moves
    ``v`` by at most ``tau w_i / sum w`` per iteration.
    """
    if isinstance(tau, bool) or not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"centered-clip: tau must be a finite number > 0, got {tau!r}")
    iterations = check_count("centered-clip: iterations", iterations, 1)
    x = as_updates(updates, "centered-clip")
    n, d = x.shape
    v = np.asarray(center, dtype=np.float64)
    if v.shape != (d,) or not np.isfinite(v).all():
        raise ValueError(f"centered-clip: center must be {d} finite numbers, got shape {v.shape}")
    w = np.ones(n) if weights is None else check_weights(weights, n, "centered-clip")
    w = w / w.sum()
    for _ in range(iterations):  # a few iterations, each vectorised over rows and coordinates
        diff = x - v.astype(np.float32)
        norms = _norms(diff)
        scale = w * (tau / np.maximum(norms, tau))  # w min(1, tau / |x - v|)
        v = v + (scale.astype(np.float32) @ diff).astype(np.float64)
    return v.astype(np.float32)


# ------------------------------------------------------------------------------ bucketing


def _check_groups(groups: Sequence[Sequence[int]], n: int) -> tuple[tuple[int, ...], ...]:
    out = tuple(tuple(int(i) for i in g) for g in groups)
    flat = sorted(i for g in out for i in g)
    if any(not g for g in out) or flat != list(range(n)):
        raise ValueError(f"bucketing: groups must partition the rows 0..{n - 1} into non-empty buckets, got {out}")
    return out


def bucket_means(
    updates: Any,
    weights: Any,
    bucket_size: int,
    rng: np.random.Generator | None = None,
    *,
    groups: Sequence[Sequence[int]] | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, ...], ...]]:
    """Bucketing (Karimireddy, He, Jaggi, ICLR 2022): weighted means of random buckets of rows.

    The rows are permuted at random (``rng``; a CSPRNG-seeded generator when None) and cut into
    ``ceil(n / bucket_size)`` buckets of ``bucket_size`` consecutive rows (the last may be
    smaller). Pass ``groups`` to give the buckets explicitly instead. Returns the ``(k, d)``
    float32 bucket means (weighted by ``weights``), the ``(k,)`` bucket weights (sums), and the
    row indices of each bucket. Any robust rule is then applied to the bucket means.
    """
    x = as_updates(updates, "bucketing")
    n = x.shape[0]
    w = check_weights(weights, n, "bucketing")
    if groups is None:
        size = check_count("bucketing: bucket_size", bucket_size, 1)
        gen = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        order = gen.permutation(n)
        groups = [order[i : i + size].tolist() for i in range(0, n, size)]
    buckets = _check_groups(groups, n)
    member = np.zeros((len(buckets), n))
    for g, bucket in enumerate(buckets):  # one row per bucket (k <= n), not per coordinate
        member[g, list(bucket)] = w[list(bucket)]
    totals = member.sum(axis=1)
    if not (totals > 0).all():
        raise ValueError(f"bucketing: bucket(s) {np.flatnonzero(totals <= 0).tolist()} have total weight 0")
    means = (member / totals[:, None]).astype(np.float32) @ x  # one BLAS pass over x
    return means, totals, buckets
