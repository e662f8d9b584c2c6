"""``privacy.mode = "central"``: client-level DP-FedAvg (clip on the client, noise z*C on the sum at the server)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from privacy.mechanisms import MechanismContext, create_privacy_mechanism
from privacy.mechanisms.central import CentralDP, clip_update, secure_standard_normal
from protocols.secagg.base import BucketSum
from secure_fl.errors import ConfigError
from secure_fl.server.pipeline import ServerPipeline
from secure_fl.simulation import simulate
from secure_fl.stages import Stages
from secure_fl.tensors import Layout
from tests.conftest import smoke_config

FAST = settings(max_examples=60, deadline=None, database=None)
CONTEXT = MechanismContext(round=1, cohort_size=4, bucket_size=1)
CENTRAL = ["privacy.mode=central", "privacy.params.noise_multiplier=1.0", "privacy.params.clip_norm=1.0"]

_tensor = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
    elements=st.floats(-1e3, 1e3, width=32),
)
_update = st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), _tensor, min_size=1, max_size=5)


def _norm(update: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values()))


# ------------------------------------------------------------------------------ clipping


@FAST
@given(update=_update, clip_norm=st.floats(1e-3, 1e3), mode=st.sampled_from(["flat", "per-tensor"]))
def test_no_clipped_update_has_norm_above_c(update: dict[str, np.ndarray], clip_norm: float, mode: str) -> None:
    """Flat and per-tensor: the whole clipped update (and per tensor, each tensor) is within its bound."""
    mechanism = CentralDP(clip_norm=clip_norm, clip=mode)
    out = mechanism.clip(update, CONTEXT)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in update.items()}
    assert _norm(out) <= clip_norm
    if mode == "per-tensor":
        bound = clip_norm / math.sqrt(len(update))
        assert all(math.sqrt(float(np.sum(v.astype(np.float64) ** 2))) <= bound for v in out.values())


@FAST
@given(update=_update, mode=st.sampled_from(["flat", "per-tensor"]))
def test_an_update_within_its_bound_is_unchanged(update: dict[str, np.ndarray], mode: str) -> None:
    norms = [math.sqrt(float(np.sum(v.astype(np.float64) ** 2))) for v in update.values()]
    # a bound above the update's norm (flat) or above every tensor's norm times sqrt(k) (per tensor)
    clip_norm = (max(norms) * math.sqrt(len(update)) if mode == "per-tensor" else _norm(update)) * 1.01 + 1e-6
    out = CentralDP(clip_norm=clip_norm, clip=mode).clip(update, CONTEXT)
    for key, value in update.items():
        np.testing.assert_array_equal(out[key], value)


def test_clipping_scales_in_the_direction_of_the_update() -> None:
    out = clip_update({"a": np.array([3.0, 0.0], np.float32), "b": np.array([4.0], np.float32)}, clip_norm=1.0, per_tensor=False)
    np.testing.assert_allclose(out["a"], [0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(out["b"], [0.8], rtol=1e-5)
    per = clip_update({"a": np.array([3.0, 0.0], np.float32), "b": np.array([0.1], np.float32)}, clip_norm=2.0, per_tensor=True)
    np.testing.assert_allclose(per["a"], [math.sqrt(2.0), 0.0], rtol=1e-5)  # C / sqrt(2) for each of 2 tensors
    np.testing.assert_array_equal(per["b"], [np.float32(0.1)])  # within its share: unchanged


def test_a_non_finite_update_is_refused() -> None:
    with pytest.raises(ValueError, match="not finite"):
        CentralDP().clip({"a": np.array([np.nan, 1.0], np.float32)}, CONTEXT)


# ------------------------------------------------------------------------------ noise


def test_secure_normal_draws_are_standard() -> None:
    draws = secure_standard_normal(200_001)
    assert draws.shape == (200_001,)
    assert abs(draws.mean()) < 5 / math.sqrt(draws.size)
    assert abs(draws.var() - 1) < 5 * math.sqrt(2 / draws.size)


@pytest.mark.parametrize("seed", [None, 7])
def test_noise_on_the_sum_has_std_z_times_c(seed: int | None) -> None:
    """2,000 releases of a 5-coordinate mean over n = 4 clipped updates: n * (noised - mean) has std z*C.

    Chi-square on 10,000 values: the sample variance's relative standard error is sqrt(2/10,000) =
    1.4%, so the 10% tolerance is 7 standard errors wide.
    """
    z, c, n = 1.5, 0.4, 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mechanism = CentralDP(clip_norm=c, noise_multiplier=z, insecure_seed=seed)
    mean = {"w": np.linspace(-0.1, 0.1, 5).astype(np.float32)}
    noise = np.stack([mechanism.server_transform(mean, num_contributions=n)["w"] - mean["w"] for _ in range(2000)])
    on_sum = noise.astype(np.float64) * n
    assert abs(on_sum.mean()) < 5 * z * c / math.sqrt(on_sum.size)
    assert on_sum.std() == pytest.approx(z * c, rel=0.10)


def test_the_pipeline_noises_the_uniform_mean_of_the_clipped_rows() -> None:
    """Plain buckets with unequal weights: the released delta is sum/n + noise of std z*C/n (weights ignored)."""
    config = smoke_config(*CENTRAL, "privacy.params.noise_multiplier=0.0")
    stages = Stages.from_config(config)
    layout = Layout(("w",), ((3,),))
    rows = [np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 0.5])]
    buckets = [BucketSum({"w": r * w}, w, (f"c{i}",)) for i, (r, w) in enumerate(zip(rows, [1.0, 10.0, 100.0]))]
    outcome = ServerPipeline(stages, layout).aggregate_buckets({"w": np.zeros(3, np.float32)}, buckets, num_contributions=3)
    np.testing.assert_allclose(outcome.state["w"], np.sum(rows, axis=0) / 3, rtol=1e-6)


def test_the_released_mean_has_a_fixed_denominator_so_it_does_not_reveal_the_count() -> None:
    """3 of 4 planned clients contribute: the delta is sum / 4 (not sum / 3) and the noise std z*C / 4."""
    config = smoke_config(*CENTRAL, "privacy.params.noise_multiplier=0.0")
    stages = Stages.from_config(config)
    layout = Layout(("w",), ((3,),))
    rows = [np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 0.5])]
    buckets = [BucketSum({"w": r}, 1.0, (f"c{i}",)) for i, r in enumerate(rows)]
    pipeline = ServerPipeline(stages, layout, expected_contributions=4)
    outcome = pipeline.aggregate_buckets({"w": np.zeros(3, np.float32)}, buckets, num_contributions=3)
    np.testing.assert_allclose(outcome.state["w"], np.sum(rows, axis=0) / 4, rtol=1e-6)
    noisy = smoke_config(*CENTRAL, "privacy.params.noise_multiplier=2.0", "privacy.params.insecure_seed=5")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stages = Stages.from_config(noisy)
    pipeline = ServerPipeline(stages, Layout(("w",), ((20_000,),)), expected_contributions=4)
    for contributors in (2, 3):  # the noise on the released mean is the same whatever the count
        few = [BucketSum({"w": np.zeros(20_000)}, 1.0, (f"c{i}",)) for i in range(contributors)]
        noise = pipeline.aggregate_buckets({"w": np.zeros(20_000, np.float32)}, few, num_contributions=contributors)
        assert float(np.std(noise.state["w"])) == pytest.approx(2.0 * 1.0 / 4, rel=0.03)


def test_privacy_event_is_one_gaussian_release_without_amplification() -> None:
    event = CentralDP(noise_multiplier=1.3).privacy_event(cohort_size=4, population=10, contributions=3)
    assert (event.noise_multiplier, event.sample_rate, event.steps) == (1.3, 1.0, 1)


def test_insecure_seed_warns_and_is_shown() -> None:
    with pytest.warns(UserWarning, match="insecure_seed"):
        mechanism = CentralDP(insecure_seed=3)
    described = mechanism.describe()
    assert described["insecure_seed"] == 3 and "INSECURE" in described["randomness"]
    assert "os.urandom" in CentralDP().describe()["randomness"]


# ------------------------------------------------------------------------------ settings and refusals


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("privacy.params.clip_norm=0", "privacy.params.clip_norm"),
        ("privacy.params.clip_norm=-1.0", "privacy.params.clip_norm"),
        ("privacy.params.noise_multiplier=-0.5", "privacy.params.noise_multiplier"),
        ('privacy.params.clip="layer"', "privacy.params.clip"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(setting: str, key: str) -> None:
    config = smoke_config("privacy.mode=central", 'privacy.params.clip="flat"', "privacy.params.clip_norm=1.0", setting)
    with pytest.raises(ConfigError) as info:
        Stages.from_config(config)
    assert info.value.key == key and key in str(info.value)


def test_unknown_setting_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"privacy\.params\.clip_nrom"):
        smoke_config("privacy.mode=central", "privacy.params.clip_nrom=1.0")


def test_central_with_secagg_plus_is_refused_naming_the_keys() -> None:
    with pytest.raises(ConfigError) as info:
        Stages.from_config(smoke_config(*CENTRAL, "secure.mode=secagg+"))
    message = str(info.value)
    assert info.value.key == "privacy.mode"
    assert "privacy.mode='central'" in message and "secure.mode='secagg+'" in message
    assert "noise-free sum" in message and "distributed mechanism" in message


def test_central_with_a_defense_that_drops_rows_is_refused_naming_the_key() -> None:
    import robustness.defenses.registry as defenses
    from robustness.defenses import Defense, DefenseResult

    class DropFirst(Defense):
        name = "drop-first-test"

        def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
            return DefenseResult(updates[1:], weights[1:], excluded=(0,))

    defenses.register_defense("drop-first-test", DropFirst)
    try:
        with pytest.raises(ConfigError) as info:
            Stages.from_config(smoke_config(*CENTRAL, "robustness.defense=drop-first-test"))
    finally:
        defenses._DEFENSES._entries.pop("drop-first-test")
    assert info.value.key == "robustness.defense" and "privacy.mode='central'" in str(info.value)


def test_central_with_plain_is_allowed() -> None:
    stages = Stages.from_config(smoke_config(*CENTRAL, "secure.mode=plain"))
    assert stages.privacy.name == "central" and stages.settings["privacy"]["clip_norm"] == 1.0


def test_the_registry_builds_it_with_defaults() -> None:
    mechanism = create_privacy_mechanism("central")
    assert isinstance(mechanism, CentralDP) and mechanism.noise_std == 1.0


# ------------------------------------------------------------------------------ a run


def test_smoke_run_has_a_finite_epsilon_and_the_report_says_the_server_saw_the_noise_free_sum(tmp_path: Path) -> None:
    result = simulate(smoke_config(*CENTRAL, "run.rounds=2"), tmp_path / "run", progress=False)
    ledger = [json.loads(line) for line in (result.run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [line["round"] for line in ledger] == [1, 2]
    assert all(line["mechanism"] == "central" and line["noise_multiplier"] == 1.0 for line in ledger)
    assert ledger[0]["epsilon"]["rdp"] == pytest.approx(4.728507, rel=1e-3)  # q = 1, one step, z = 1
    assert all(math.isfinite(float(v)) for v in ledger[-1]["epsilon"].values())
    assert result.report_json is not None
    report = json.loads(result.report_json.read_text())
    assert report["mechanism"]["mode"] == "central" and report["mechanism"]["clip_norm"] == 1.0
    assert "noise-free sum" in report["mechanism"]["guarantee"]
    protected = [row["protected_by"] for row in report["threat_model"] if row["party"] == "anyone given the final adapter"]
    assert protected and "not against the server" in protected[0]
    assert report["stages"]["privacy"]["params"]["noise_added_by"] == "server"
    assert "central-noise-server" in {w["code"] for w in report["warnings"]}
    assert math.isfinite(result.metrics[-1]["accuracy"])
