"""``prv``: privacy-loss-random-variable accounting (Gopi, Lee, Wutschitz 2021).

Numerically composes the privacy-loss distributions of the sampled Gaussian mechanism; tighter
than RDP for many rounds. Wraps opacus's ``PRVAccountant``; the reported value is the upper end of
its error interval, so it never understates the spend.

Opacus's PRV discretises the privacy loss on a grid whose size grows with the number of steps and
the loss itself: for long runs at q = 1 it needs gigabytes (a MemoryError), and for very lossy
histories it answers ``inf`` although the release was noisy. Neither is "no guarantee": the
accountant then reports the RDP bound of the same history (valid, looser) and says so in the
`PrivacySpent` note, which the ledger and the report carry. The same fallback covers a history
holding distributed discrete Gaussian releases (`DiscreteGaussianEvent`), for which opacus has no
privacy-loss distribution.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

from privacy.accounting.base import Accountant, GaussianEvent, PrivacyEvent
from privacy.accounting.rdp import rdp_epsilon
from privacy.errors import PrivacyError

#: Largest discretisation grid (points) PRV is run on; beyond it the RDP bound is reported.
MAX_DOMAIN_POINTS = 2**23


class PRVAccountant(Accountant):
    """PRV accountant with epsilon error ``eps_error`` and delta error ``delta / 1000``.

    ``max_domain_points`` caps the grid opacus would allocate (8M points: a few hundred MB);
    a history that needs more is bounded by RDP instead, with a note.
    """

    name = "prv"

    def __init__(self, eps_error: float = 0.01, max_domain_points: int = MAX_DOMAIN_POINTS) -> None:
        super().__init__()
        self.eps_error = float(eps_error)
        if isinstance(max_domain_points, bool) or not isinstance(max_domain_points, int) or max_domain_points < 2:
            raise PrivacyError(f"accountant 'prv': max_domain_points must be an integer >= 2, got {max_domain_points!r}")
        self.max_domain_points = max_domain_points

    def _bound(self, events: Sequence[PrivacyEvent], delta: float) -> tuple[float, str | None]:
        why: str | None
        if not all(isinstance(e, GaussianEvent) for e in events):
            bound = rdp_epsilon(events, delta)
            return bound, ("prv: opacus's PRV has no privacy-loss distribution for the distributed discrete Gaussian; "
                           "the RDP bound of the same releases is reported instead (valid, looser)")
        try:
            eps = self._epsilon(events, delta)
            why = None if math.isfinite(eps) else "opacus's PRV returned inf for this noisy history"
        except _TooLarge as exc:
            why = str(exc)
        except MemoryError:
            why = "opacus's PRV ran out of memory"
        if why is None:
            return eps, None
        bound = rdp_epsilon(events, delta)
        return bound, f"prv: {why}; the RDP bound of the same releases is reported instead (valid, looser)"

    def _epsilon(self, events: Sequence[PrivacyEvent], delta: float) -> float:
        gaussian = [e for e in events if isinstance(e, GaussianEvent)]
        if len(gaussian) != len(events):
            raise PrivacyError("accountant 'prv' composes Gaussian events only (see _bound for the RDP fallback)")
        from opacus.accountants import PRVAccountant as OpacusPRV
        from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

        inner = OpacusPRV()
        inner.history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in gaussian]
        try:
            with warnings.catch_warnings():
                # opacus takes log(0) on the q = 1 branch of its grid; the result is still exact.
                # Its RDP-based domain bound warns that its orders are too few: that only widens the grid.
                warnings.simplefilter("ignore", RuntimeWarning)
                warnings.simplefilter("ignore", UserWarning)
                domain = inner._get_domain(
                    prvs=[PoissonSubsampledGaussianPRV(e.sample_rate, e.noise_multiplier) for e in gaussian],
                    num_self_compositions=[e.steps for e in gaussian],
                    eps_error=self.eps_error,
                    delta_error=delta / 1000,
                )
                if domain.size > self.max_domain_points:
                    raise _TooLarge(
                        f"the PRV grid would need {domain.size:,} points (more than max_domain_points="
                        f"{self.max_domain_points:,})"
                    )
                eps = inner.get_epsilon(delta, eps_error=self.eps_error)
        except (ValueError, RuntimeError) as exc:
            raise PrivacyError(f"accountant 'prv' failed for {list(events)!r} at delta={delta}: {exc}") from exc
        return float(eps)


class _TooLarge(Exception):
    """The PRV grid for a history exceeds ``max_domain_points``."""
