"""``flora``: exact aggregation by stacking every client's LoRA factors (FLoRA, Wang et al., NeurIPS 2024).

Each round every client trains a fresh LoRA of its own rank ``r_i`` (B = 0, so its whole adapter
is its update) and uploads its factors ``(B_i, A_i)``. The server stacks them::

    B_stack = [B_1 | ... | B_K]        A_stack = [p_1 A_1; ...; p_K A_K]

so that ``s B_stack A_stack = sum_i p_i s B_i A_i`` exactly (no cross terms, unlike FedIT). The
stack is the released global adapter: the server's ``peft.r = R`` is its capacity (FLoRA's
stacked config ``r = K r_0``, ``alpha = K alpha_0``), zero-filled past ``sum_i r_i``. Every party
then folds it into its base weights (`merge_into_base`) and restarts from B = 0 and a fresh A
drawn from the released adapter itself, so all parties draw the same A without any seed
exchange. Tensors outside LoRA (the classifier head) are averaged as FedIT does.

Scaling: every client keeps the server's ``s = alpha / r`` (``alpha_i = s r_i``, checked at
Join), so each client's product is scaled by its own ``s_i = s`` and the merged update is
``sum_i p_i s_i B_i A_i``. A stack wider than ``R`` is re-factorised exactly (QR, then an SVD of
the small core) when its rank fits, and refused otherwise.

It needs every client's factors, so it is refused under secure modes that reveal only sums, and
under anything that mixes or re-weights rows by the others (buckets, robust defenses,
reputation) or adds noise to the server's aggregate (central DP): the stack is not a sum of
clipped contributions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from protocols.wire.serde import TensorSpec
from secure_fl.errors import ConfigError
from secure_fl.peft_agg.base import AggregationRule
from secure_fl.peft_agg.fedit import weighted_mean
from secure_fl.peft_agg.hooks import leading_block, lora_layers, zero_pad
from secure_fl.peft_agg.ranks import client_rank_specs, config_scaling, lora_pairs, lora_rank_info, rank_axis
from secure_fl.tensors import Layout

#: Relative size below which a singular value of the stacked product counts as zero.
RANK_RTOL = 1e-6


def refuse_mixed_rows(config: Any, rule: str) -> None:
    """Refuse what would mix or re-weight the per-client rows a product-based rule needs.

    Raises `ConfigError` naming the key: ``secure.bucket_size`` above 1, a robust
    ``robustness.defense``, ``robustness.reputation`` or a ``privacy.mode`` whose server adds the
    noise (its guarantee assumes a sum of clipped updates).
    """
    from privacy.mechanisms.registry import plugin_class as mechanism_class

    why = f"peft.rule={rule!r} combines each client's own LoRA factors (B_i, A_i)"
    if config.secure.bucket_size > 1:
        raise ConfigError(f"{why}, but secure.bucket_size={config.secure.bucket_size} averages several clients' "
                          "factors into one row; use secure.bucket_size = 0", key="secure.bucket_size")
    if config.robustness.defense != "none":
        raise ConfigError(f"{why}, but robustness.defense={config.robustness.defense!r} may mix or re-weight "
                          "rows coordinate by coordinate, which breaks the pairs; use robustness.defense='none'",
                          key="robustness.defense")
    if config.robustness.reputation:
        raise ConfigError(f"{why}, but robustness.reputation scores rows against a global update of another "
                          "shape; set robustness.reputation = false", key="robustness.reputation")
    if getattr(mechanism_class(config.privacy.mode), "server_noise", False):
        raise ConfigError(f"{why}, a non-linear function of the individual updates, but privacy.mode="
                          f"{config.privacy.mode!r} bounds one client's influence only on a sum of clipped updates; "
                          "use privacy.mode='dp-sgd' (sample-level DP on every client) or 'none'", key="privacy.mode")


class FLoRA(AggregationRule):
    """Stack the clients' LoRA factors into the global adapter, merge it into the base, restart."""

    name = "flora"
    sends = "each client's own LoRA factors A_i and B_i after training (its rank r_i) and the head, individually"
    paper = "https://arxiv.org/abs/2409.05976"
    needs_individual_updates: ClassVar[bool] = True
    accepts_client_shapes: ClassVar[bool] = True
    merges_into_base: ClassVar[bool] = True

    def __init__(self) -> None:
        self._scaling: float | None = None

    def check_config(self, config: Any) -> None:
        """Refuse row mixing and central noise; remember the server's scaling ``alpha / r``."""
        refuse_mixed_rows(config, self.name)
        self._scaling = config_scaling(config)

    # ------------------------------------------------------------------ per-client ranks
    def join_info(self, model: Any) -> dict[str, str]:
        """The client's LoRA rank and alpha."""
        return lora_rank_info(model)

    def client_spec(self, info: Mapping[str, str], specs: Mapping[str, TensorSpec]) -> Mapping[str, TensorSpec]:
        """The client's own rank (at most the server's), with the server's scaling."""
        return client_rank_specs(info, specs, rule=self.name, scaling=self._scaling)

    def to_client(self, global_state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """The leading ``r_i`` ranks of the restart adapter (B = 0 there, so only A's rows matter)."""
        return leading_block(global_state, shapes)

    def align(self, update: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
        """Zero-pad a client's factors to the global rank (zero ranks add nothing to the product)."""
        return zero_pad(update, layout)

    # ------------------------------------------------------------------ the message
    def client_message(
        self, local: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], keys: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """The trained LoRA factors themselves (their product is the update: B started at 0); deltas otherwise."""
        return {
            key: np.asarray(local[key] if rank_axis(key) is not None else local[key] - start[key], dtype=np.float32)
            for key in keys
        }

    def aggregate(self, updates: np.ndarray, weights: np.ndarray, layout: Layout) -> np.ndarray:
        """The stacked factors for every LoRA pair, the weighted mean for the other tensors."""
        p, rows, out = weighted_mean(updates, weights, self.name)
        index = {name: (offset, size, shape) for name, offset, size, shape in
                 zip(layout.names, layout.offsets, layout.sizes, layout.shapes)}
        for a_name, b_name in lora_pairs(layout.names):
            (a_at, a_size, (rank, d_in)), (b_at, b_size, (d_out, _)) = index[a_name], index[b_name]
            a_rows = rows[:, a_at:a_at + a_size].reshape(-1, rank, d_in)
            b_rows = rows[:, b_at:b_at + b_size].reshape(-1, d_out, rank)
            b_new, a_new = stack_factors(b_rows, a_rows, p, rank=rank, tensor=a_name)
            out[a_at:a_at + a_size] = a_new.reshape(-1)
            out[b_at:b_at + b_size] = b_new.reshape(-1)
        return out.astype(np.float32)

    def apply(self, global_state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """LoRA tensors become the stack; the others move by their mean delta."""
        new_state = {name: np.array(value, dtype=np.float32, copy=True) for name, value in global_state.items()}
        for name, value in delta.items():
            new_state[name] = np.array(value, dtype=np.float32) if rank_axis(name) is not None else new_state[name] + value
        return new_state

    # ------------------------------------------------------------------ the base weights
    def merge_into_base(self, model: Any, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add ``s B_stack A_stack`` to every LoRA layer's base weight; restart with B = 0 and a fresh A.

        Works on a model of any rank (a client's own): the product is computed from the released
        tensors, in float32 with torch on every party. The fresh A is drawn (peft's default
        uniform ``±1/sqrt(d_in)``) from a hash of the released adapter, so every party draws the same.
        """
        restart = {name: np.array(value, dtype=np.float32, copy=True) for name, value in state.items()}
        digest = hashlib.sha256()
        with torch.no_grad():
            for name, module in lora_layers(model):
                a_key, b_key = f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"
                a, b = torch.from_numpy(restart[a_key]), torch.from_numpy(restart[b_key])
                weight = module.base_layer.weight
                weight.add_((float(module.scaling["default"]) * (b @ a)).to(weight.dtype))
                digest.update(a_key.encode() + restart[a_key].tobytes() + restart[b_key].tobytes())
        rng = np.random.default_rng(int.from_bytes(digest.digest()[:16], "little"))
        for name in sorted(restart):
            if rank_axis(name) == 0:
                bound = 1.0 / np.sqrt(restart[name].shape[1])
                restart[name] = rng.uniform(-bound, bound, size=restart[name].shape).astype(np.float32)
            elif rank_axis(name) == 1:
                restart[name] = np.zeros_like(restart[name])
        return restart


def stack_factors(
    b_rows: np.ndarray, a_rows: np.ndarray, p: np.ndarray, *, rank: int, tensor: str = "lora_A"
) -> tuple[np.ndarray, np.ndarray]:
    """``(B, A)`` of rank ``rank`` with ``B A = sum_j p_j B_j A_j`` exactly (FLoRA stacking).

    ``b_rows`` is ``(m, d_out, r)``, ``a_rows`` ``(m, r, d_in)`` (zero-padded to one rank ``r``).
    Ranks that add nothing (a zero column of B_j or zero row of A_j, the padding) are dropped;
    if more than ``rank`` remain, the stack is re-factorised exactly through a QR of each factor
    and an SVD of the small core, and refused (``ValueError``) when its rank exceeds ``rank``.
    """
    m, d_out, r = b_rows.shape
    d_in = a_rows.shape[2]
    b_stack = b_rows.transpose(1, 0, 2).reshape(d_out, m * r)  # [B_1 | ... | B_m]
    a_stack = (p[:, None, None] * a_rows).reshape(m * r, d_in)  # [p_1 A_1; ...; p_m A_m]
    keep = (np.abs(b_stack).sum(axis=0) > 0) & (np.abs(a_stack).sum(axis=1) > 0)
    b_stack, a_stack = b_stack[:, keep], a_stack[keep]
    width = b_stack.shape[1]
    if width > rank:
        q_b, r_b = np.linalg.qr(b_stack)
        q_a, r_a = np.linalg.qr(a_stack.T)
        u, s, vt = np.linalg.svd(r_b @ r_a.T)
        needed = int(np.sum(s > RANK_RTOL * (s[0] if s.size else 0.0)))
        if needed > rank:
            raise ValueError(
                f"peft.rule='flora': the stacked update of {tensor!r} has rank {needed}, more than the global "
                f"adapter's rank peft.r={rank}; set the server's peft.r to at "
                "least the sum of the cohort's client ranks (FLoRA's stacked config: r = K r_0, alpha = K alpha_0) "
                "or give the clients smaller ranks (secure-fl-client --lora-rank)"
            )
        root = np.sqrt(s[:rank])
        b_stack = (q_b @ u[:, :rank]) * root
        a_stack = root[:, None] * (vt[:rank] @ q_a.T)
        width = rank
    b_out = np.zeros((d_out, rank))
    a_out = np.zeros((rank, d_in))
    b_out[:, :width], a_out[:width] = b_stack, a_stack
    return b_out, a_out
