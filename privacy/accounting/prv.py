"""``prv``: privacy-loss-random-variable accounting (Gopi, Lee, Wutschitz 2021).

Numerically composes the privacy-loss distributions of the sampled Gaussian mechanism; tighter
than RDP for many rounds. Wraps opacus's ``PRVAccountant``; the reported value is the upper end of
its error interval, so it never understates the spend.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from privacy.accounting.base import Accountant, GaussianEvent
from privacy.errors import PrivacyError


class PRVAccountant(Accountant):
    """PRV accountant with epsilon error ``eps_error`` and delta error ``delta / 1000``."""

    name = "prv"

    def __init__(self, eps_error: float = 0.01) -> None:
        super().__init__()
        self.eps_error = float(eps_error)

    def _epsilon(self, events: Sequence[GaussianEvent], delta: float) -> float:
        from opacus.accountants import PRVAccountant as OpacusPRV

        inner = OpacusPRV()
        inner.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in events]
        try:
            with warnings.catch_warnings():
                # opacus takes log(0) on the q = 1 branch of its grid; the result is still exact
                warnings.simplefilter("ignore", RuntimeWarning)
                eps = inner.get_epsilon(delta, eps_error=self.eps_error)
        except (ValueError, RuntimeError) as exc:
            raise PrivacyError(f"accountant 'prv' failed for {list(events)!r} at delta={delta}: {exc}") from exc
        return float(eps)
