"""Per-client LoRA ranks: what a client declares at Join, how its specs are checked, how LoRA pairs are found.

Shared by the rules that let clients hold a LoRA rank of their own: ``fedit`` with
``[peft.rule_params] max_rank = R`` (zero-padded on the client, so sums work under every secure
mode) and ``flora`` (stacked on the server). Every client keeps the server's scaling
``s = alpha / r``: a client of rank ``r_i`` sets ``alpha_i = s * r_i`` (``secure-fl-client
--lora-rank R`` does it), so the leading ``r_i`` ranks of the global adapter mean the same
thing in the client's model as in the server's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from protocols.wire.serde import TensorSpec
from secure_fl.errors import ConfigError

#: Join ``info`` keys a client with its own rank declares.
RANK_KEY = "lora_rank"
ALPHA_KEY = "lora_alpha"
#: Relative tolerance on ``alpha / r`` between a client and the server.
SCALING_RTOL = 1e-6


def lora_rank_info(model: Any) -> dict[str, str]:
    """``{"lora_rank": r, "lora_alpha": alpha}`` of a peft model's ``default`` adapter."""
    config = model.peft_config["default"]
    return {RANK_KEY: str(int(config.r)), ALPHA_KEY: repr(float(config.lora_alpha))}


def rank_axis(name: str) -> int | None:
    """The rank axis of a LoRA tensor (0 for A, 1 for B), ``None`` for any other tensor."""
    if ".lora_A." in name:
        return 0
    if ".lora_B." in name:
        return 1
    return None


def global_rank(specs: Mapping[str, TensorSpec]) -> int:
    """The rank of the global adapter (the server's ``peft.r``), read from its LoRA specs."""
    ranks = {spec.shape[axis] for name, spec in specs.items() if (axis := rank_axis(name)) is not None}
    if len(ranks) != 1:
        raise ValueError(f"the global adapter's LoRA tensors have ranks {sorted(ranks)}; one rank is needed")
    return ranks.pop()


def client_rank_specs(
    info: Mapping[str, str], specs: Mapping[str, TensorSpec], *, rule: str, scaling: float | None
) -> dict[str, TensorSpec]:
    """The specs of a client that declared ``info``: the global ``specs`` with its own rank.

    Raises ``ValueError`` (the client is refused at Join, with this reason) when the rank is not
    within ``1..R`` or the client's ``alpha / r`` is not the server's ``scaling``.
    """
    if RANK_KEY not in info:
        raise ValueError(f"peft.rule={rule!r} needs the client's LoRA rank at Join ({RANK_KEY!r}); upgrade the client")
    rank = int(info[RANK_KEY])
    top = global_rank(specs)
    if not 1 <= rank <= top:
        raise ValueError(f"lora_rank {rank} is not within 1..{top} (the server's peft.r): set peft.r <= {top} on the client")
    if scaling is not None and ALPHA_KEY in info:
        own = float(info[ALPHA_KEY]) / rank
        if abs(own - scaling) > SCALING_RTOL * scaling:
            raise ValueError(
                f"peft.rule={rule!r} needs every client's LoRA scaling alpha/r equal to the server's ({scaling:g}), "
                f"but this client has peft.alpha={float(info[ALPHA_KEY]):g}, peft.r={rank} (scaling {own:g}): set "
                f"peft.alpha={scaling * rank:g} (secure-fl-client --lora-rank {rank} does it)"
            )
    out = {}
    for name, spec in specs.items():
        axis = rank_axis(name)
        shape = spec.shape if axis is None else tuple(rank if i == axis else s for i, s in enumerate(spec.shape))
        out[name] = TensorSpec(name, spec.dtype, shape)
    return out


def lora_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """``(A name, B name)`` of every LoRA layer among ``names`` (each A with the B of its layer)."""
    present = set(names)
    pairs = []
    for name in names:
        if ".lora_A." in name:
            partner = name.replace(".lora_A.", ".lora_B.")
            if partner not in present:
                raise ValueError(f"LoRA tensor {name!r} is sent without its B ({partner!r})")
            pairs.append((name, partner))
    return pairs


def with_lora_rank(config: Any, rank: int) -> Any:
    """``config`` with ``peft.r = rank`` and ``peft.alpha`` scaled by ``rank / peft.r`` (same ``alpha / r``)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"--lora-rank must be a positive integer, got {rank!r}", key="peft.r")
    alpha = config.peft.alpha * rank / config.peft.r
    return config.with_overrides([f"peft.r={rank}", f"peft.alpha={alpha!r}"])


def config_scaling(config: Any) -> float:
    """``peft.alpha / peft.r`` of a run configuration."""
    return float(config.peft.alpha) / int(config.peft.r)
