"""``rank-vote``: federated rank learning (FRL, Mozaffari et al., USENIX Security 2023).

Clients do not send weights or deltas. Every LoRA tensor (and the ``modules_to_save`` head) is an
edge-popup supermask over frozen signed-constant weights (`secure_fl.peft_agg.supermask`); clients
train the per-edge scores locally and send, per tensor, each edge's *position* in the ascending
order of their local scores (a permutation of ``0..m-1``). The server sums the positions (the
vote ``V``), orders the edges by ``V`` (ties by edge index) and writes the sorted initial scores
back in that order: the score multiset never changes, only the order is learned, and the mask
keeps the ``sparsity`` fraction of edges at the top of the global order.

Bounded influence: a vote is a permutation, so one client adds between 0 and ``m - 1`` to any
``V[e]`` and exactly ``m (m - 1) / 2`` in total. In ``plain`` mode the server checks every vote
(`RankVote.validate_update`) and rejects a non-permutation, naming the client and the tensor.
Votes are integer sums, so they also run under ``secagg+`` (an exact step-1 integer plan); the
server then sees only bucket sums and cannot check single votes (see docs/rank-voting.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from secure_fl.errors import ConfigError
from secure_fl.peft_agg import supermask
from secure_fl.peft_agg.base import AggregationRule
from secure_fl.tensors import Layout

#: float32 holds every integer below 2^24 exactly (positions travel as float32 tensors).
_EXACT = 1 << 24


class RankVote(AggregationRule):
    """Sum of rank positions over supermask scores; the top ``sparsity`` of the global order is kept.

    Parameters
    ----------
    sparsity : float
        Fraction of each tensor's edges the mask keeps, in (0, 1] (FRL's default 0.5): the
        ``ceil(sparsity * m)`` edges with the highest scores.
    gain : float
        Scale of the frozen signed constants ``sign(w) * gain / sqrt(fan_in)`` (> 0).
    """

    name = "rank-vote"
    sends = "each tensor's rank positions of its supermask scores (a permutation per tensor), no weights or deltas"
    paper = "https://www.usenix.org/conference/usenixsecurity23/presentation/mozaffari"
    uniform_weights = True
    integer_message = True

    def __init__(self, *, sparsity: float = 0.5, gain: float = 1.0) -> None:
        for key, value in (("sparsity", sparsity), ("gain", gain)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"rank-vote setting {key} must be a finite number, got {value!r}")
        if not 0 < sparsity <= 1:
            raise ValueError(f"rank-vote setting sparsity (fraction of edges kept) must lie in (0, 1], got {sparsity!r}")
        if not gain > 0:
            raise ValueError(f"rank-vote setting gain must be > 0, got {gain!r}")
        self.sparsity = float(sparsity)
        self.gain = float(gain)

    # ------------------------------------------------------------------ configuration
    def check_config(self, config: Any) -> None:
        """Refuse what breaks the vote: noise or clipping on positions, a defense that mixes rows."""
        if config.privacy.mode != "none":
            raise ConfigError(
                f"peft.rule='rank-vote' sends rank positions, which privacy.mode={config.privacy.mode!r} would clip, "
                "noise or train with DP-SGD into non-permutations; use privacy.mode='none'",
                key="privacy.mode",
            )
        if config.robustness.defense != "none":
            raise ConfigError(
                f"peft.rule='rank-vote' needs the raw sum of the votes, but robustness.defense="
                f"{config.robustness.defense!r} treats them as float deltas (drops, trims or re-weights rows); "
                "the vote bounds every client's influence itself: use robustness.defense='none'",
                key="robustness.defense",
            )
        if getattr(config.robustness, "reputation", False):
            raise ConfigError(
                "peft.rule='rank-vote' counts every client's vote once, but robustness.reputation re-weights the "
                "rows by reputation (fractional votes); set robustness.reputation = false",
                key="robustness.reputation",
            )
        if config.secure.bucket_size > 1 and config.secure.mode == "plain":
            raise ConfigError(
                "peft.rule='rank-vote' validates every vote as a permutation in plain mode; server-side bucketing "
                "(secure.bucket_size in plain mode) would average votes first: set secure.bucket_size = 0",
                key="secure.bucket_size",
            )

    # ------------------------------------------------------------------ the model
    def prepare_model(self, model: Any, *, seed: int) -> None:
        """Supermask every trainable 2-D ``weight`` of a linear layer (LoRA A/B, the head)."""
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        targets = [
            (name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and f"{name}.weight" in trainable
        ]
        for name, module in targets:
            supermask.attach(module, f"{name}.weight", seed=seed, gain=self.gain, sparsity=self.sparsity)

    def trained_keys(self, trainable: Sequence[str]) -> list[str]:
        """Only the scores train; biases and any other tensor stay frozen as built."""
        return [name for name in trainable if name.endswith(supermask.SCORES_SUFFIX)]

    # ------------------------------------------------------------------ the message
    def client_message(
        self, local: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], keys: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Per tensor, each edge's position in the ascending order of the local scores (float32, exact)."""
        out = {}
        for key in keys:
            if np.size(local[key]) >= _EXACT:
                raise ValueError(f"tensor {key!r} has {np.size(local[key])} edges; rank-vote positions need fewer than 2^24")
            out[key] = supermask.positions(np.asarray(local[key])).astype(np.float32)
        return out

    def validate_update(self, update: Mapping[str, np.ndarray]) -> None:
        """Refuse a vote that is not, for every tensor, a permutation of ``0..m-1``."""
        for key, value in update.items():
            flat = np.ravel(value)
            expected = np.arange(flat.size, dtype=np.float64)
            if not np.array_equal(np.sort(flat.astype(np.float64)), expected):
                counts = np.bincount(np.clip(flat, 0, flat.size).astype(np.int64), minlength=flat.size + 1)
                outside = int(np.count_nonzero((flat < 0) | (flat > flat.size - 1) | (flat != np.floor(flat))))
                missing = int(np.count_nonzero(counts[: flat.size] == 0))
                raise ValueError(
                    f"tensor {key!r}: the vote is not a permutation of 0..{flat.size - 1} "
                    f"({outside} value(s) not an integer in range, {missing} position(s) missing)"
                )

    # ------------------------------------------------------------------ the vote
    def aggregate(self, updates: np.ndarray, weights: np.ndarray, layout: Layout) -> np.ndarray:
        """The vote sums ``V = sum_b n_b * mean_b`` (raw sums: ``n_b`` clients of bucket ``b``).

        The pipeline weights every bucket by its number of clients (`uniform_weights`), so
        ``weights @ updates`` is the sum of the positions. Refused unless ``V`` is integral,
        every ``V[e]`` lies in ``[0, n (m - 1)]`` and each tensor's total is ``n m (m - 1) / 2``.
        """
        weights = np.asarray(weights, dtype=np.float64)
        voters = float(np.sum(weights))
        if updates.shape[0] == 0 or not (np.isfinite(weights).all() and (weights > 0).all()):
            raise ValueError(f"rank-vote needs at least one vote and positive client counts, got {weights.tolist()}")
        n = round(voters)
        if abs(voters - n) > 1e-6:
            raise ValueError(f"rank-vote needs whole client counts as weights, got {weights.tolist()}")
        raw = np.asarray(weights @ updates.astype(np.float64), dtype=np.float64)
        votes: np.ndarray = np.rint(raw)
        sizes = np.asarray(layout.sizes, dtype=np.int64)
        if n * (int(sizes.max(initial=1)) - 1) >= _EXACT:
            raise ValueError(f"rank-vote: {n} votes over {int(sizes.max())} edges exceed 2^24, the exact float32 range")
        if raw.size and np.abs(raw - votes).max() > 0.25:
            worst = int(np.argmax(np.abs(raw - votes)))
            raise ValueError(f"rank-vote: the vote sum is not integral (coordinate {worst}: {raw[worst]!r})")
        edges = np.repeat(sizes, sizes)
        bad = np.flatnonzero((votes < 0) | (votes > n * (edges - 1)))
        if bad.size:
            raise ValueError(f"rank-vote: {bad.size} vote sum(s) outside [0, n (m - 1)] for n = {n} (first: coordinate {int(bad[0])})")
        if sizes.size:
            totals = np.add.reduceat(votes, np.asarray(layout.offsets, dtype=np.int64)) if votes.size else np.zeros(0)
            wrong = np.flatnonzero(totals != n * sizes * (sizes - 1) / 2)
            if wrong.size:
                name = layout.names[int(wrong[0])]
                raise ValueError(f"rank-vote: the vote sum of tensor {name!r} totals {totals[wrong[0]]:g}, not n m (m - 1) / 2 for n = {n}")
        return votes

    def apply(self, global_state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Re-assign each voted tensor's scores: edge ``g[j]`` gets the ``j``-th smallest score.

        ``g = argsort(V)``, ties by edge index. The scores are the current global ones, whose
        multiset is the initial one (every round only reorders it), so this writes back the sorted
        initial scores and the mask keeps the top of ``g``.
        """
        new_state = {name: np.array(value, dtype=np.float32, copy=True) for name, value in global_state.items()}
        for name, votes in delta.items():
            current = new_state[name]
            flat = np.empty(current.size, dtype=np.float32)
            flat[supermask.order(votes)] = np.sort(current, axis=None)
            new_state[name] = flat.reshape(current.shape)
        return new_state

    def mask(self, scores: np.ndarray) -> np.ndarray:
        """The 0/1 mask these scores select (what every party's forward pass uses)."""
        return supermask.mask_of(scores, supermask.kept_edges(int(np.size(scores)), self.sparsity))
