"""``dp-sgd``: sample-level DP only. Every client trains with DP-SGD (`privacy.dpsgd.DPSGD`, its
settings in ``[privacy.dp_sgd_params]``); the aggregate is released as it is.

The client-level part of this mode is empty: updates are not clipped as a whole and the server
adds no noise, so each release is recorded as a noiseless client-level event (the run-level,
client-level epsilon is unbounded) while the ledger line's ``sample_level`` field records every
contributing client's DP-SGD steps. For both guarantees, combine a client-level mode with
``[privacy] dp_sgd = true`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from privacy.accounting import GaussianEvent
from privacy.dpsgd import PAPER
from privacy.mechanisms.base import PrivacyMechanism


class SampleLevelOnly(PrivacyMechanism):
    """DP-SGD on the clients, nothing at client level (no settings here: see ``[privacy.dp_sgd_params]``)."""

    name = "dp-sgd"
    guarantee = (
        "sample-level (epsilon, delta)-DP of each client's training examples (DP-SGD on the client), against "
        "everyone including the server; no client-level guarantee"
    )
    paper = PAPER

    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: float) -> dict[str, np.ndarray]:
        """Return the aggregate unchanged (the noise was added on the clients, step by step)."""
        return dict(delta)

    def privacy_event(
        self, *, cohort_size: int, population: int, contributions: int, sample_rate: float = 1.0
    ) -> GaussianEvent:
        """At client level the release carries no noise: unbounded client-level epsilon."""
        return GaussianEvent(noise_multiplier=0.0, sample_rate=1.0)

    def describe(self) -> dict[str, Any]:
        """No client-level clipping or noise; the sample-level settings are described by `privacy.dpsgd.DPSGD`."""
        return {
            "mode": self.name,
            "guarantee": self.guarantee,
            "clip_norm": None,
            "noise_multiplier": 0.0,
            "client_level": "none: a client's data as a whole is not protected (client-level epsilon unbounded)",
        }
