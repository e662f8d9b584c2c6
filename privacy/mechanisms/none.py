"""``none``: no differential privacy. Updates pass unchanged and every release is unbounded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from privacy.accounting import GaussianEvent
from privacy.mechanisms.base import PrivacyMechanism


class NoPrivacy(PrivacyMechanism):
    """The identity mechanism; the ledger records every release with an unbounded epsilon."""

    name = "none"
    guarantee = "none"

    def client_transform(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the update unchanged."""
        return dict(update)

    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: float) -> dict[str, np.ndarray]:
        """Return the aggregate unchanged."""
        return dict(delta)

    def privacy_event(
        self, *, cohort_size: int, population: int, contributions: int, sample_rate: float = 1.0
    ) -> GaussianEvent:
        """A noiseless release of the cohort's aggregate (no guarantee)."""
        return GaussianEvent(noise_multiplier=0.0, sample_rate=min(1.0, cohort_size / max(population, 1)))

    def describe(self) -> dict[str, Any]:
        """No clipping and no noise."""
        return {"mode": self.name, "guarantee": self.guarantee, "clip_norm": None, "noise_multiplier": 0.0}
