"""``fedit``: FedAvg over every LoRA tensor (FedIT / Shepherd, Zhang et al., ICASSP 2024).

A and B are averaged separately, weighted by the clients' example counts. Inexact for LoRA
(``mean(B) @ mean(A) != mean(B @ A)``) but linear, so it runs under every secure mode.
"""

from __future__ import annotations

import numpy as np

from secure_fl.peft_agg.base import AggregationRule
from secure_fl.tensors import Layout


class FedIT(AggregationRule):
    """Weighted mean of each trainable tensor."""

    name = "fedit"
    sends = "the change of every trained adapter tensor (LoRA A and B of each target module, and the head)"
    paper = "https://arxiv.org/abs/2305.05644"

    def aggregate(self, updates: np.ndarray, weights: np.ndarray, layout: Layout) -> np.ndarray:
        """Return ``sum_i w_i u_i / sum_i w_i``."""
        weights = np.asarray(weights, dtype=np.float64)
        if not (np.isfinite(weights).all() and (weights >= 0).all()):
            raise ValueError(f"{self.name} needs finite, non-negative weights, got {weights.tolist()}")
        total = float(np.sum(weights))
        if updates.shape[0] == 0 or total <= 0:
            raise ValueError(f"{self.name} needs at least one update with positive weight")
        return (weights @ updates.astype(np.float64) / total).astype(np.float32)
