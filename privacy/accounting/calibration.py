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
    tolerance: float = 1e-4,
) -> float:
    """The smallest z (within ``tolerance``) such that ``steps`` releases of ``event_for(z)`` spend <= ``target_epsilon``.

    Returns the fitting end of the final bracket: its epsilon is at most the target and within
    0.01 % of it (or the bracket is narrower than ``tolerance``).

    Raises
    ------
    PrivacyError
        For a target that is not finite and > 0, ``steps`` < 1, or a target that even
        `MAX_NOISE_MULTIPLIER` does not meet.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or not (
        0 < target_epsilon < math.inf
    ):
        raise PrivacyError(f"calibration: target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrivacyError(f"calibration: steps must be an integer >= 1, got {steps!r}")
    if not tolerance > 0:
        raise PrivacyError(f"calibration: tolerance must be > 0, got {tolerance!r}")

    def excess(z: float) -> float:  # log(epsilon / target): <= 0 when z fits
        eps = planned_epsilon(event_for, z, accountant_factory=accountant_factory, delta=delta, steps=steps)
        return math.inf if math.isinf(eps) else math.log(max(eps, 1e-300) / target_epsilon)

    low, high = 0.0, 1.0
    f_high = excess(high)
    if f_high <= 0:
        low = high / 2
        f_low = excess(low)
        while f_low <= 0:  # shrink until the lower end overshoots the target
            high, f_high, low = low, f_low, low / 2
            if low <= tolerance:
                return high
            f_low = excess(low)
    else:
        while f_high > 0:
            low, high = high, high * 2
            if high > MAX_NOISE_MULTIPLIER:
                raise PrivacyError(
                    f"calibration: target_epsilon={target_epsilon} at delta={delta} over {steps} release(s) needs a "
                    f"noise multiplier above {MAX_NOISE_MULTIPLIER:g}; raise the target or plan fewer rounds"
                )
            f_high = excess(high)
        f_low = excess(low) if low > 0 else math.inf
    # Bracket [low, high]: low overshoots, high fits. Illinois-style false position on log(epsilon / target)
    # (a bisection step whenever an end is infinite), stopped when the fitting end is within
    # `relative` of the target or the bracket is narrower than `tolerance`.
    relative, side = 1e-4, 0
    while high - low > tolerance and f_high < -relative:
        if math.isinf(f_low):
            middle = (low + high) / 2
        else:
            middle = high - f_high * (high - low) / (f_high - f_low)
            middle = min(max(middle, low + tolerance / 4), high - tolerance / 4)
        f_middle = excess(middle)
        if f_middle <= 0:
            high, f_high = middle, f_middle
            if side == 1:
                f_low /= 2
            side = 1
        else:
            low, f_low = middle, f_middle
            if side == -1:
                f_high /= 2
            side = -1
    return high
