"""Adaptive clipping (Andrew et al. 2021) in ``privacy.mode = "central"``: the rule, its sign, its cost, its state."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from privacy.accounting import GaussianEvent, create_accountant
from privacy.mechanisms.adaptive import (
    default_count_stddev, next_clip_norm, noised_unclipped_fraction, update_noise_multiplier,
)
from privacy.mechanisms import register_privacy_mechanism
from privacy.mechanisms.base import CLIP_NORM_PLAN_KEY, UNCLIPPED_METRIC, MechanismContext
from privacy.mechanisms.central import CentralDP, is_unclipped
from privacy.mechanisms.registry import _MECHANISMS
from secure_fl.errors import ConfigError
from secure_fl.server.checkpoint import read_checkpoint, restore, write_checkpoint
from secure_fl.simulation import simulate
from secure_fl.stages import STATEFUL, Stages
from tests.conftest import smoke_config

NORMS = np.linspace(0.5, 1.5, 100)  # the oracle of algorithms.md section 6: the median is 1.0
GAMMA, ETA = 0.5, 0.2
ADAPTIVE = [
    "privacy.mode=central", "privacy.params.noise_multiplier=1.0", "privacy.params.adaptive_clip=true",
    "privacy.params.clip_count_stddev=2.0",
]


def _context(clip_norm: float | None, round_number: int = 1) -> MechanismContext:
    return MechanismContext(round=round_number, cohort_size=len(NORMS), bucket_size=1, clip_norm=clip_norm)


def _run_rule(c0: float, *, count_clipped: bool, steps: int = 200) -> float:
    """``steps`` noise-free steps of C <- C exp(-eta (b - gamma)) over `NORMS`; ``count_clipped`` is Flower's b."""
    c = c0
    for _ in range(steps):
        b = float(np.mean(NORMS > c)) if count_clipped else float(np.mean(NORMS <= c))
        c = next_clip_norm(c, b, target_quantile=GAMMA, learning_rate=ETA)
    return c


# ------------------------------------------------------------------------------ the rule and its sign


@pytest.mark.parametrize("c0", [0.1, 10.0])
def test_the_rule_converges_to_the_median_norm_from_both_sides(c0: float) -> None:
    assert _run_rule(c0, count_clipped=False) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize(("c0", "runaway"), [(0.1, lambda c: c < 1e-8), (10.0, lambda c: c > 1e8)])
def test_flowers_sign_counting_clipped_clients_diverges(c0: float, runaway: object) -> None:
    """flwr 1.41 counts clipped clients with the exponent written for the unclipped fraction: C runs away."""
    c = _run_rule(c0, count_clipped=True)
    assert runaway(c), c  # type: ignore[operator]
    assert not 0.5 < c < 1.5


def test_more_unclipped_than_the_target_shrinks_c_and_fewer_grows_it() -> None:
    assert next_clip_norm(2.0, 0.8, target_quantile=0.5, learning_rate=0.2) == pytest.approx(2.0 * math.exp(-0.06))
    assert next_clip_norm(2.0, 0.2, target_quantile=0.5, learning_rate=0.2) == pytest.approx(2.0 * math.exp(0.06))
    assert next_clip_norm(2.0, 0.5, target_quantile=0.5, learning_rate=0.2) == 2.0


@pytest.mark.parametrize("c0", [0.1, 10.0])
def test_the_mechanism_end_to_end_converges_to_the_median_norm(c0: float) -> None:
    """The mechanism's own bits (`client_report`) and step (`end_round`), count noise negligible (z = 0)."""
    mechanism = CentralDP(clip_norm=c0, noise_multiplier=0.0, adaptive_clip=True, clip_count_stddev=1e-9)
    updates = [{"a": np.array([n * 0.6, 0.0]), "b": np.array([n * 0.8])} for n in NORMS]
    for round_number in range(1, 201):
        announced = mechanism.round_plan()[CLIP_NORM_PLAN_KEY]
        reports = [mechanism.client_report(u, _context(announced, round_number)) for u in updates]
        info = mechanism.end_round(reports, num_contributions=len(reports))
        assert info["clip_norm"] == announced and info["next_clip_norm"] == mechanism.clip_norm
        assert (info["next_clip_norm"] < announced) == (info["unclipped_fraction"] > GAMMA)
    assert mechanism.clip_norm == pytest.approx(1.0, rel=0.02)
    assert mechanism.state_dict() == {"clip_norm": mechanism.clip_norm, "clip_updates": 200}


def test_the_bit_says_unclipped_and_the_clip_uses_the_announced_c() -> None:
    mechanism = CentralDP(clip_norm=5.0, adaptive_clip=True, clip_count_stddev=2.0)
    update = {"a": np.array([3.0, 4.0], np.float32)}  # norm 5
    assert mechanism.client_report(update, _context(5.0)) == {UNCLIPPED_METRIC: 1.0}
    assert mechanism.client_report(update, _context(4.9)) == {UNCLIPPED_METRIC: 0.0}
    clipped = mechanism.clip(update, _context(1.0))  # the plan's C, not the configured 5.0
    assert float(np.linalg.norm(clipped["a"])) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="task plan"):
        mechanism.clip(update, _context(None))
    assert CentralDP(clip_norm=1.0).client_report(update, _context(None)) == {}  # fixed C reports nothing
    per_tensor = {"a": np.array([1.0]), "b": np.array([0.1])}  # each tensor's bound is C / sqrt(2)
    assert not is_unclipped(per_tensor, clip_norm=1.2, per_tensor=True)
    assert is_unclipped(per_tensor, clip_norm=1.2, per_tensor=False)


def test_bits_are_clamped_and_a_missing_bit_counts_one_half() -> None:
    assert noised_unclipped_fraction(np.array([3.0, -1.0]), 0.0, contributions=2) == 0.5
    mechanism = CentralDP(clip_norm=1.0, noise_multiplier=0.0, adaptive_clip=True, clip_count_stddev=1e-12)
    info = mechanism.end_round([{UNCLIPPED_METRIC: 1.0}, {}], num_contributions=2)
    assert info["unclipped_fraction"] == pytest.approx(0.75) and info["clip_reports_missing"] == 1


# ------------------------------------------------------------------------------ what it costs


def test_update_noise_makes_the_round_cost_exactly_one_gaussian_of_z() -> None:
    z, sigma_b = 1.0, 5.0
    z_delta = update_noise_multiplier(z, sigma_b)
    assert z_delta == pytest.approx((1.0 - 0.01) ** -0.5) and z_delta > z
    assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2)
    # RDP composes additively: update (z_delta) + count (sensitivity 1/2, noise sigma_b) = one release of z
    both = create_accountant("rdp")
    both.compose(GaussianEvent(z_delta, 1.0, 1))
    both.compose(GaussianEvent(2 * sigma_b, 1.0, 1))
    one = create_accountant("rdp")
    one.compose(GaussianEvent(z, 1.0, 1))
    assert both.epsilon(1e-5) == pytest.approx(one.epsilon(1e-5), rel=1e-6)
    assert default_count_stddev(100) == 5.0
    assert update_noise_multiplier(0.0, 1.0) == 0.0


@pytest.mark.parametrize("sigma_b", [0.5, 0.3])
def test_z_at_or_above_twice_sigma_b_is_refused(sigma_b: float) -> None:
    with pytest.raises(ValueError, match="noise_multiplier < 2 \\* clip_count_stddev"):
        update_noise_multiplier(1.0, sigma_b)
    with pytest.raises(ValueError, match="clip_count_stddev"):
        CentralDP(noise_multiplier=1.0, adaptive_clip=True, clip_count_stddev=sigma_b)


def test_the_default_sigma_b_comes_from_the_cohort_and_a_small_cohort_is_refused_naming_the_key() -> None:
    # 4 clients per round: sigma_b = 4 / 20 = 0.2, so z = 1 >= 2 sigma_b
    with pytest.raises(ConfigError) as info:
        Stages.from_config(smoke_config("privacy.mode=central", "privacy.params.adaptive_clip=true"))
    assert info.value.key == "privacy.params.clip_count_stddev"
    assert "sigma_b = 0.2" in str(info.value) and "run.clients_per_round=4" in str(info.value)
    stages = Stages.from_config(smoke_config(
        "privacy.mode=central", "privacy.params.adaptive_clip=true", "privacy.params.noise_multiplier=0.3",
    ))
    assert stages.privacy.clip_count_stddev == pytest.approx(0.2)  # type: ignore[attr-defined]
    assert stages.privacy.describe()["update_noise_multiplier"] == pytest.approx(update_noise_multiplier(0.3, 0.2))


def test_the_noise_has_the_accounted_stds() -> None:
    """Update noise z_delta * C on the sum; count noise sigma_b on the unclipped count (chi-square, 10%)."""
    z, c, sigma_b, n = 1.0, 0.5, 1.0, 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mechanism = CentralDP(clip_norm=c, noise_multiplier=z, adaptive_clip=True, clip_count_stddev=sigma_b)
    assert mechanism.noise_std == pytest.approx(update_noise_multiplier(z, sigma_b) * c)
    mean = {"w": np.zeros(5, np.float32)}
    on_sum = np.stack([mechanism.server_transform(mean, num_contributions=n)["w"] for _ in range(2000)]) * n
    assert on_sum.std() == pytest.approx(update_noise_multiplier(z, sigma_b) * c, rel=0.10)
    counts = []
    for _ in range(3000):
        mechanism.clip_norm = c
        counts.append(mechanism.end_round([{UNCLIPPED_METRIC: 1.0}] * n, num_contributions=n)["unclipped_fraction"] * n - n)
    assert abs(float(np.mean(counts))) < 5 * sigma_b / math.sqrt(len(counts))
    assert float(np.std(counts)) == pytest.approx(sigma_b, rel=0.10)


def test_the_ledger_event_stays_one_gaussian_of_z() -> None:
    event = CentralDP(noise_multiplier=1.0, adaptive_clip=True, clip_count_stddev=2.0).privacy_event(
        cohort_size=4, population=4, contributions=4
    )
    assert (event.noise_multiplier, event.sample_rate, event.steps) == (1.0, 1.0, 1)


# ------------------------------------------------------------------------------ settings and refusals


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("privacy.params.target_unclipped_quantile=1.0", "privacy.params.target_unclipped_quantile"),
        ("privacy.params.target_unclipped_quantile=0.0", "privacy.params.target_unclipped_quantile"),
        ("privacy.params.clip_learning_rate=0.0", "privacy.params.clip_learning_rate"),
        ("privacy.params.clip_count_stddev=-1.0", "privacy.params.clip_count_stddev"),
    ],
)
def test_bad_adaptive_settings_are_refused_naming_the_key(setting: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Stages.from_config(smoke_config(*ADAPTIVE, setting))
    assert info.value.key == key


def test_count_noise_without_adaptive_clipping_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        Stages.from_config(smoke_config("privacy.mode=central", "privacy.params.clip_count_stddev=2.0"))
    assert info.value.key == "privacy.params.clip_count_stddev" and "adaptive_clip" in str(info.value)


def test_a_mode_that_hides_metrics_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        Stages.from_config(smoke_config(*ADAPTIVE, "secure.mode=secagg+"))
    assert info.value.key == "privacy.params.adaptive_clip" and "metrics" in str(info.value)


# ------------------------------------------------------------------------------ state


def test_c_is_checkpointed_and_restored(tmp_path: Path) -> None:
    assert "privacy" in STATEFUL
    stages = Stages.from_config(smoke_config(*ADAPTIVE))
    stages.privacy.clip_norm = 0.37  # type: ignore[attr-defined]
    path = write_checkpoint(tmp_path / "round-0001.safetensors", 1, {"w": np.zeros(2, np.float32)},
                            run_id="r", plugin_state=stages.state_dict())
    fresh = Stages.from_config(smoke_config(*ADAPTIVE))
    assert fresh.privacy.clip_norm == 1.0  # type: ignore[attr-defined]
    restore(fresh, read_checkpoint(path))
    assert fresh.privacy.clip_norm == 0.37  # type: ignore[attr-defined]
    fixed = Stages.from_config(smoke_config("privacy.mode=central"))
    with pytest.raises(ValueError, match="adaptive_clip is false"):
        fixed.privacy.load_state_dict({"clip_norm": 0.37})
    with pytest.raises(ValueError, match="finite number > 0"):
        fresh.privacy.load_state_dict({"clip_norm": -1.0})


# ------------------------------------------------------------------------------ a run

CLIPPED: list[tuple[int, float | None, float]] = []


class RecordingCentralDP(CentralDP):
    """Central DP as it is, recording on every client the round, the announced C and the clipped norm."""

    name = "test-recording-central"

    def clip(self, update: Mapping[str, np.ndarray], context: MechanismContext) -> dict[str, np.ndarray]:
        out = super().clip(update, context)
        norm = math.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in out.values()))
        CLIPPED.append((context.round, context.clip_norm, norm))
        return out


@pytest.fixture
def recording_central() -> Iterator[None]:
    """`RecordingCentralDP` registered for one test (registry-parametrised tests never see it)."""
    register_privacy_mechanism("test-recording-central", RecordingCentralDP, force=True)
    CLIPPED.clear()
    try:
        yield
    finally:
        _MECHANISMS._entries.pop("test-recording-central", None)


@pytest.mark.usefixtures("recording_central")
def test_a_run_adapts_c_and_records_it_in_metrics_ledger_checkpoint_and_report(tmp_path: Path) -> None:
    config = smoke_config(*ADAPTIVE, "privacy.mode=test-recording-central", "privacy.params.clip_norm=0.05", "run.rounds=2")
    result = simulate(config, tmp_path / "run", progress=False)
    metrics = [m for m in result.metrics if m["status"] == "ok"]
    ledger = [json.loads(line) for line in (result.run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [line["round"] for line in ledger] == [1, 2]
    used = [m["clip_norm"] for m in metrics]
    assert used[0] == 0.05 and used[1] != 0.05  # C moved
    assert [line["clip_norm"] for line in ledger] == used
    for before, after in zip(metrics, metrics[1:]):
        assert after["clip_norm"] == before["next_clip_norm"]
    for m in metrics:  # the direction: more unclipped than gamma -> C shrinks
        assert (m["next_clip_norm"] < m["clip_norm"]) == (m["unclipped_fraction"] > GAMMA)
    # every client clipped to the C the server announced for its round, not to the configured C0
    assert sorted({(r, c) for r, c, _ in CLIPPED}) == [(1, used[0]), (2, used[1])]
    assert len(CLIPPED) == 8 and all(norm <= c for _, c, norm in CLIPPED if c is not None)
    details = ledger[0]["adaptive_clip"]
    assert details["clip_count_stddev"] == 2.0 and details["update_noise_multiplier"] == pytest.approx(
        update_noise_multiplier(1.0, 2.0))
    assert all(line["noise_multiplier"] == 1.0 for line in ledger)
    assert ledger[0]["epsilon"]["rdp"] == pytest.approx(4.728507, rel=1e-3)  # the same cost as a fixed C
    checkpoint = read_checkpoint(sorted((result.run_dir / "checkpoints").glob("*.safetensors"))[-1])
    assert checkpoint.plugin_state["privacy"]["clip_norm"] == metrics[-1]["next_clip_norm"]
    assert result.report_json is not None and result.report_html is not None
    report = json.loads(result.report_json.read_text())
    assert [row["clip_norm"] for row in report["clipping"]["by_round"]] == used
    assert report["mechanism"]["adaptive_clip"] is True and report["mechanism"]["initial_clip_norm"] == 0.05
    assert "Clip norm over rounds" in result.report_html.read_text()
