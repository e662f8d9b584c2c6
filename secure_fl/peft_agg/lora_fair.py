"""``lora-fair``: FedIT plus a server-side correction of B (LoRA-FAIR, Bian et al., ICCV 2025).

FedIT's ``B̄ Ā`` misses the ideal ``ΔW* = sum_i p_i B_i A_i`` by the cross terms. LoRA-FAIR keeps
Ā and looks for a residual ΔB on B̄ that points the product back at ΔW*::

    ΔB = argmin  [1 - cos(ΔW*, (B̄ + ΔB) Ā)] + λ ||ΔB||_F

solved on the server with ``steps`` steps of Adam (torch, every LoRA layer of one shape at
once), ``lr`` being relative to the RMS of B̄ (so the setting does not depend on B's scale).
The best iterate is kept, ΔB = 0 included, so the objective is never worse than FedIT's.
Clients restart from ``(Ā, B̄ + ΔB)`` ("Avg-Initial"); the base weights never change. Every client
has the same rank. It needs each client's own factors (the products), so it is refused under
secure modes that reveal only sums, and wherever rows are mixed or the server adds noise.

Clients upload their trained adapter (not the delta): the server needs ``B_i`` and ``A_i``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from secure_fl.peft_agg.base import AggregationRule
from secure_fl.peft_agg.fedit import weighted_mean
from secure_fl.peft_agg.flora import refuse_mixed_rows
from secure_fl.peft_agg.ranks import lora_pairs
from secure_fl.tensors import Layout


class LoRAFAIR(AggregationRule):
    """FedIT's means, then B̄ corrected by a few server-side optimisation steps.

    Parameters
    ----------
    lam:
        Weight λ of ``||ΔB||_F`` (0.01 in the paper; 0 fits best, a larger λ keeps B̄ closer).
    steps:
        Adam steps per LoRA layer and round (0 gives FedIT).
    lr:
        Adam step size relative to the RMS of B̄ (each entry moves about ``lr * rms(B̄)`` a step).
    """

    name = "lora-fair"
    sends = "each client's trained LoRA A_i and B_i and the head, individually (the server needs every B_i A_i)"
    paper = "https://arxiv.org/abs/2411.14961"
    needs_individual_updates: ClassVar[bool] = True

    def __init__(self, *, lam: float = 0.01, steps: int = 50, lr: float = 0.01) -> None:
        if not (np.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if not (np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self.lam = float(lam)
        self.steps = steps
        self.lr = float(lr)

    def check_config(self, config: Any) -> None:
        """Refuse row mixing and central noise (the correction reads every client's product)."""
        refuse_mixed_rows(config, self.name)

    def client_message(
        self, local: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], keys: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """The trained tensors themselves: the server needs each ``B_i A_i``."""
        return {key: np.array(local[key], dtype=np.float32) for key in keys}

    def aggregate(self, updates: np.ndarray, weights: np.ndarray, layout: Layout) -> np.ndarray:
        """The weighted mean of every tensor, with ``B̄ + ΔB`` for every LoRA pair."""
        p, rows, out = weighted_mean(updates, weights, self.name)
        index = {n: (o, s, sh) for n, o, s, sh in zip(layout.names, layout.offsets, layout.sizes, layout.shapes)}
        groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[str, str]]] = {}
        for a_name, b_name in lora_pairs(layout.names):
            groups.setdefault((index[a_name][2], index[b_name][2]), []).append((a_name, b_name))
        for (a_shape, b_shape), pairs in groups.items():  # one batched solve per layer shape
            a_rows = np.stack([rows[:, index[a][0]:index[a][0] + index[a][1]].reshape(-1, *a_shape) for a, _ in pairs])
            b_rows = np.stack([rows[:, index[b][0]:index[b][0] + index[b][1]].reshape(-1, *b_shape) for _, b in pairs])
            target = np.einsum("j,ljor,ljri->loi", p, b_rows, a_rows)  # ΔW* per layer
            a_mean = np.einsum("j,ljri->lri", p, a_rows)
            b_mean = np.einsum("j,ljor->lor", p, b_rows)
            corrected = b_mean + correction(target, b_mean, a_mean, lam=self.lam, steps=self.steps, lr=self.lr)
            for k, (_, b_name) in enumerate(pairs):
                offset, size, _ = index[b_name]
                out[offset:offset + size] = corrected[k].reshape(-1)
        return out.astype(np.float32)

    def apply(self, global_state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global adapter is the aggregate itself (clients sent their adapters, not deltas)."""
        return {name: np.array(delta.get(name, value), dtype=np.float32) for name, value in global_state.items()}


def misfit(target: np.ndarray, b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``1 - cos(target_l, b_l a_l)`` per layer ``l`` (Frobenius inner product); 0 where either side is 0."""
    product = b @ a
    inner = np.einsum("loi,loi->l", target, product)
    norms = np.linalg.norm(target.reshape(len(target), -1), axis=1) * np.linalg.norm(product.reshape(len(product), -1), axis=1)
    result: np.ndarray = 1.0 - np.divide(inner, norms, out=np.ones_like(inner), where=norms > 0)
    return result


def correction(
    target: np.ndarray, b_mean: np.ndarray, a_mean: np.ndarray, *, lam: float, steps: int, lr: float
) -> np.ndarray:
    """ΔB ``(L, d_out, r)`` minimising ``1 - cos(target, (B̄ + ΔB) Ā) + lam ||ΔB||_F`` per layer.

    Adam on all ``L`` layers at once; the best iterate per layer (ΔB = 0 included) is returned.
    Layers whose ΔW* or Ā is zero keep ΔB = 0.
    """
    if steps == 0:
        return np.zeros_like(b_mean)
    x = torch.from_numpy(target)
    a = torch.from_numpy(a_mean)
    b = torch.from_numpy(b_mean)
    scale = torch.sqrt(torch.mean(b ** 2, dim=(1, 2), keepdim=True)).clamp_min(1e-12)
    x_norm = torch.linalg.vector_norm(x, dim=(1, 2))
    live = (x_norm > 0) & (torch.linalg.vector_norm(a, dim=(1, 2)) > 0)

    def objective(d: torch.Tensor) -> torch.Tensor:
        y = (b + d) @ a
        cos = (x * y).sum(dim=(1, 2)) / (x_norm * torch.linalg.vector_norm(y, dim=(1, 2))).clamp_min(1e-300)
        penalty = torch.sqrt((d ** 2).sum(dim=(1, 2)) + 1e-30)  # ||ΔB||_F, differentiable at 0
        value: torch.Tensor = 1.0 - cos + lam * penalty
        return value

    # Adam's steps have the size of its lr per coordinate: scale ΔB by rms(B̄) so lr is relative.
    unit = torch.zeros(b_mean.shape, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([unit], lr=lr)
    with torch.no_grad():
        best_value = objective(torch.zeros_like(b))
    best = torch.zeros_like(b)
    for _ in range(steps):
        optimizer.zero_grad()
        values = objective(unit * scale)
        values.sum().backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        with torch.no_grad():
            now = unit * scale
            value = objective(now)
            better = (value < best_value) & live
            best = torch.where(better[:, None, None], now, best)
            best_value = torch.where(better, value, best_value)
    return best.detach().numpy()
