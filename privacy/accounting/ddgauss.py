"""Rényi DP of the distributed discrete Gaussian and of Poisson subsampling of any mechanism (pure math).

**Distributed discrete Gaussian** (Kairouz, Liu, Steinke, ICML 2021, Proposition 14 / Theorem 1).
``n`` clients each add N_Z(0, s^2) (local std ``s`` in integer units) to each of ``d`` integer
coordinates; one client's contribution to the sum moves by at most ``D2`` in L2 and ``D1`` in L1.
The sum of the noise is *not* a discrete Gaussian; ``tau`` bounds how far it is from one:

    tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1))

and the release is (alpha, eps(alpha))-RDP for every order alpha > 1 with

    eps(alpha) = min{ alpha D2^2 / (2 n s^2) + tau d,
                      (alpha / 2) (D2^2 / (n s^2) + 2 D1 tau / (sqrt(n) s) + tau^2 d),
                      (alpha / 2) (D2 / (sqrt(n) s) + tau sqrt(d))^2 }.

When the number of clients whose noise is in a sum is only known to lie in ``[n_min, n_max]``
(dropouts), every term grows as ``n s^2`` shrinks and as ``tau`` grows, and ``tau`` grows with
``n``; so ``n = n_min`` in the variance terms and ``n = n_max`` in ``tau`` bound every allowed
survivor count at once (`ddg_rdp`).

**Poisson subsampling** of any mechanism M with RDP curve eps(.) (Zhu & Wang, ICML 2019,
Theorem 6, the general upper bound; integer orders alpha >= 2): with sampling probability q,

    eps_q(alpha) <= 1/(alpha - 1) log{ (1-q)^(alpha-1) (alpha q - q + 1)
                                       + C(alpha, 2) q^2 (1-q)^(alpha-2) e^{eps(2)}
                                       + 3 sum_{l=3}^{alpha} C(alpha, l) q^l (1-q)^(alpha-l) e^{(l-1) eps(l)} }.

For the Gaussian this is the exact binomial expansion of Mironov et al. with the terms l >= 3
tripled, so it is never below opacus's tight subsampled-Gaussian RDP (the tests check it is
close). Non-integer orders take the value of the next integer order (RDP grows with the order).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["ddg_rdp", "ddg_tau", "poisson_subsampled_rdp"]


def _logsumexp(values: np.ndarray) -> float:
    top = float(np.max(values))
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.exp(values - top).sum()))


def ddg_tau(local_std: float, num_clients: int) -> float:
    """``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1))`` (0 for a single client).

    >>> ddg_tau(0.1, 1), round(ddg_tau(0.5, 2), 6)  # 10 exp(-pi^2 / 4)
    (0.0, 0.84805)
    """
    if num_clients < 2:
        return 0.0
    k = np.arange(1, num_clients, dtype=np.float64)
    return float(10.0 * np.exp(-2.0 * math.pi**2 * local_std**2 * k / (k + 1.0)).sum())


def ddg_rdp(
    orders: Sequence[float] | np.ndarray, *, local_std: float, min_clients: int, max_clients: int,
    l2_sensitivity: float, l1_sensitivity: float, dimension: int,
) -> np.ndarray:
    """RDP of one release of the distributed discrete Gaussian at each order (no subsampling).

    Conservative over the survivors: ``n = min_clients`` in the variance terms and ``n =
    max_clients`` in ``tau`` (module docstring). With ``tau = 0`` it is the continuous Gaussian's
    ``alpha D2^2 / (2 n s^2)``.

    >>> float(ddg_rdp([2.0], local_std=100.0, min_clients=4, max_clients=5, l2_sensitivity=200.0,
    ...               l1_sensitivity=400.0, dimension=10)[0])
    1.0
    """
    alpha = np.asarray(orders, dtype=np.float64)
    if local_std <= 0:
        return np.full(alpha.shape, math.inf)
    tau = ddg_tau(local_std, max_clients)
    scale = math.sqrt(min_clients) * local_std
    l2, l1, d = l2_sensitivity / scale, l1_sensitivity / scale, float(dimension)
    first = alpha / 2.0 * l2**2 + tau * d
    second = alpha / 2.0 * (l2**2 + 2.0 * l1 * tau + tau**2 * d)
    third = alpha / 2.0 * (l2 + tau * math.sqrt(d)) ** 2
    return np.minimum(np.minimum(first, second), third)


def poisson_subsampled_rdp(
    orders: Sequence[float] | np.ndarray, *, sample_rate: float, rdp: Callable[[np.ndarray], np.ndarray],
) -> np.ndarray:
    """RDP at each order of Poisson subsampling with ``sample_rate`` of a mechanism whose RDP is ``rdp``.

    ``rdp`` maps an array of integer orders to the base mechanism's RDP. Zhu & Wang's general bound
    (module docstring) at ``ceil(alpha)``, capped by the base mechanism's own RDP; ``sample_rate =
    1`` is the base mechanism itself.
    """
    alpha = np.asarray(orders, dtype=np.float64)
    if sample_rate >= 1.0:
        return np.asarray(rdp(alpha), dtype=np.float64)
    q = float(sample_rate)
    integer = np.maximum(np.ceil(alpha - 1e-12), 2.0).astype(np.int64)
    top = int(integer.max())
    ells = np.arange(0, top + 1, dtype=np.int64)
    base = np.full(top + 1, 0.0)
    base[2:] = np.asarray(rdp(ells[2:].astype(np.float64)), dtype=np.float64)
    log_q, log_1q = math.log(q), math.log1p(-q)
    log_factorial = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, top + 1, dtype=np.float64)))))
    cache: dict[int, float] = {}
    for a in sorted(set(integer.tolist())):
        if not math.isfinite(base[a]):
            cache[a] = math.inf
            continue
        l = ells[2 : a + 1]
        log_comb = log_factorial[a] - log_factorial[l] - log_factorial[a - l]
        terms = log_comb + l * log_q + (a - l) * log_1q + (l - 1) * base[2 : a + 1]
        terms[1:] += math.log(3.0)  # the orders l >= 3 count three times (Zhu & Wang's general bound)
        first = (a - 1) * log_1q + math.log(a * q - q + 1.0)
        cache[a] = min(_logsumexp(np.append(terms, first)) / (a - 1), float(base[a]))
    return np.array([cache[int(a)] for a in integer])
