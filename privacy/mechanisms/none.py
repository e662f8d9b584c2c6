"""``none``: no differential privacy. Updates pass unchanged and nothing is accounted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from privacy.mechanisms.base import PrivacyMechanism


class NoPrivacy(PrivacyMechanism):
    """The identity mechanism; reports must state that no DP guarantee holds."""

    name = "none"

    def client_transform(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the update unchanged."""
        return dict(update)

    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: int) -> dict[str, np.ndarray]:
        """Return the aggregate unchanged."""
        return dict(delta)

    def ledger_entry(self, *, round: int, cohort_size: int, contributions: int) -> dict[str, Any] | None:
        """Nothing is spent, so there is no ledger line."""
        return None

    def describe(self) -> dict[str, Any]:
        """No guarantee: say so."""
        return {"mode": self.name, "guarantee": "none"}
