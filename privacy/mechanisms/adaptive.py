"""Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021): the pure math.

Instead of a fixed clip norm C, the server tracks the ``gamma`` quantile of the clients' update
norms. Each round every client reports one bit, ``b_i = 1[||update_i|| <= C]`` (its update was
**not** clipped); the server noises the count and moves C geometrically:

    b~ = (sum_i b_i + N(0, sigma_b^2)) / m
    C <- C * exp(-eta_C * (b~ - gamma))

When more than ``gamma`` of the clients are unclipped (b~ > gamma), C is above the quantile and
shrinks; when fewer are, C grows. (flwr 1.41's adaptive-clipping strategies count the *clipped*
clients but keep this exponent's sign, which drives C to 0 or to infinity;
``tests/test_dp_adaptive_clip.py`` checks the direction.)

Privacy (the paper's Theorem 1): the count query ``sum_i (b_i - 1/2)`` has sensitivity 1/2 under
adding or removing one client, so with noise sigma_b it is a Gaussian mechanism of noise
multiplier ``2 sigma_b``. Noising the update sum with multiplier ``z_delta`` and the count with
``2 sigma_b`` costs, by the composition of Gaussian mechanisms, as much as one Gaussian mechanism
of multiplier z with ``z^-2 = z_delta^-2 + (2 sigma_b)^-2``. So the update noise is raised to

    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2),

which needs ``z < 2 sigma_b``, and the round is accounted as one ``GaussianEvent(z)``.

These functions hold no state and draw no randomness; `privacy.mechanisms.central.CentralDP`
calls them with its CSPRNG draws.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "DEFAULT_CLIP_LEARNING_RATE", "DEFAULT_TARGET_QUANTILE", "default_count_stddev", "noised_unclipped_fraction",
    "next_clip_norm", "update_noise_multiplier",
]  # fmt: skip

#: The paper's defaults: the median (gamma = 0.5) and a geometric step eta_C = 0.2.
DEFAULT_TARGET_QUANTILE = 0.5
DEFAULT_CLIP_LEARNING_RATE = 0.2
#: The paper's default count noise: sigma_b = (expected clients per round) / 20.
COUNT_STDDEV_PER_CLIENT = 1.0 / 20.0


def default_count_stddev(expected_cohort: float) -> float:
    """``sigma_b = m / 20`` for ``m`` expected clients per round (Andrew et al.'s default).

    >>> default_count_stddev(100)
    5.0
    """
    if not (0 < expected_cohort < math.inf):
        raise ValueError(f"the expected cohort must be a finite number > 0, got {expected_cohort!r}")
    return float(expected_cohort) * COUNT_STDDEV_PER_CLIENT


def next_clip_norm(clip_norm: float, unclipped_fraction: float, *, target_quantile: float, learning_rate: float) -> float:
    """One geometric step of the clip norm: ``C * exp(-eta_C * (b~ - gamma))``.

    ``unclipped_fraction`` is b~, the (noised) fraction of clients whose update was **not**
    clipped. More unclipped clients than the target (b~ > gamma) means C is above the gamma
    quantile of the norms, so C shrinks.

    >>> next_clip_norm(1.0, 0.9, target_quantile=0.5, learning_rate=0.2) < 1.0
    True
    >>> next_clip_norm(1.0, 0.1, target_quantile=0.5, learning_rate=0.2) > 1.0
    True
    """
    return float(clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile)))


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``: the update noise that, with the count noised
    by ``sigma_b``, makes the round cost one Gaussian mechanism of multiplier ``z``.

    Refused (``ValueError``) unless ``z < 2 sigma_b``: the count alone would then already cost
    as much as the whole budget of the round. ``z = 0`` (no guarantee) gives 0.

    >>> round(update_noise_multiplier(1.0, 5.0), 6)
    1.005038
    """
    if noise_multiplier == 0:
        return 0.0
    if not count_stddev > 0:
        raise ValueError(f"clip_count_stddev must be > 0, got {count_stddev!r}")
    if noise_multiplier >= 2 * count_stddev:
        raise ValueError(
            f"adaptive clipping needs noise_multiplier < 2 * clip_count_stddev, got z = {noise_multiplier:g} and "
            f"sigma_b = {count_stddev:g} (2 sigma_b = {2 * count_stddev:g}): the noised count alone would cost the "
            "whole round's budget; raise clip_count_stddev above z / 2 (the default is the expected clients per "
            "round / 20, so more clients per round also work)"
        )
    return float((noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5)


def noised_unclipped_fraction(
    bits: np.ndarray, noise: float, *, contributions: int, denominator: float | None = None
) -> float:
    """``b~ = (sum_i (b_i - 1/2) + noise) / m + 1/2`` for the bits of the ``contributions`` clients.

    ``m`` is ``denominator`` when given (the planned cohort size, a public constant, so b~ does
    not reveal how many clients contributed), else ``contributions``; with ``m`` equal to the
    number of bits this is ``(sum_i b_i + noise) / m``. ``bits`` are clamped to [0, 1] (a value in
    between, such as 1/2 for a client that sent no bit, changes the centred count
    ``sum (b_i - 1/2)`` by at most 1/2, as a real bit does), and ``noise`` is one draw of
    N(0, sigma_b^2), made by the caller from its CSPRNG.

    >>> noised_unclipped_fraction(np.array([1.0, 1.0, 0.0, 0.0]), 0.0, contributions=4)
    0.5
    >>> noised_unclipped_fraction(np.array([1.0, 1.0, 1.0]), 0.0, contributions=3, denominator=4)
    0.875
    """
    if isinstance(contributions, bool) or not isinstance(contributions, int) or contributions < 1:
        raise ValueError(f"the unclipped fraction needs at least one contribution, got {contributions!r}")
    m = float(contributions if denominator is None else denominator)
    if not (math.isfinite(m) and m > 0):
        raise ValueError(f"the unclipped fraction needs a positive denominator, got {denominator!r}")
    values = np.clip(np.asarray(bits, dtype=np.float64), 0.0, 1.0)
    return float((float((values - 0.5).sum()) + noise) / m + 0.5)
