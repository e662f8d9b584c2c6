"""Edge-popup supermasks over frozen signed-constant weights (Ramanujan et al. 2020), for rank voting.

A supermasked linear layer computes with ``W * M``: ``W`` holds frozen signed constants
``sign(w) * gain / sqrt(fan_in)`` (``w`` drawn from the run seed and the tensor's name, so every
party holds the same), and ``M`` keeps the ``kept`` edges with the highest scores. The scores are
the only trained tensor; the gradient reaches them straight through the mask (``dL/ds = dL/dM``).

It is a `torch.nn.utils.parametrize` parametrization of the layer's ``weight``: peft's LoRA layers
and the ``modules_to_save`` head keep calling ``self.weight`` and get ``W * M``. The scores are the
parametrization's ``original`` (a trainable parameter, so they travel as the adapter state), and
``W`` is a frozen parameter of the parametrization (a base weight: the model fingerprint covers
it). `secure_fl.models.save_adapter` bakes ``W * M`` into a plain ``weight`` when it saves the
adapter, so the saved adapter reloads as an ordinary peft adapter.

One ordering key everywhere: the score value itself (never ``|score|``), ascending, ties broken
by edge index (`order`). The mask, the client's ranking and the server's re-assignment all use it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.nn.utils import parametrize

#: Suffix of the scores' parameter name (what travels) on a supermasked layer.
SCORES_SUFFIX = ".parametrizations.weight.original"


def kept_edges(size: int, sparsity: float) -> int:
    """How many of ``size`` edges the mask keeps: ``ceil(sparsity * size)`` (at least one)."""
    return max(1, min(size, math.ceil(sparsity * size - 1e-9)))


def order(scores: np.ndarray) -> np.ndarray:
    """Edge indices from the lowest score to the highest, ties broken by the lower index first."""
    return np.argsort(np.ravel(scores), kind="stable")


def positions(scores: np.ndarray) -> np.ndarray:
    """Each edge's position in `order` (0 = lowest score), as int64 of ``scores``' shape.

    Examples
    --------
    >>> positions(np.array([0.1, 0.4, 0.3, 0.2])).tolist()
    [0, 3, 2, 1]
    """
    flat = np.ravel(scores)
    out = np.empty(flat.size, dtype=np.int64)
    out[order(flat)] = np.arange(flat.size, dtype=np.int64)
    return out.reshape(np.shape(scores))


def mask_of(scores: np.ndarray, kept: int) -> np.ndarray:
    """The 0/1 mask keeping the ``kept`` highest-ordered edges (the numpy twin of `TopKMask`)."""
    flat = np.zeros(np.size(scores), dtype=np.float32)
    flat[order(scores)[flat.size - kept :]] = 1.0
    return flat.reshape(np.shape(scores))


class TopKMask(torch.autograd.Function):
    """Forward: the 0/1 mask of the ``kept`` highest scores (stable order); backward: straight through."""

    @staticmethod
    def forward(ctx: object, scores: torch.Tensor, kept: int) -> torch.Tensor:
        """The mask (same shape as ``scores``)."""
        flat = scores.detach().reshape(-1)
        ranked = torch.argsort(flat, stable=True)
        mask = torch.zeros_like(flat)
        mask[ranked[flat.numel() - kept :]] = 1.0
        return mask.reshape(scores.shape)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The gradient w.r.t. the mask goes to the scores unchanged."""
        return grad, None


class Supermask(torch.nn.Module):
    """The parametrization ``scores -> constants * TopKMask(scores)``."""

    def __init__(self, constants: torch.Tensor, kept: int) -> None:
        super().__init__()
        #: The frozen signed constants ``W`` (a parameter, so the model fingerprint covers it).
        self.constants = torch.nn.Parameter(constants, requires_grad=False)
        self.kept = int(kept)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        """``W * M`` for the current scores."""
        mask: torch.Tensor = TopKMask.apply(scores, self.kept)  # type: ignore[no-untyped-call]
        return self.constants * mask


def _generator(seed: int, name: str, purpose: str) -> torch.Generator:
    stream = int.from_bytes(hashlib.sha256(f"{seed}/{name}/{purpose}".encode()).digest()[:7], "little")
    return torch.Generator().manual_seed(stream)


def signed_constants(name: str, shape: tuple[int, ...], *, seed: int, gain: float) -> torch.Tensor:
    """``sign(w) * gain / sqrt(fan_in)`` with ``w`` Gaussian from the seed and ``name`` only."""
    draw = torch.randn(shape, generator=_generator(seed, name, "sign"))
    sign = torch.where(draw >= 0, 1.0, -1.0)
    return (sign * (gain / math.sqrt(shape[-1]))).to(torch.float32)


def initial_scores(name: str, shape: tuple[int, ...], *, seed: int) -> torch.Tensor:
    """A random permutation of ``1/m, 2/m, ..., 1`` (m edges): distinct, positive, from the seed and ``name``."""
    size = math.prod(shape)
    perm = torch.randperm(size, generator=_generator(seed, name, "score"))
    return ((perm + 1).to(torch.float64) / size).to(torch.float32).reshape(shape)


def attach(module: torch.nn.Linear, name: str, *, seed: int, gain: float, sparsity: float) -> None:
    """Turn ``module.weight`` into scores over frozen signed constants (in place)."""
    shape = tuple(module.weight.shape)
    constants = signed_constants(name, shape, seed=seed, gain=gain)
    with torch.no_grad():
        module.weight.copy_(initial_scores(name, shape, seed=seed))
    module.weight.requires_grad_(True)
    parametrize.register_parametrization(module, "weight", Supermask(constants, kept_edges(module.weight.numel(), sparsity)))


def _parametrized(module: torch.nn.Module) -> bool:
    """Whether ``module`` itself holds parametrizations (peft's wrappers forward attribute lookups)."""
    return "parametrizations" in module._modules


def is_supermasked(model: torch.nn.Module) -> bool:
    """Whether any layer of ``model`` carries a `Supermask`."""
    return any(_parametrized(m) for m in model.modules())


@contextmanager
def baked(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, every supermasked layer of ``model`` holds a plain frozen ``weight = W * M``.

    What a saved adapter must hold, so it reloads as an ordinary peft adapter. The layers are put
    back as they were when the block ends. Done in place: a deep copy does not work (peft's
    ``ModulesToSaveWrapper`` forwards ``__deepcopy__`` to the wrapped layer and is lost), and
    torch's ``remove_parametrizations`` would edit the layer class. Hold the model's lock.
    """
    undo: list[tuple[torch.nn.Module, type, torch.nn.Module, list[str]]] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if not _parametrized(module):
                    continue
                parametrizations = module._modules["parametrizations"]
                assert parametrizations is not None
                names = list(parametrizations._modules)
                values = {name: getattr(module, name).detach().clone() for name in names}
                cls = type(module)
                module.__class__ = cls.__bases__[0]  # this layer only: the parametrized class is untouched
                del module._modules["parametrizations"]
                undo.append((module, cls, parametrizations, names))
                for name, value in values.items():
                    module.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
        yield model
    finally:
        for module, cls, parametrizations, names in reversed(undo):
            for name in names:
                module._parameters.pop(name, None)
            module._modules["parametrizations"] = parametrizations
            module.__class__ = cls
