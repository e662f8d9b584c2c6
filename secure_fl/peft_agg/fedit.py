"""``fedit``: FedAvg over every LoRA tensor (FedIT / Shepherd, Zhang et al., ICASSP 2024).

A and B are averaged separately, weighted by the clients' example counts. Inexact for LoRA
(``mean(B) @ mean(A) != mean(B @ A)``) but linear, so it runs under every secure mode.

Heterogeneous ranks (``[peft.rule_params] max_rank = R``, HetLoRA-style zero-padding, Cho et
al., EMNLP 2024): the global adapter has rank ``R`` (the server's ``peft.r``) and each client
trains a rank ``r_i <= R`` of its own (its ``peft.r``, or ``secure-fl-client --lora-rank``):
the leading ``r_i`` ranks of the global adapter (`hooks.leading_block`). The client zero-pads
its delta to rank ``R`` *before* the upload (`hooks.zero_pad`), so every upload has the global
shapes and the weighted mean of the padded deltas is a plain sum: it runs under secagg+, bfv
and ckks as well, and the server never learns a client's rank from its upload's shapes. ``R``
is a setting (not read from the server's adapter) because the secure modes plan their
messages before the first global adapter arrives. Every client keeps the server's scaling
``alpha / r`` (refused at Join otherwise, naming ``peft.alpha``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from protocols.wire.serde import TensorSpec
from secure_fl.errors import ConfigError
from secure_fl.peft_agg.base import AggregationRule
from secure_fl.peft_agg.hooks import leading_block, zero_pad
from secure_fl.peft_agg.ranks import client_rank_specs, config_scaling, global_rank, lora_rank_info, rank_axis
from secure_fl.tensors import Layout


def weighted_mean(updates: np.ndarray, weights: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(p, rows, mean)``: normalised weights, the rows in float64 and ``sum_i p_i u_i``.

    The one place every rule checks its weights: ``ValueError`` naming ``rule`` for non-finite or
    negative weights, no rows, or a zero total.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError(f"{rule} needs finite, non-negative weights, got {weights.tolist()}")
    total = float(np.sum(weights))
    if updates.shape[0] == 0 or total <= 0:
        raise ValueError(f"{rule} needs at least one update with positive weight")
    p = weights / total
    rows = updates.astype(np.float64)
    return p, rows, p @ rows


class WeightedMean(AggregationRule):
    """The weighted mean of the rows: the aggregation of every linear rule (fedit, ffa-lora, fed-sb)."""

    name = "weighted-mean"

    def aggregate(self, updates: np.ndarray, weights: np.ndarray, layout: Layout) -> np.ndarray:
        """Return ``sum_i w_i u_i / sum_i w_i``."""
        return weighted_mean(updates, weights, self.name)[2].astype(np.float32)


class FedIT(WeightedMean):
    """Weighted mean of each trainable tensor (optionally over zero-padded per-client ranks).

    Parameters
    ----------
    max_rank:
        0 (default): every client has the server's ``peft.r``. ``R > 0``: the global adapter's
        rank, which must equal the server's ``peft.r``; clients may train any rank up to ``R``
        and pad their uploads to it.
    """

    name = "fedit"
    sends = "the change of every trained adapter tensor (LoRA A and B of each target module, and the head)"
    paper = "https://arxiv.org/abs/2305.05644"

    def __init__(self, *, max_rank: int = 0) -> None:
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0:
            raise ValueError(f"max_rank must be an integer >= 0 (0: one rank for all), got {max_rank!r}")
        self.max_rank = max_rank
        self.aligns_on_client = max_rank > 0
        self._scaling: float | None = None

    def check_config(self, config: Any) -> None:
        """Refuse a ``peft.r`` above ``max_rank``; remember this party's ``alpha / r`` (the server's)."""
        if self.max_rank and config.peft.r > self.max_rank:
            raise ConfigError(
                f"peft.r={config.peft.r} is above peft.rule_params.max_rank={self.max_rank} (the global adapter's "
                "rank): set peft.r <= max_rank (on the server, peft.r = max_rank)", key="peft.r",
            )
        self._scaling = config_scaling(config)

    # ------------------------------------------------------------------ per-client ranks
    def join_info(self, model: Any) -> dict[str, str]:
        """The client's LoRA rank and alpha (with ``max_rank``)."""
        return lora_rank_info(model) if self.max_rank else {}

    def client_spec(self, info: Mapping[str, str], specs: Mapping[str, TensorSpec]) -> Mapping[str, TensorSpec] | None:
        """Refuse a rank above ``max_rank`` or another scaling; the upload keeps the global specs."""
        if self.max_rank:
            rank = global_rank(specs)
            if rank != self.max_rank:
                raise ValueError(
                    f"the server's peft.r={rank} differs from peft.rule_params.max_rank={self.max_rank}: "
                    "the server's adapter must have the maximum rank (set peft.r = max_rank on the server)"
                )
            client_rank_specs(info, specs, rule=self.name, scaling=self._scaling)
        return None

    def to_client(self, global_state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """The leading ``r_i`` ranks of the global adapter."""
        return leading_block(global_state, shapes)

    def upload_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The client's shapes with every LoRA rank axis at ``max_rank``."""
        out = {}
        for name, shape in shapes.items():
            axis = rank_axis(name)
            out[name] = shape if axis is None else tuple(self.max_rank if i == axis else s for i, s in enumerate(shape))
        return out

    def align(self, update: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
        """Zero-pad to the global rank (on the client; a no-op on the server's global-shaped rows)."""
        return zero_pad(update, layout) if self.max_rank else dict(update)
