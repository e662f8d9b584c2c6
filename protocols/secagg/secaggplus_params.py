"""Choosing SecAgg+'s neighbourhood size k and share threshold t (Bell et al. 2020, section 3/4).

SecAgg+ replaces classic SecAgg's complete graph with a sparse neighbour graph. That is only safe
for some (k, t): the paper's analysis states the conditions, and this module checks them for the
graph secure-fl actually builds, a Harary graph H(n, k) with randomly permuted labels (every node
sits on a ring in random order and is linked to the k/2 nearest on each side), with failure
probabilities computed exactly (hypergeometric tails) and combined by union bounds.

The adversary corrupts at most ``C = ceil(gamma * n)`` clients of a bucket of n (they collude with
the server) and at most ``D = ceil(delta * n)`` clients drop out over the whole round, both sets
fixed independently of the graph, which the server draws with `secrets` after the keys are
advertised. Because the labels are a uniformly random permutation, the k neighbours of any one
node are a uniformly random k-subset of the other n - 1 clients, so the number of corrupt (or
dropped) neighbours of a node is hypergeometric. The conditions, each with its failure bound:

``security`` (probability at most ``2**-security_bits``):
    S1. No honest client has t or more corrupt neighbours: otherwise the colluders hold t shares
        of both its self-mask seed and its mask key, and the server learns its input.
        Bound: ``(n - C) * P[Hyp(n - 1, C, k) >= t]``.
    S2. The graph of honest surviving clients stays connected: otherwise the server learns the
        sum of each component, a finer partition than the bucket. On the ring, removing nodes
        disconnects H(n, k) only when two disjoint runs of k/2 consecutive removed positions
        exist, so with R = C + D removed: ``n**2 / 2 * P[k given positions all removed]``
        (zero when R < k, or for the complete graph).
``correctness`` (probability at most ``2**-correctness_bits``):
    C1. Every secret the server must reconstruct still has t holders: a client has at most
        k - t dropped neighbours. Bound: ``n * P[Hyp(n - 1, D, k) > k - t]``.
and, for the automatic choice only, a majority threshold t > k/2, so that a server which lies
about who dropped cannot collect shares of both secrets of one client from honest neighbours
alone (the consistency-check phase that would stop it with colluders too is not implemented:
see docs/threat-model.md).

`choose_parameters` returns the smallest even k (then the complete graph, classic SecAgg) for
which some t meets every condition, and the smallest such t (the most dropouts survived while the
security target holds). `check_parameters` checks an explicit k and/or t against the same
conditions. Both raise `ValueError` with the condition that fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GraphParameters", "check_parameters", "choose_parameters", "hypergeometric_tail"]

#: Security and correctness targets of Bell et al.'s concrete parameters (2^-40 and 2^-30).
DEFAULT_SECURITY_BITS = 40
DEFAULT_CORRECTNESS_BITS = 30


def _log_comb(n: int, k: int) -> float:
    if k < 0 or k > n:
        return -math.inf
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def hypergeometric_tail(population: int, successes: int, draws: int, at_least: int) -> float:
    """``P[X >= at_least]`` for X ~ Hypergeometric(population, successes, draws).

    Examples
    --------
    >>> round(hypergeometric_tail(10, 3, 4, 2), 6)  # 1 - P[X=0] - P[X=1] = 1 - 35/210 - 105/210
    0.333333
    >>> hypergeometric_tail(10, 3, 4, 4)
    0.0
    """
    lo, hi = max(at_least, 0, draws - (population - successes)), min(successes, draws)
    if lo > hi:
        return 0.0
    total = _log_comb(population, draws)
    terms = [_log_comb(successes, x) + _log_comb(population - successes, draws - x) - total for x in range(lo, hi + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _log2(p: float) -> float:
    return -math.inf if p <= 0 else math.log2(p)


@dataclass(frozen=True)
class GraphParameters:
    """One bucket's (k, t) and the failure bounds it was checked against.

    ``k`` is the neighbourhood size (``n - 1`` for the complete graph, classic SecAgg), ``t`` the
    shares needed to reconstruct a secret, ``security_log2`` and ``correctness_log2`` the base-2
    logarithms of the union bounds of the module docstring (``-inf``: impossible).
    """

    n: int
    k: int
    t: int
    corrupt: int
    dropouts: int
    security_log2: float
    correctness_log2: float

    @property
    def complete(self) -> bool:
        """Whether every client is every other's neighbour (classic SecAgg)."""
        return self.k >= self.n - 1

    @property
    def graph_degree(self) -> int:
        """The ``k`` argument of `neighbour_graph` (0: the complete graph)."""
        return 0 if self.complete else self.k

    def describe(self) -> dict[str, object]:
        """JSON-safe summary for the audit report."""
        return {
            "n": self.n, "k": self.k, "t": self.t, "complete_graph": self.complete,
            "tolerated_corrupt": self.corrupt, "tolerated_dropouts": self.dropouts,
            "security_failure_log2": _round_log(self.security_log2),
            "correctness_failure_log2": _round_log(self.correctness_log2),
        }


def _round_log(value: float) -> float | str:
    return "-inf" if value == -math.inf else round(value, 1)


def _tolerated(n: int, fraction: float) -> int:
    return min(n, math.ceil(fraction * n - 1e-12))


def _security_s1(n: int, k: int, t: int, corrupt: int) -> float:
    return (n - corrupt) * hypergeometric_tail(n - 1, corrupt, k, t)


def _security_s2(n: int, k: int, corrupt: int, dropouts: int) -> float:
    removed = min(n, corrupt + dropouts)
    if k >= n - 1 or removed < k or n - removed <= 1:
        return 0.0
    return n * n / 2 * math.exp(_log_comb(n - k, removed - k) - _log_comb(n, removed))


def _correctness_c1(n: int, k: int, t: int, dropouts: int) -> float:
    return n * hypergeometric_tail(n - 1, dropouts, k, k - t + 1)


def _candidate(n: int, k: int, t: int, corrupt: int, dropouts: int) -> GraphParameters:
    security = min(1.0, _security_s1(n, k, t, corrupt) + _security_s2(n, k, corrupt, dropouts))
    correctness = min(1.0, _correctness_c1(n, k, t, dropouts))
    return GraphParameters(n, k, t, corrupt, dropouts, _log2(security), _log2(correctness))


def _meets(p: GraphParameters, security_bits: int, correctness_bits: int) -> bool:
    return p.t >= 2 and p.security_log2 <= -security_bits and p.correctness_log2 <= -correctness_bits


def _check_inputs(n: int, gamma: float, delta: float, security_bits: int, correctness_bits: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ValueError(f"a SecAgg+ bucket needs at least 3 clients, got n={n!r}")
    for name, value in (("corrupt_fraction", gamma), ("dropout_fraction", delta)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    for name, bits in (("security_bits", security_bits), ("correctness_bits", correctness_bits)):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 128:
            raise ValueError(f"{name} must be an int in [1, 128], got {bits!r}")


def _degrees(n: int) -> list[int]:
    """Even k from 2 below n - 1, then n - 1 (the complete graph)."""
    return list(range(2, n - 1, 2)) + [n - 1]


def _smallest_secure_t(n: int, k: int, corrupt: int, dropouts: int, security_bits: int) -> int:
    """The smallest majority t (>= 2) whose security bound meets the target; k + 1 if none does.

    The S1 bound falls as t grows and S2 does not depend on t, so a bisection finds it.
    """
    target = 2.0**-security_bits
    s2 = _security_s2(n, k, corrupt, dropouts)
    lo, hi = max(2, k // 2 + 1), k + 1
    if s2 > target:
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if _security_s1(n, k, mid, corrupt) + s2 <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def choose_parameters(
    n: int, *, corrupt_fraction: float, dropout_fraction: float,
    security_bits: int = DEFAULT_SECURITY_BITS, correctness_bits: int = DEFAULT_CORRECTNESS_BITS,
) -> GraphParameters:
    """The cheapest (k, t) for a bucket of ``n`` clients that meets every condition.

    Raises
    ------
    ValueError
        If no (k, t), not even the complete graph, meets the targets, naming the condition.

    Examples
    --------
    >>> p = choose_parameters(5, corrupt_fraction=0.05, dropout_fraction=0.1)
    >>> (p.k, p.t, p.complete)
    (4, 3, True)
    """
    _check_inputs(n, corrupt_fraction, dropout_fraction, security_bits, correctness_bits)
    corrupt, dropouts = _tolerated(n, corrupt_fraction), _tolerated(n, dropout_fraction)
    for k in _degrees(n):
        t = _smallest_secure_t(n, k, corrupt, dropouts, security_bits)
        if t <= k:  # C1 is easiest at the smallest t, so this t is the one to check
            p = _candidate(n, k, t, corrupt, dropouts)
            if _meets(p, security_bits, correctness_bits):
                return p
    raise ValueError(_infeasible(n, corrupt, dropouts, corrupt_fraction, dropout_fraction, security_bits, correctness_bits))


def _infeasible(n: int, corrupt: int, dropouts: int, gamma: float, delta: float, sb: int, cb: int) -> str:
    k = n - 1
    return (
        f"no SecAgg+ (k, t) protects a bucket of {n} clients against {corrupt} corrupt "
        f"(corrupt_fraction={gamma}) and {dropouts} dropped (dropout_fraction={delta}): even the complete "
        f"graph (k = {k}) needs {corrupt} < t <= {k - dropouts} with a majority t > {k // 2}; lower the "
        f"[secure.params] corrupt_fraction or dropout_fraction, or use larger buckets (targets 2^-{sb} security, 2^-{cb} correctness)"
    )


def check_parameters(
    n: int, *, k: int | None, threshold: float | None, corrupt_fraction: float, dropout_fraction: float,
    security_bits: int = DEFAULT_SECURITY_BITS, correctness_bits: int = DEFAULT_CORRECTNESS_BITS,
) -> GraphParameters:
    """Check explicit settings for a bucket of ``n``: ``k`` (0 = complete graph) and/or ``threshold``.

    ``threshold`` is a fraction: t = floor(threshold * k) + 1, capped at k (the rule of
    `protocols.secagg.secaggplus_stages.share_threshold`). A missing ``k`` is chosen as the
    cheapest that meets the targets with that threshold; a missing ``threshold`` gives the
    smallest t that does (with a majority, as `choose_parameters`).

    Raises
    ------
    ValueError
        Naming the condition the explicit setting breaks, and the bound it reaches.
    """
    _check_inputs(n, corrupt_fraction, dropout_fraction, security_bits, correctness_bits)
    if k is None and threshold is None:
        return choose_parameters(n, corrupt_fraction=corrupt_fraction, dropout_fraction=dropout_fraction,
                                 security_bits=security_bits, correctness_bits=correctness_bits)
    corrupt, dropouts = _tolerated(n, corrupt_fraction), _tolerated(n, dropout_fraction)
    degrees = [k] if k is not None else _degrees(n)
    best: GraphParameters | None = None
    for degree in degrees:
        degree = n - 1 if degree == 0 or degree >= n - 1 else degree
        if threshold is not None:
            t = min(degree, math.floor(threshold * degree) + 1)
        else:
            t = min(degree, _smallest_secure_t(n, degree, corrupt, dropouts, security_bits))
        p = _candidate(n, degree, t, corrupt, dropouts)
        if _meets(p, security_bits, correctness_bits):
            return p
        if best is None or _shortfall(p, security_bits, correctness_bits) < _shortfall(best, security_bits, correctness_bits):
            best = p
    assert best is not None
    what = f"k = {best.k}" + (f", threshold = {threshold} (t = {best.t})" if threshold is not None else f" (best t = {best.t})")
    if best.t < 2:
        reason = "t < 2: each share would be the secret itself"
    elif best.security_log2 > -security_bits:
        split = _log2(_security_s2(n, best.k, corrupt, dropouts))
        why = (f"the {corrupt} corrupt and {dropouts} dropped clients may split the honest survivors' graph "
               f"(bound 2^{split:.1f})" if split > -security_bits else
               f"a client may have t or more of the {corrupt} corrupt clients as neighbours")
        reason = f"the security bound is 2^{best.security_log2:.1f} > 2^-{security_bits}: {why}"
    else:
        reason = (f"the correctness bound is 2^{best.correctness_log2:.1f} > 2^-{correctness_bits} (with {dropouts} "
                  f"dropouts a client may keep fewer than t live neighbours)")
    try:
        auto = choose_parameters(n, corrupt_fraction=corrupt_fraction, dropout_fraction=dropout_fraction,
                                 security_bits=security_bits, correctness_bits=correctness_bits)
        hint = f"; the automatic choice for these fractions is k = {auto.k}, t = {auto.t} (leave neighbours and threshold unset)"
    except ValueError as exc:
        hint = f"; {exc}"
    return _raise(f"secagg+ bucket of {n}: {what} fails: {reason}{hint}")


def _shortfall(p: GraphParameters, security_bits: int, correctness_bits: int) -> float:
    return max(p.security_log2 + security_bits, p.correctness_log2 + correctness_bits, 0.0 if p.t >= 2 else math.inf)


def _raise(message: str) -> GraphParameters:
    raise ValueError(message)
