"""The server half of a round's pipeline: secure aggregation -> defense -> PEFT rule -> DP.

Stages are looked up by name in their registries and built with their configured settings by
`Stages.from_config` (in `secure_fl.stages`, re-exported here), so the pipeline never changes
when a plug-in is added. The order is fixed by what each stage may see: the secure-aggregation protocol turns
uploads into bucket sums (one per client in ``plain`` mode); the defense runs across bucket means;
the PEFT rule turns the kept rows into the global delta; the privacy mechanism noises that delta.
What the release costs is accounted by the engine (`privacy.ledger`) before it is released.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocols.secagg import BucketSum, Contribution
from robustness.defenses._rules import bucket_means
from robustness.reputation import ReputationTracker, cosine_scores
from protocols.wire.serde import TensorSpec
from secure_fl.stages import Stages, describe_stage
from secure_fl.tensors import Layout

__all__ = ["AggregationOutcome", "ServerPipeline", "Stages", "describe_stage"]


@dataclass
class AggregationOutcome:
    """The new global state and what the stages reported.

    ``scored`` holds, when the run keeps reputations, the clients behind each row the defense saw
    and each row's cosine score against the aggregate; the engine folds them into the
    reputations only once the round is released.
    """

    state: dict[str, np.ndarray]
    excluded: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    scored: tuple[tuple[tuple[str, ...], ...], tuple[float, ...]] | None = None


class ServerPipeline:
    """Runs the server stages over one round's contributions.

    Parameters
    ----------
    stages, update_layout:
        The run's plug-ins and the layout of the tensors clients send.
    expected_contributions:
        Client-level DP: the public, fixed denominator of the released mean (see below).
    bucket_size:
        Plain mode only: average random buckets of this many individual updates before the
        defense (bucketing, Karimireddy, He and Jaggi 2022); 0 or 1 keeps one row per client.
        A protocol that buckets the cohort itself (secagg+) already hands over bucket sums.
    reputation:
        RFFL reputations: rows are weighted by the reputation of the clients behind them.
    """

    def __init__(
        self,
        stages: Stages,
        update_layout: Layout,
        *,
        expected_contributions: float | None = None,
        bucket_size: int = 0,
        reputation: ReputationTracker | None = None,
    ) -> None:
        self.stages = stages
        self.layout = update_layout
        #: Client-level DP (``uniform_weights``): the public, fixed denominator of the released mean
        #: (the planned cohort size), so the adapter does not reveal how many clients contributed.
        #: ``None``: the actual number of contributions (the v0.1 behaviour).
        self.expected_contributions = expected_contributions
        #: Server-side bucketing of revealed updates (plain mode); 0 or 1: none.
        self.bucket_size = bucket_size if stages.secure.reveals_individual_updates else 0
        self.reputation = reputation

    def payload_spec(self) -> dict[str, TensorSpec]:
        """What every upload must look like (validated before any stage sees it)."""
        return self.stages.secure.payload_spec(self.layout.specs())

    def aggregate(
        self,
        global_state: Mapping[str, np.ndarray],
        contributions: Sequence[Contribution],
    ) -> AggregationOutcome:
        """Turn a one-shot round's contributions into the next global adapter state."""
        buckets = self.stages.secure.aggregate(contributions)
        return self.aggregate_buckets(global_state, buckets, num_contributions=len(contributions))

    def rows_for(self, cohort_size: int) -> int:
        """How many rows the defense sees in a round of ``cohort_size`` revealed buckets/clients."""
        if self.bucket_size > 1:
            return math.ceil(cohort_size / self.bucket_size)
        return cohort_size

    def aggregate_buckets(
        self, global_state: Mapping[str, np.ndarray], buckets: Sequence[BucketSum], *, num_contributions: int
    ) -> AggregationOutcome:
        """Turn the protocol's bucket sums into the next global adapter state (rows aligned by the rule).

        Raises `robustness.errors.RobustnessError` when the defense refuses the round's rows
        (for example too few for its ``f``); nothing is released then.
        """
        rows = self.layout.stack([self.stages.rule.align(bucket.mean(), self.layout) for bucket in buckets])
        weights = np.asarray([bucket.weight for bucket in buckets], dtype=np.float64)
        uniform = bool(getattr(self.stages.privacy, "uniform_weights", False))
        if uniform or self.stages.rule.uniform_weights:  # client-level DP, votes: each client counts once
            weights = np.asarray([len(bucket.members) for bucket in buckets], dtype=np.float64)
        groups: list[tuple[str, ...]] = [tuple(bucket.members) for bucket in buckets]
        info: dict[str, Any] = {"buckets": len(buckets)}
        if self.bucket_size > 1 and len(groups) > 1:
            # A fresh secret permutation every round: nobody can arrange to share a bucket.
            rows, weights, index_groups = bucket_means(
                rows, weights, self.bucket_size, np.random.default_rng(secrets.randbits(128)))
            groups = [tuple(m for i in group for m in groups[i]) for group in index_groups]
            info["buckets"] = len(groups)
        if self.reputation is not None:
            # Reputation decides the shares; the total stays what it was (the fixed DP denominator
            # and any rule that reads the total weight see the same scale).
            shares = self.reputation.row_weights(groups, weights)
            weights = shares * (float(np.sum(weights)) / float(np.sum(shares)))
        defended = self.stages.defense.aggregate(rows, weights)
        delta_vector = self.stages.rule.aggregate(defended.updates, defended.weights, self.layout)
        scored = None
        if self.reputation is not None:
            scored = (tuple(groups), tuple(cosine_scores(rows, delta_vector).tolist()))
        denominator: float = num_contributions
        if uniform and self.expected_contributions is not None:
            # Fixed denominator (McMahan et al. 2018): release sum / m for the planned m, not sum / n.
            # Dividing by the actual n would let the noise scale z C / n tell n from n + 1.
            denominator = float(self.expected_contributions)
            delta_vector = delta_vector * (float(np.sum(defended.weights)) / denominator)
        delta = self.stages.privacy.server_transform(self.layout.unflatten(delta_vector), num_contributions=denominator)
        excluded = tuple(member for i in defended.excluded for member in groups[i])
        info.update(defended.info)
        return AggregationOutcome(self.stages.rule.apply(global_state, delta), excluded, info, scored)
