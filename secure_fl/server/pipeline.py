"""The server half of a round's pipeline: secure aggregation -> defense -> PEFT rule -> DP.

Stages are looked up by name in their registries, so the pipeline never changes when a plug-in
is added. The order is fixed by what each stage may see: the secure-aggregation protocol turns
uploads into bucket sums (one per client in ``plain`` mode); the defense runs across bucket means;
the PEFT rule turns the kept rows into the global delta; the privacy mechanism noises that delta.
What the release costs is accounted by the engine (`privacy.ledger`) before it is released.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.mechanisms import PrivacyMechanism, create_privacy_mechanism
from protocols.secagg import BucketSum, Contribution, SecureAggregation, create_secure_aggregation
from protocols.wire.serde import TensorSpec
from robustness.attacks import Attack, create_attack
from robustness.defenses import Defense, create_defense
from secure_fl.config import Config
from secure_fl.errors import ConfigError
from secure_fl.peft_agg import AggregationRule, create_rule
from secure_fl.tensors import Layout


@dataclass
class Stages:
    """The plug-ins of one run, built from the config (shared by server and client halves)."""

    secure: SecureAggregation
    defense: Defense
    rule: AggregationRule
    privacy: PrivacyMechanism
    attack: Attack

    @classmethod
    def from_config(cls, config: Config) -> Stages:
        """Instantiate every stage and refuse combinations that would break a promise."""
        stages = cls(
            secure=create_secure_aggregation(config.secure.mode),
            defense=create_defense(config.robustness.defense),
            rule=create_rule(config.peft.rule),
            privacy=create_privacy_mechanism(config.privacy.mode),
            attack=create_attack(config.attack.kind),
        )
        if stages.rule.needs_individual_updates and not stages.secure.reveals_individual_updates:
            raise ConfigError(
                f"peft.rule={config.peft.rule!r} needs every client's adapter, but secure.mode="
                f"{config.secure.mode!r} only reveals sums; use secure.mode='plain' or a linear rule",
                key="peft.rule",
            )
        return stages

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every stage's name, plug-in class and parameters, for ``run.json`` and the audit report."""
        return {
            "secure": describe_stage(self.secure),
            "defense": describe_stage(self.defense),
            "rule": describe_stage(self.rule),
            "privacy": describe_stage(self.privacy),
            "attack": describe_stage(self.attack),
        }

    def names(self) -> dict[str, str]:
        """Stage names as sent to clients in every task."""
        return {
            "secure": self.secure.name,
            "defense": self.defense.name,
            "rule": self.rule.name,
            "privacy": self.privacy.name,
        }


_OWN_PACKAGES = frozenset({"secure_fl", "privacy", "robustness", "protocols"})


def describe_stage(stage: object) -> dict[str, Any]:
    """Name, plug-in class, whether it ships with secure-fl, paper and JSON-safe parameters.

    Parameters come from the stage's ``describe()`` when it has one, else from its public
    attributes, so a user plug-in shows up in the report with its settings without extra code.
    """
    cls = type(stage)
    describe = getattr(stage, "describe", None)
    if callable(describe):
        raw = describe()
    else:  # public settings only: numbers, strings, flags (never arrays or other state)
        raw = {k: v for k, v in vars(stage).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
    return {
        "name": str(getattr(stage, "name", cls.__name__)),
        "plugin": f"{cls.__module__}.{cls.__qualname__}",
        "builtin": cls.__module__.split(".")[0] in _OWN_PACKAGES,
        "paper": str(getattr(cls, "paper", "") or ""),
        "params": json.loads(json.dumps(raw, default=str)),
    }


@dataclass
class AggregationOutcome:
    """The new global state and what the stages reported."""

    state: dict[str, np.ndarray]
    excluded: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


class ServerPipeline:
    """Runs the server stages over one round's contributions."""

    def __init__(self, stages: Stages, update_layout: Layout) -> None:
        self.stages = stages
        self.layout = update_layout

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

    def aggregate_buckets(
        self, global_state: Mapping[str, np.ndarray], buckets: Sequence[BucketSum], *, num_contributions: int
    ) -> AggregationOutcome:
        """Turn the protocol's bucket sums into the next global adapter state (rows aligned by the rule)."""
        rows = self.layout.stack([self.stages.rule.align(bucket.mean(), self.layout) for bucket in buckets])
        weights = np.asarray([bucket.weight for bucket in buckets], dtype=np.float64)
        defended = self.stages.defense.aggregate(rows, weights)
        delta_vector = self.stages.rule.aggregate(defended.updates, defended.weights, self.layout)
        delta = self.stages.privacy.server_transform(self.layout.unflatten(delta_vector), num_contributions=num_contributions)
        excluded = tuple(member for i in defended.excluded for member in buckets[i].members)
        info: dict[str, Any] = {"buckets": len(buckets), **defended.info}
        return AggregationOutcome(self.stages.rule.apply(global_state, delta), excluded, info)
