"""``ffa-lora``: LoRA with a frozen, shared random A (FFA-LoRA, Sun, Li, Li, Ding, ICLR 2024).

Every party draws each LoRA A from the run seed and the tensor's name only (`draw_a`: its own
torch generator, so torch's global RNG state plays no part), writes it into the model and
freezes it; B starts at zero. Only B and the ``modules_to_save`` head are trained and sent.

Exact: A is common to every client, so the weighted mean of the B's times A is the weighted
mean of the clients' products, ``(sum_i p_i B_i) A = sum_i p_i B_i A``; FedIT's cross terms
``B_i A_j`` cannot occur. Linear (a weighted mean), so it runs under every secure mode. The
LoRA part of an upload is B alone: ``d_out * r`` of FedIT's ``(d_out + d_in) * r`` per module
(half for square weights). A frozen A is a base weight: the Join fingerprint covers it, so a
party that drew another A (other seed, other dtype, other code) is refused at Join.

DP: noise goes only on what is sent (B and the head), and the adapter's update ``B A`` is linear
in the noise (no noise x noise term, as with ``(B + xi_B)(A + xi_A)``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from secure_fl.errors import ModelError
from secure_fl.peft_agg.fedit import WeightedMean

#: What names a LoRA A / B factor in a peft model's parameter names.
A_PART = ".lora_A."
B_PART = ".lora_B."


def seeded_generator(seed: int, name: str, purpose: str) -> torch.Generator:
    """A CPU torch generator keyed by the run seed, a tensor name and a purpose only (SHA-256, 56 bits)."""
    stream = int.from_bytes(hashlib.sha256(f"{seed}/{name}/{purpose}".encode()).digest()[:7], "little")
    return torch.Generator().manual_seed(stream)


def draw_a(name: str, shape: tuple[int, ...], *, seed: int, scale: float = 1.0) -> torch.Tensor:
    """The frozen A of the tensor ``name``: float32 Gaussian, variance ``scale / d_in``, from the seed and ``name``.

    ``d_in = shape[-1]``. The same on every party and independent of torch's global RNG state.
    """
    generator = seeded_generator(seed, name, "ffa-lora/A")
    return torch.randn(shape, generator=generator, dtype=torch.float32) * math.sqrt(scale / shape[-1])


class FFALoRA(WeightedMean):
    """Weighted mean of B (and the head) over a LoRA A drawn from the run seed and frozen.

    Parameters
    ----------
    a_scale : float
        Variance of A's entries times ``d_in``: A ~ N(0, a_scale / d_in) (> 0). 1.0 makes the
        norm of ``A x`` about ``sqrt(r / d_in)`` times that of ``x``; 1/3 matches the variance
        of peft's default (Kaiming-uniform) A. With A frozen, ``a_scale``, ``peft.alpha`` and the learning rate
        act as one knob (the paper's remark): tune them together.
    """

    name = "ffa-lora"
    sends = "the change of each LoRA B and of the head (every A is frozen, drawn from the run seed, never sent)"
    paper = "https://arxiv.org/abs/2403.12313"

    def __init__(self, *, a_scale: float = 1.0) -> None:
        if isinstance(a_scale, bool) or not isinstance(a_scale, (int, float)) or not math.isfinite(a_scale) or a_scale <= 0:
            raise ValueError(f"ffa-lora setting a_scale (variance of A times d_in) must be a finite number > 0, got {a_scale!r}")
        self.a_scale = float(a_scale)

    def prepare_model(self, model: Any, *, seed: int) -> None:
        """Draw every LoRA A from the seed (`draw_a`, keyed by its parameter name); zero every B."""
        factors = [(n, p) for n, p in model.named_parameters() if A_PART in n or B_PART in n]
        if not any(A_PART in n for n, _ in factors):
            raise ModelError("peft.rule='ffa-lora' found no LoRA A in the model (peft.target_modules must select Linear layers)")
        with torch.no_grad():
            for name, param in factors:
                if A_PART in name:
                    param.copy_(draw_a(name, tuple(param.shape), seed=seed, scale=self.a_scale).to(param.dtype))
                else:
                    param.zero_()

    def trained_keys(self, trainable: Sequence[str]) -> list[str]:
        """Every trainable tensor but the A's: B and the head."""
        return [name for name in trainable if A_PART not in name]
