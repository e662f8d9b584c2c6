"""The client-side order (secure_fl/client/mods.py): clip -> attack -> quantise -> noise share -> mask.

Each check uses plug-ins registered from the test, as a user would, and fails if the order broke.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from privacy.accounting import GaussianEvent
from privacy.mechanisms import MechanismContext, PrivacyMechanism, register_privacy_mechanism
from robustness.attacks import Attack, AttackContext, register_attack
from robustness.defenses import Defense, register_defense
from robustness.defenses.base import DefenseResult
from secure_fl.simulation import simulate
from tests.conftest import smoke_config
from tests.test_phases import _load_example

CLIP = 0.01
SEEN: dict[str, list[Any]] = {"contexts": [], "noise_inputs": [], "norms": [], "poisoned": []}


def _norm(update: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in update.values())))


class TinyClip(PrivacyMechanism):
    """Clip to a tiny norm; record what reaches the noise step (after quantisation)."""

    name = "test-tiny-clip"

    def clip(self, update: Mapping[str, np.ndarray], context: MechanismContext) -> dict[str, np.ndarray]:
        scale = min(1.0, CLIP / max(_norm(update), 1e-12))
        return {k: (np.asarray(v) * scale).astype(np.float32) for k, v in update.items()}

    def add_noise_share(self, quantised: Mapping[str, np.ndarray], context: MechanismContext) -> dict[str, np.ndarray]:
        SEEN["noise_inputs"].append(({v.dtype.name for v in quantised.values()}, context))
        return dict(quantised)

    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: int) -> dict[str, np.ndarray]:
        return dict(delta)

    def privacy_event(self, *, cohort_size: int, population: int, contributions: int) -> GaussianEvent:
        return GaussianEvent(noise_multiplier=0.0, sample_rate=1.0)


class WhiteBox(Attack):
    """Send -10x the mean of the honest (clipped) updates of the round (needs the context)."""

    name = "test-white-box"

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return dict(update)  # the v0.1 hook; this attack needs apply() and its context

    def apply(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator, context: AttackContext) -> dict[str, np.ndarray]:
        SEEN["contexts"].append((context.round, len(context.honest_updates)))
        honest = context.honest_updates
        return {k: (-10.0 * np.mean([h[k] for h in honest], axis=0)).astype(np.float32) for k in update}

    def poison_data(self, dataset: Any, *, rng: np.random.Generator) -> Any:
        SEEN["poisoned"].append(len(dataset))
        return dataset


class RecordNorms(Defense):
    """Keep everything; record the norm of every row the server aggregates."""

    name = "test-record-norms"

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        SEEN["norms"].append(np.linalg.norm(updates.astype(np.float64), axis=1).tolist())
        return DefenseResult(updates=updates, weights=weights)


def _register() -> None:
    """Registered inside the tests, not at import: registry-parametrised tests stay as they are."""
    register_privacy_mechanism("test-tiny-clip", TinyClip, force=True)
    register_attack("test-white-box", WhiteBox, force=True)
    register_defense("test-record-norms", RecordNorms, force=True)


def test_attack_acts_after_clipping_and_sees_the_honest_updates(tmp_path: Path) -> None:
    _register()
    for values in SEEN.values():
        values.clear()
    config = smoke_config(
        "privacy.mode=test-tiny-clip", "attack.kind=test-white-box", "attack.fraction=0.25",
        "robustness.defense=test-record-norms", "run.rounds=2",
    )
    simulate(config, tmp_path, progress=False)
    assert SEEN["poisoned"] and len(SEEN["poisoned"]) == 1  # one attacker, data hook called once
    assert SEEN["contexts"] == [(1, 3), (2, 3)]  # every round, after the 3 honest clients
    for norms in SEEN["norms"]:
        honest = sorted(norms)[:3]
        assert all(n <= CLIP * 1.0001 for n in honest)
        assert max(norms) > 5 * CLIP  # the attacker's update was not cancelled by clipping
    dtypes, context = SEEN["noise_inputs"][0]
    assert dtypes == {"float32"} and context.cohort_size == 4 and context.bucket_size == 1


def test_noise_share_lands_between_quantise_and_mask(tmp_path: Path) -> None:
    _load_example()
    _register()
    for values in SEEN.values():
        values.clear()
    config = smoke_config("privacy.mode=test-tiny-clip", "secure.mode=pairwise-demo", "run.rounds=1")
    simulate(config, tmp_path, progress=False)
    dtypes, context = SEEN["noise_inputs"][0]
    assert dtypes == {"int64"}  # the protocol's fixed-point integers, not floats and not masked words
    assert context.bucket_size == 4 and context.round == 1
