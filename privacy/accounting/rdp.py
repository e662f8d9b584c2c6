"""``rdp``: Rényi-DP accounting of the sampled Gaussian mechanism (Mironov et al. 2019).

Wraps opacus's ``compute_rdp`` / ``get_privacy_spent`` over opacus's default grid of orders;
RDP composes by addition, so each (z, q, steps) block is computed once and summed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from privacy.accounting.base import Accountant, GaussianEvent

#: The Rényi orders opacus's RDPAccountant uses by default.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


class RDPAccountant(Accountant):
    """Rényi-DP accountant; the conversion to (epsilon, delta) uses the tight bound of
    Balle et al. 2020, as opacus does."""

    name = "rdp"

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        super().__init__()
        self.orders = tuple(float(a) for a in orders)

    def _epsilon(self, events: Sequence[GaussianEvent], delta: float) -> float:
        from opacus.accountants.analysis import rdp as analysis

        total = np.zeros(len(self.orders))
        for e in events:
            total = total + np.asarray(
                analysis.compute_rdp(q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.steps, orders=list(self.orders))
            )
        eps, _ = analysis.get_privacy_spent(orders=list(self.orders), rdp=total, delta=delta)
        return float(eps)
