"""``plain``: no secure aggregation. The server sees every client's update.

Useful for debugging and for defenses that need individual updates. Every client is its own
bucket, so the later stages see exactly what each client sent; reports flag this mode loudly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from protocols.secagg.base import BucketSum, Contribution, SecureAggregation
from protocols.wire.serde import TensorSpec


class PlainAggregation(SecureAggregation):
    """Send the float32 update as it is; hand on one bucket per client."""

    name = "plain"
    reveals_individual_updates = True

    def encode(self, update: Mapping[str, np.ndarray], *, weight: float) -> dict[str, np.ndarray]:
        """Return the update as little-endian float32 arrays (the weight travels in the header)."""
        return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in update.items()}

    def payload_spec(self, update_spec: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """The payload has the update's layout, in float32."""
        return {key: TensorSpec(key, "float32", spec.shape) for key, spec in update_spec.items()}

    def aggregate(self, contributions: Sequence[Contribution]) -> list[BucketSum]:
        """One bucket per client: ``total = weight * update`` in float64 (inputs were validated on arrival).

        float64 keeps ``weight * update`` finite for every finite float32 update and any weight the
        coordinator admits (at most ``run.max_weight``); a float32 product overflows to infinity.
        """
        buckets = []
        for contribution in contributions:
            weight = np.float64(contribution.weight)
            total = {key: value.astype(np.float64) * weight for key, value in contribution.tensors.items()}
            buckets.append(BucketSum(total=total, weight=contribution.weight, members=(contribution.client_id,)))
        return buckets
