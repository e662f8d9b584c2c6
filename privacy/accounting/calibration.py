"""Noise calibration: the smallest noise multiplier whose planned releases stay within a target epsilon.

`calibrate_noise_multiplier` is generic over the mechanism: it takes a function ``z -> event``
(what one release costs at noise multiplier z; a `GaussianEvent` for central DP, another event
type for a mechanism whose accountant understands it) and a factory of fresh accountants, and
searches z so that ``steps`` releases spend at most ``target_epsilon`` at ``delta``: a bracket by
doubling or halving from z = 1, then a safeguarded bisection (false position on
``log(epsilon / target)``, Illinois variant, which needs a handful of accountant evaluations
instead of about 15). Epsilon falls as z grows for every accountant of the sampled Gaussian
mechanism, so the bracket always holds the answer; the returned z is the bracket's fitting
(upper) end, so the planned releases never overshoot the target (the result errs on the side of
more noise, by at most ``tolerance`` in z or 0.01 % in epsilon).

>>> from privacy.accounting import GaussianEvent
>>> from privacy.accounting.rdp import RDPAccountant
>>> z = calibrate_noise_multiplier(lambda z: GaussianEvent(z, 1.0), accountant_factory=RDPAccountant,
...                                target_epsilon=10.0, delta=1e-5, steps=1)
>>> round(z, 3)
0.53
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from privacy.accounting.base import Accountant
from privacy.errors import PrivacyError

#: Largest noise multiplier the search tries; a target that needs more is refused (the run could not learn).
MAX_NOISE_MULTIPLIER = 1e4


def planned_epsilon(
    event_for: Callable[[float], Any], z: float, *, accountant_factory: Callable[[], Accountant], delta: float, steps: int
) -> float:
    """Epsilon at ``delta`` after ``steps`` releases of ``event_for(z)`` on a fresh accountant."""
    accountant = accountant_factory()
    accountant.compose(event_for(z), steps)
    return accountant.epsilon(delta)


def calibrate_noise_multiplier(
    event_for: Callable[[float], Any],
    *,
    accountant_factory: Callable[[], Accountant],
    target_epsilon: float,
    delta: float,
    steps: int,
    epsilon_tolerance: float = 0.01,
) -> float:
    """A z such that ``steps`` releases of ``event_for(z)`` spend at most ``target_epsilon``, within ``epsilon_tolerance``.

    The search is opacus's ``get_noise_multiplier`` (bracket [0, 10], doubled until the upper end
    fits, then bisection until the fitting end's epsilon is within ``epsilon_tolerance`` below the
    target), over any ``z -> event`` and any accountant, so with the RDP accountant and a
    Gaussian event it returns opacus's value (target 3, q = 0.01, 1000 steps, delta 1e-5:
    0.865479, epsilon 2.9918). The returned z never overshoots: its epsilon lies in
    ``[target - epsilon_tolerance, target]``.

    Raises
    ------
    PrivacyError
        For a target that is not finite and > 0, ``steps`` < 1, a tolerance that is not > 0, or a
        target that even `MAX_NOISE_MULTIPLIER` does not meet.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
        0 < target_epsilon < math.inf
    ):
        raise PrivacyError(f"calibration: target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrivacyError(f"calibration: steps must be an integer >= 1, got {steps!r}")
    if not epsilon_tolerance > 0:
        raise PrivacyError(f"calibration: epsilon_tolerance must be > 0, got {epsilon_tolerance!r}")

    def spent(z: float) -> float:
        return planned_epsilon(event_for, z, accountant_factory=accountant_factory, delta=delta, steps=steps)

    low, high = 0.0, 10.0
    eps_high = spent(high)
    while eps_high > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise PrivacyError(
                f"calibration: target_epsilon={target_epsilon} at delta={delta} over {steps} release(s) needs a "
                f"noise multiplier above {MAX_NOISE_MULTIPLIER:g}; raise the target or plan fewer rounds"
            )
        eps_high = spent(high)
    while target_epsilon - eps_high > epsilon_tolerance:
        middle = (low + high) / 2
        eps = spent(middle)
        if eps < target_epsilon:
            high, eps_high = middle, eps
        else:
            low = middle
    return high
