"""The one-run empirical privacy audit of Steinke, Nasr and Jagielski (NeurIPS 2023), as pure functions.

Setup: ``m`` canaries, each inserted independently with probability 1/2 into *one* training run.
After the run the auditor scores every canary from what was released, guesses "in" for the
``k_in`` highest scores and "out" for the ``k_out`` lowest, and abstains on the rest: ``r =
k_in + k_out`` guesses, ``v`` of them correct. Under (epsilon, 0)-DP the number of correct
guesses is stochastically dominated by ``Binomial(r, e^eps / (1 + e^eps))`` (the paper's
Theorem 3.1), so the lower bound at confidence ``1 - beta`` is the largest epsilon with
``P[Bin(r, p_eps) >= v] <= beta``: every epsilon below it is rejected at level ``beta``.

Under (epsilon, delta)-DP with delta > 0 the tail gains the paper's correction (its Theorem 3.3
and the p-value of its Algorithm 3 appendix code), with ``f(v) = P[Bin(r, p_eps) >= v]``::

    P[W >= v] <= f(v) + 2 m delta * max_{1 <= i <= v} (f(v - i) - f(v)) / i

which grows with the number of canaries ``m`` (all of them, not only the ``r`` guessed).

Choosing ``(k_in, k_out)`` after seeing the scores is a multiple test: `one_run_audit` tries
every pair of a small fixed grid (`guess_grid`, fractions `GUESS_FRACTIONS` of ``m``) at level
``beta / len(grid)`` each and reports the largest bound, which holds at confidence ``1 - beta``
by the union bound.

The bound is only as strong as the attack (the scores): a weak attack gives a small lower bound
whatever the true epsilon is. It must never exceed the theoretical epsilon of the same run, except
with probability ``beta``; a bound far above it means the implementation leaks more than it accounts.

>>> round(one_run_epsilon_lower_bound(1000, 700, canaries=1000), 4)
0.732
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privacy.errors import PrivacyError

__all__ = [
    "ATTACK_CAVEAT", "EMPIRICAL_FILE", "EMPIRICAL_SCHEMA", "GUESS_FRACTIONS", "PAPER", "OneRunAudit", "binomial_tail",
    "guess_counts", "guess_grid", "one_run_audit", "one_run_epsilon_lower_bound", "one_run_p_value",
    "read_empirical_audit",
]  # fmt: skip

PAPER = "https://arxiv.org/abs/2305.08846"
#: The result file of an empirical audit, in the audited run's directory, and its schema.
EMPIRICAL_FILE = "empirical_audit.json"
EMPIRICAL_SCHEMA = "secure-fl/empirical-audit/v1"
#: Shares of the m canaries guessed (half "in" from the top, half "out" from the bottom); fixed before any run.
GUESS_FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
#: What every report of an empirical audit says about its strength.
ATTACK_CAVEAT = (
    "A lower bound is only as strong as the attack behind it: a small value shows that this attack learned "
    "little, not that the run is private; only the theoretical epsilon is a guarantee."
)
#: Bisection stops when the bracket is this narrow (in epsilon).
_TOLERANCE = 1e-9
#: Largest epsilon searched: ``p_eps`` is 1 to double precision long before it.
_EPS_MAX = 60.0


def _check_counts(r: int, v: int, m: int) -> None:
    for name, value in (("guesses r", r), ("correct v", v), ("canaries m", m)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if not v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")


def _check_level(beta: float, delta: float) -> None:
    if not (isinstance(beta, (int, float)) and 0 < beta < 1):
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta!r}")
    if not (isinstance(delta, (int, float)) and 0 <= delta < 1):
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")


def _log_pmf(r: int, epsilon: float) -> np.ndarray:
    """``log P[Bin(r, e^eps/(1+e^eps)) = k]`` for ``k = 0..r`` (log factorials by cumulative sums)."""
    log_fact = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, r + 1, dtype=np.float64)))))
    k = np.arange(r + 1)
    log_p = -np.logaddexp(0.0, -epsilon)  # log(e^eps / (1 + e^eps)), stable for any eps
    log_q = -np.logaddexp(0.0, epsilon)  # log(1 / (1 + e^eps))
    result: np.ndarray = log_fact[r] - log_fact[k] - log_fact[r - k] + k * log_p + (r - k) * log_q
    return result


def binomial_tail(r: int, v: int, epsilon: float) -> float:
    """``P[Bin(r, e^eps / (1 + e^eps)) >= v]``, summed in log space.

    >>> binomial_tail(10, 0, 1.0)
    1.0
    >>> round(binomial_tail(2, 2, 0.0), 6)
    0.25
    """
    if v <= 0:
        return 1.0
    if v > r:
        return 0.0
    log_pmf = _log_pmf(r, epsilon)
    return float(min(1.0, math.exp(np.logaddexp.reduce(log_pmf[v:]))))


def one_run_p_value(r: int, v: int, epsilon: float, *, canaries: int, delta: float = 0.0) -> float:
    """The chance of ``v`` or more correct out of ``r`` guesses under (epsilon, delta)-DP, at most 1.

    ``f(v) + 2 m delta max_i (f(v - i) - f(v)) / i`` (the module docstring); ``delta = 0`` gives
    the plain binomial tail. ``canaries`` is m, every canary of the run.
    """
    _check_counts(r, v, canaries)
    _check_level(0.5, delta)
    tail = binomial_tail(r, v, epsilon)
    if delta == 0 or v == 0:
        return tail
    pmf = np.exp(_log_pmf(r, epsilon))
    # window[i-1] = P[v - i <= Bin <= v - 1] = f(v - i) - f(v), for i = 1..v
    window = np.cumsum(pmf[v - 1 :: -1])
    alpha = float(np.max(window / np.arange(1, v + 1)))
    return min(1.0, tail + 2.0 * canaries * delta * alpha)


def one_run_epsilon_lower_bound(
    r: int, v: int, *, canaries: int, delta: float = 0.0, beta: float = 0.05
) -> float:
    """The largest epsilon with ``p_value(r, v, epsilon) <= beta`` (0 when even epsilon = 0 is not rejected).

    With probability at least ``1 - beta`` over the canaries' coin flips, the audited run is not
    (epsilon, delta)-DP for any epsilon below the value returned. The p-value grows with epsilon,
    so the boundary is found by bisection to 1e-9.

    >>> round(one_run_epsilon_lower_bound(100, 90, canaries=100), 4)
    1.6308
    """
    _check_counts(r, v, canaries)
    _check_level(beta, delta)

    def rejected(epsilon: float) -> bool:
        return one_run_p_value(r, v, epsilon, canaries=canaries, delta=delta) <= beta

    if r == 0 or not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2.0 * high
        if high > _EPS_MAX:
            return _EPS_MAX
    while high - low > _TOLERANCE:
        middle = 0.5 * (low + high)
        low, high = (middle, high) if rejected(middle) else (low, middle)
    return low


def guess_grid(canaries: int, fractions: Sequence[float] = GUESS_FRACTIONS) -> tuple[tuple[int, int], ...]:
    """The ``(k_in, k_out)`` pairs tried: for each fraction f, ``round(f m)`` guesses split evenly.

    Pairs that round to no guess, and repeats, are dropped; the grid depends only on ``m``, never
    on the scores, so the union bound over it is honest.

    >>> guess_grid(10)
    ((1, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5))
    """
    if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 1:
        raise ValueError(f"canaries must be an integer >= 1, got {canaries!r}")
    pairs: list[tuple[int, int]] = []
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise ValueError(f"guess fractions must be in (0, 1], got {fraction!r}")
        total = int(round(fraction * canaries))
        k_in = (total + 1) // 2
        pair = (k_in, total - k_in)
        if total > 0 and pair not in pairs:
            pairs.append(pair)
    return tuple(pairs)


def guess_counts(scores: Sequence[float] | np.ndarray, inserted: Sequence[bool] | np.ndarray, *, k_in: int, k_out: int) -> tuple[int, int]:
    """``(r, v)``: guess "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest.

    Ties are broken by position (a stable sort), which does not depend on who was inserted.

    >>> guess_counts([3.0, 0.1, 2.0, -1.0], [True, False, True, False], k_in=1, k_out=1)
    (2, 2)
    """
    values = np.asarray(scores, dtype=np.float64)
    bits = np.asarray(inserted, dtype=bool)
    if values.ndim != 1 or values.shape != bits.shape:
        raise ValueError(f"scores and inserted must be 1-D of one length, got shapes {values.shape} and {bits.shape}")
    if not np.isfinite(values).all():
        raise ValueError("every canary score must be finite")
    if k_in < 0 or k_out < 0 or k_in + k_out > values.size:
        raise ValueError(f"need k_in, k_out >= 0 and k_in + k_out <= m = {values.size}, got {k_in}, {k_out}")
    order = np.argsort(-values, kind="stable")
    correct = int(bits[order[:k_in]].sum()) + int((~bits[order[values.size - k_out :]]).sum() if k_out else 0)
    return k_in + k_out, correct


@dataclass(frozen=True)
class OneRunAudit:
    """The outcome of a one-run audit: the bound, its confidence, and the guesses it rests on."""

    epsilon_lower_bound: float
    confidence: float
    canaries: int
    inserted: int
    guesses: int
    correct: int
    guesses_in: int
    guesses_out: int
    delta: float
    grid: tuple[tuple[int, int], ...]

    @property
    def beta(self) -> float:
        """``1 - confidence``: the chance the bound overstates the true epsilon."""
        return 1.0 - self.confidence


def one_run_audit(
    scores: Sequence[float] | np.ndarray,
    inserted: Sequence[bool] | np.ndarray,
    *,
    delta: float = 0.0,
    beta: float = 0.05,
    fractions: Sequence[float] = GUESS_FRACTIONS,
) -> OneRunAudit:
    """Guess membership from ``scores`` (higher = more likely in) and return the best honest lower bound.

    Every ``(k_in, k_out)`` of `guess_grid` is tried at level ``beta / len(grid)``; the largest
    bound holds at confidence ``1 - beta`` (union bound).
    """
    _check_level(beta, delta)
    bits = np.asarray(inserted, dtype=bool)
    m = int(bits.size)
    grid = guess_grid(m, fractions)
    level = beta / len(grid)
    best: tuple[float, int, int, int, int] = (-1.0, 0, 0, 0, 0)
    for k_in, k_out in grid:
        r, v = guess_counts(scores, bits, k_in=k_in, k_out=k_out)
        bound = one_run_epsilon_lower_bound(r, v, canaries=m, delta=delta, beta=level)
        if bound > best[0]:
            best = (bound, r, v, k_in, k_out)
    bound, r, v, k_in, k_out = best
    return OneRunAudit(
        epsilon_lower_bound=bound, confidence=1.0 - beta, canaries=m, inserted=int(bits.sum()), guesses=r,
        correct=v, guesses_in=k_in, guesses_out=k_out, delta=float(delta), grid=grid,
    )


def read_empirical_audit(run_dir: str | Path) -> dict[str, Any] | None:
    """The parsed ``empirical_audit.json`` of ``run_dir``, or ``None`` when no audit ran.

    Raises `PrivacyError` naming the file when it is not valid JSON or not of `EMPIRICAL_SCHEMA`.
    """
    target = Path(run_dir) / EMPIRICAL_FILE
    if not target.is_file():
        return None
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PrivacyError(f"{target}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != EMPIRICAL_SCHEMA:
        raise PrivacyError(f"{target}: not an empirical audit (schema {EMPIRICAL_SCHEMA!r} expected)")
    return data
