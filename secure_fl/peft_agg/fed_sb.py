"""``fed-sb``: LoRA-SB with only the r x r middle factor trained and averaged (Fed-SB, Singhal et al. 2025).

Every LoRA layer computes ``W = W0 + s B R A`` (``s = peft.alpha / peft.r``) with B and A fixed
and only ``R`` (r x r) trained and sent, with the ``modules_to_save`` head. Aggregation is the
weighted mean of R, which is exact: ``B (sum_i p_i R_i) A = sum_i p_i B R_i A``. The LoRA part of
an upload is ``r^2`` numbers per module whatever the layer's width; the rule is linear, so it runs
under every secure mode.

Parametrisation (peft has no LoRA-SB): `prepare_model` replaces each layer's ``lora_B["default"]``
by a `LatentB` module, ``x -> B (R x)``: two bias-free ``nn.Linear`` layers, ``latent`` (R,
trainable; ``...lora_B.default.latent.weight`` is what travels) and ``basis`` (B, frozen).
peft's forward ``lora_B(lora_A(dropout(x))) * s`` then computes ``s B R A x``, and `LatentB.weight`
(``B @ R``) is what peft's ``get_delta_weight`` and merges read. R being an ordinary ``nn.Linear``
called in the forward pass, opacus computes its per-example gradients (``privacy.mode='dp-sgd'``
trains R alone: r^2 noised numbers per module, no product of two noisy factors). The saved
adapter is a standard peft LoRA adapter: `folded` swaps each `LatentB` for a plain ``nn.Linear``
holding ``B' = B R`` while `secure_fl.models.save_adapter` saves, so ``PeftModel.from_pretrained``
reloads it and predicts what the server evaluated.

Initialisation (data-free, deterministic): the paper takes a truncated SVD of each target weight's
first-step full-fine-tuning gradient, which needs a batch that every party holds; we have none
(client data is private, and no public batch is part of a run). Instead B and A span the top-r
singular subspaces of the frozen base weight itself (as PiSSA does): ``W0 = U S V^T`` in float64,
``B = U_r``, ``A = V_r^T``, each singular pair's sign fixed so that the largest-magnitude entry of
``u_k`` is positive, and ``R0 = 0``, so the run starts exactly at the base model (as LoRA's B = 0
does) while the gradient ``s B^T G A^T`` of R is not zero. Every party computes it from the same
base weights (the Join fingerprint checks them; the run seed fixes a random base such as
``tiny-bert``); A and the basis B are frozen base weights covered by the fingerprint too. The SVD
is a full one of each target weight (seconds for a 4096 x 4096 weight on a CPU, once per build).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from secure_fl.errors import ModelError
from secure_fl.peft_agg.fedit import WeightedMean
from secure_fl.peft_agg.hooks import lora_layers

#: Suffix of R's parameter name (what travels), on every LoRA layer.
LATENT_SUFFIX = ".lora_B.default.latent.weight"


class LatentB(torch.nn.Module):
    """peft's ``lora_B`` as ``x -> B (R x)``: R (r x r) trainable, B (d_out x r) frozen."""

    def __init__(self, basis: torch.Tensor, latent: torch.Tensor) -> None:
        super().__init__()
        rank = int(basis.shape[1])
        if tuple(latent.shape) != (rank, rank):
            raise ValueError(f"R must be {rank} x {rank} for a basis of shape {tuple(basis.shape)}, got {tuple(latent.shape)}")
        self.latent = torch.nn.Linear(rank, rank, bias=False, dtype=latent.dtype)
        self.basis = torch.nn.Linear(rank, int(basis.shape[0]), bias=False, dtype=basis.dtype)
        with torch.no_grad():
            self.latent.weight.copy_(latent)
            self.basis.weight.copy_(basis)
        self.basis.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B (R x)``."""
        out: torch.Tensor = self.basis(self.latent(x))
        return out

    @property
    def weight(self) -> torch.Tensor:
        """``B @ R``: the ``d_out x r`` LoRA B that peft's ``get_delta_weight`` and merges read."""
        return self.basis.weight @ self.latent.weight


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r, V_r^T)`` of ``weight`` (``d_out x d_in``), in float64, with a deterministic sign per pair.

    Each pair ``(u_k, v_k)`` is flipped so that the first largest-magnitude entry of ``u_k`` is
    positive (an SVD fixes each pair only up to a common sign).
    """
    if not 1 <= rank <= min(weight.shape):
        raise ModelError(f"peft.r={rank} does not fit a {tuple(weight.shape)} weight: fed-sb needs r <= min(d_out, d_in)")
    u, _, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    u, vh = u[:, :rank], vh[:rank]
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(rank)])
    signs[signs == 0] = 1.0
    return u * signs, vh * signs[:, None]


class FedSB(WeightedMean):
    """Weighted mean of each layer's R (and the head) in ``W0 + s B R A``, B and A from the SVD of W0."""

    name = "fed-sb"
    sends = "the change of each r x r matrix R and of the head (B and A are frozen, from the SVD of the base weight)"
    paper = "https://arxiv.org/abs/2502.15436"

    def prepare_model(self, model: Any, *, seed: int) -> None:
        """Set A = V_r^T, insert `LatentB` (B = U_r, R = 0) in every LoRA layer (see the module docstring)."""
        layers = lora_layers(model)
        if not layers:
            raise ModelError("peft.rule='fed-sb' found no LoRA layer in the model (peft.target_modules must select Linear layers)")
        with torch.no_grad():
            for name, module in layers:
                lora_a, lora_b = module.lora_A["default"], module.lora_B["default"]
                if isinstance(lora_b, LatentB):
                    continue  # already shaped
                if not (isinstance(lora_a, torch.nn.Linear) and isinstance(lora_b, torch.nn.Linear)):
                    raise ModelError(f"peft.rule='fed-sb' supports LoRA on Linear layers only; {name!r} is {type(lora_a).__name__}")
                base = module.get_base_layer().weight
                w0 = base.T if getattr(module, "fan_in_fan_out", False) else base
                left, right = svd_factors(w0, int(lora_a.out_features))
                lora_a.weight.copy_(right.to(lora_a.weight.dtype))
                dtype = lora_b.weight.dtype
                latent = torch.zeros(left.shape[1], left.shape[1], dtype=dtype, device=lora_b.weight.device)
                module.lora_B["default"] = LatentB(left.to(dtype), latent).to(lora_b.weight.device)

    def trained_keys(self, trainable: Sequence[str]) -> list[str]:
        """The R's and every tensor outside the LoRA factors (the head); never A."""
        return [n for n in trainable if n.endswith(LATENT_SUFFIX) or not (".lora_A." in n or ".lora_B." in n)]


@contextmanager
def folded(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, every `LatentB` of ``model`` is a plain ``nn.Linear`` holding ``B' = B R``.

    What a saved adapter must hold, so it reloads as a standard peft LoRA adapter. The `LatentB`
    modules are put back when the block ends. Hold the model's lock (`secure_fl.models.BUILD_LOCK`).
    """
    undo: list[tuple[torch.nn.ModuleDict, str, LatentB]] = []
    try:
        with torch.no_grad():
            for module in list(model.modules()):
                lora_b = getattr(module, "lora_B", None)
                if not isinstance(lora_b, torch.nn.ModuleDict):
                    continue
                for key, layer in list(lora_b.items()):
                    if isinstance(layer, LatentB):
                        weight = layer.weight.detach().clone()
                        plain = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
                        plain.weight.copy_(weight)
                        lora_b[key] = plain
                        undo.append((lora_b, key, layer))
        yield model
    finally:
        for lora_b, key, layer in reversed(undo):
            lora_b[key] = layer
