"""Where a rule's model and message hooks run: one code path for the server and every client.

`build_for_rule` builds the workload's model and lets the rule shape it (`shape_model`); the
server's `FederatedServer` and the client's `LocalTrainer` both call it, so every party
holds the same starting adapter and fingerprints the same model. `sync_base` applies
`AggregationRule.merge_into_base` exactly once per released adapter on any party.
`leading_block`, `zero_pad` and `fold_lora_into_base` are helpers for rules with
heterogeneous ranks and rules that merge into the base weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from secure_fl.errors import ModelError, RunError
from secure_fl.models import BUILD_LOCK, AdaptedModel, model_fingerprint, trainable_names
from secure_fl.peft_agg.base import AggregationRule
from secure_fl.tensors import Layout

if TYPE_CHECKING:
    from secure_fl.workload import Workload

#: Plan key (sent with every task) holding how many released adapters the server merged into its base.
MERGES_PLAN_KEY = "base_merges"


def shape_model(adapted: AdaptedModel, rule: AggregationRule, *, seed: int) -> AdaptedModel:
    """Run the rule's `prepare_model` and freeze what `trained_keys` leaves out (once per model).

    torch's global RNG is seeded with ``seed`` for the hook and restored afterwards, so a rule
    may draw from it deterministically without changing anything else in the run.
    """
    if adapted.shaped:
        return adapted
    model = adapted.model
    with BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rule.prepare_model(model, seed=seed)
        names = trainable_names(model)
        trained = set(rule.trained_keys(names))
        unknown = sorted(trained - set(names))
        if unknown:
            raise ModelError(f"peft.rule={rule.name!r} trains tensors the model does not train: {unknown[:3]}")
        for name, param in model.named_parameters():
            if param.requires_grad and name not in trained:
                param.requires_grad_(False)
    adapted.trainable_names = trainable_names(model)
    if not adapted.trainable_names:
        raise ModelError(f"peft.rule={rule.name!r} left the model with no trained tensor")
    adapted.shaped = True
    return adapted


def build_for_rule(workload: Workload, rule: AggregationRule, *, seed: int) -> AdaptedModel:
    """``workload.build(seed=seed)`` shaped by ``rule``: the model every party starts from."""
    return shape_model(workload.build(seed=seed), rule, seed=seed)


def rule_fingerprint(model: torch.nn.Module, rule: AggregationRule) -> str:
    """The model fingerprint compared at Join (trained tensors' shapes left out for per-client shapes)."""
    return model_fingerprint(model, trainable_shapes=not own_shapes(rule))


def own_shapes(rule: AggregationRule) -> bool:
    """Whether clients may hold trained tensors of their own shapes under ``rule`` (either side pads)."""
    return bool(rule.accepts_client_shapes or rule.aligns_on_client)


def trained_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the model's trained tensors, by name."""
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


def sync_base(rule: AggregationRule, adapted: AdaptedModel, state: Mapping[str, np.ndarray], *, merges: int) -> dict[str, np.ndarray]:
    """The state to train from (client) or apply to (server) when ``state`` is the ``merges``-th release.

    For a rule without `AggregationRule.merges_into_base` this is ``state`` itself. Otherwise
    ``merges`` counts the released adapters the server folded into its base, ``state`` being the
    last of them: a model that folded one fewer folds ``state`` now; one that already folded it
    (several clients sharing one model in simulation, a round that failed and is sent again)
    reuses the restart state. A party that missed a release cannot rebuild the base and stops.
    """
    if not rule.merges_into_base:
        return state if isinstance(state, dict) else dict(state)
    if adapted.merges_done == merges:
        return adapted.merge_start if adapted.merge_start is not None else dict(state)
    if adapted.merges_done + 1 == merges:
        start = rule.merge_into_base(adapted.model, state)
        adapted.merge_start = {k: np.array(v, dtype=np.float32, copy=True) for k, v in start.items()}
        adapted.merges_done = merges
        return adapted.merge_start
    raise RunError(
        f"peft.rule={rule.name!r} merges every released adapter into the base weights; this model merged "
        f"{adapted.merges_done} of them but the server has merged {merges}, so it missed a release and cannot "
        "rebuild the base (such rules need every client in every cohort: run.clients_per_round = run.num_clients)"
    )


def leading_block(state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Each tensor cut to its leading block of ``shapes[name]`` (HetLoRA: the first ``r_i`` ranks)."""
    out = {}
    for name, shape in shapes.items():
        value = np.asarray(state[name])
        if len(shape) != value.ndim or any(s > v for s, v in zip(shape, value.shape)):
            raise ModelError(f"tensor {name!r}: the client's shape {shape} does not fit in the global {value.shape}")
        out[name] = np.array(value[tuple(slice(0, s) for s in shape)], dtype=np.float32, copy=True)
    return out


def zero_pad(update: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """Each tensor zero-padded at the end of every axis to ``layout``'s shape (ranks up to the maximum)."""
    out = {}
    for name, shape in zip(layout.names, layout.shapes):
        value = np.asarray(update[name], dtype=np.float32)
        if value.ndim != len(shape) or any(v > s for v, s in zip(value.shape, shape)):
            raise ValueError(f"tensor {name!r} of shape {value.shape} does not fit in the global {shape}")
        padded = np.zeros(shape, dtype=np.float32)
        padded[tuple(slice(0, v) for v in value.shape)] = value
        out[name] = padded
    return out


def lora_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """``(name, module)`` of every peft LoRA layer holding the ``default`` adapter."""
    return [
        (name, module) for name, module in model.named_modules()
        if isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict) and "default" in module.lora_A
    ]


def fold_lora_into_base(model: torch.nn.Module) -> int:
    """Add ``scaling * B @ A`` of every LoRA layer to its base weight (in place); return how many layers.

    The adapter tensors are left as they are: a rule that merges then restarts them (e.g. B = 0)
    in the state it returns from `AggregationRule.merge_into_base`.
    """
    layers = lora_layers(model)
    with torch.no_grad():
        for _, module in layers:
            delta = module.get_delta_weight("default")
            module.base_layer.weight.add_(delta.to(module.base_layer.weight.dtype))
    return len(layers)


def merged_base_state(adapted: AdaptedModel, releases: int) -> dict[str, Any]:
    """What a checkpoint keeps of a merging rule's base: every LoRA layer's base weight and the counters.

    ``releases`` is how many adapters the server has released; ``merges_done`` how many of them
    are folded into these weights (one fewer between rounds: the next round folds the last one).
    """
    with torch.no_grad():
        weights = {name: module.base_layer.weight.detach().cpu().numpy().copy() for name, module in lora_layers(adapted.model)}
    if adapted.merges_done != releases - 1:  # after a release: every one folded but the newest
        raise RunError(f"merged base out of step: {adapted.merges_done} merges for {releases} releases")
    return {"releases": int(releases), "merges_done": int(adapted.merges_done), "weights": weights}


def restore_merged_base(adapted: AdaptedModel, base: Mapping[str, Any]) -> int:
    """Put `merged_base_state`'s weights back into ``adapted``'s LoRA layers; return the releases count.

    Raises `ModelError` naming the layer when the checkpoint's layers or shapes are not this model's.
    """
    weights = base["weights"]
    layers = dict(lora_layers(adapted.model))
    if set(weights) != set(layers):
        raise ModelError(f"the checkpoint's merged base covers layers {sorted(weights)[:3]}..., this model's LoRA "
                         f"layers are {sorted(layers)[:3]}... ({len(weights)} vs {len(layers)}): another model or peft.target_modules")
    with torch.no_grad():
        for name, module in layers.items():
            target = module.base_layer.weight
            value = torch.as_tensor(np.asarray(weights[name]))
            if tuple(value.shape) != tuple(target.shape):
                raise ModelError(f"merged base layer {name!r}: the checkpoint has shape {tuple(value.shape)}, "
                                 f"this model {tuple(target.shape)}")
            target.copy_(value.to(target.dtype))
    adapted.merges_done = int(base["merges_done"])
    adapted.merge_start = None
    return int(base["releases"])
