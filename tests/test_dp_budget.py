"""Budgets, noise calibration, secret Poisson sampling and the insecure-seed rules (`secure_fl.budget`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.accounting import GaussianEvent
from privacy.accounting.calibration import calibrate_noise_multiplier, planned_epsilon
from privacy.accounting.rdp import RDPAccountant
from privacy.errors import PrivacyError
from privacy.mechanisms.central import CentralDP
from secure_fl.budget import BudgetGuard, SamplingPlan, poisson_cohort, skip_probability
from secure_fl.cli import main
from secure_fl.errors import ConfigError
from secure_fl.server.engine import FederatedServer, privacy_event
from secure_fl.simulation import simulate
from secure_fl.stages import Stages
from tests.conftest import smoke_config

#: A short, cheap smoke run: one local step per round, the RDP accountant only.
QUICK = ["client.local_steps=1", "data.synthetic_examples=120", "privacy.accountants=[\"rdp\"]"]
CENTRAL = ["privacy.mode=central", "privacy.params.clip_norm=1.0"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- calibration

def test_calibration_known_answer_target_3_q_001_1000_steps() -> None:
    """opacus get_noise_multiplier(target_epsilon=3, target_delta=1e-5, sample_rate=0.01, steps=1000) = 0.865479."""
    event = lambda z: GaussianEvent(z, 0.01)  # noqa: E731
    z = calibrate_noise_multiplier(event, accountant_factory=RDPAccountant, target_epsilon=3.0, delta=1e-5, steps=1000)
    assert z == pytest.approx(0.8655, abs=1e-4)
    assert z == pytest.approx(0.865479, abs=1e-6)  # the same search as opacus, so the same answer
    eps = planned_epsilon(event, z, accountant_factory=RDPAccountant, delta=1e-5, steps=1000)
    assert 3.0 - 0.01 <= eps <= 3.0


@settings(max_examples=25, deadline=None, database=None)
@given(target=st.floats(0.2, 40.0), steps=st.integers(1, 200))
def test_a_calibrated_z_never_overshoots_and_is_within_the_tolerance(target: float, steps: int) -> None:
    event = lambda z: GaussianEvent(z, 1.0)  # noqa: E731
    z = calibrate_noise_multiplier(event, accountant_factory=RDPAccountant, target_epsilon=target, delta=1e-5, steps=steps)
    spent = planned_epsilon(event, z, accountant_factory=RDPAccountant, delta=1e-5, steps=steps)
    assert target - 0.01 <= spent <= target


def test_calibration_is_generic_over_the_event_function() -> None:
    """Any ``z -> event`` works: an event whose effective noise is z / 2 needs twice the z."""
    kwargs = dict(accountant_factory=RDPAccountant, target_epsilon=5.0, delta=1e-5, steps=4)
    plain = calibrate_noise_multiplier(lambda z: GaussianEvent(z, 1.0), **kwargs)
    halved = calibrate_noise_multiplier(lambda z: GaussianEvent(z / 2, 1.0), **kwargs)
    assert halved == pytest.approx(2 * plain, rel=1e-3)


def test_an_unreachable_or_bad_target_is_refused() -> None:
    with pytest.raises(PrivacyError, match="target_epsilon"):
        calibrate_noise_multiplier(lambda z: GaussianEvent(z, 1.0), accountant_factory=RDPAccountant,
                                   target_epsilon=0.0, delta=1e-5, steps=1)
    with pytest.raises(PrivacyError, match="raise the target"):
        calibrate_noise_multiplier(lambda z: GaussianEvent(z, 1.0), accountant_factory=RDPAccountant,
                                   target_epsilon=1e-9, delta=1e-5, steps=10)


#: Poisson sampling at q = 0.5 with z calibrated to epsilon 8 over 2 rounds (shared: the calibration is cached per setting).
POISSON = [*QUICK, *CENTRAL, "privacy.target_epsilon=8", "privacy.params.insecure_seed=7",
           "run.rounds=2", "run.sampling=poisson", "run.sample_rate=0.5"]


def test_stages_calibrate_z_for_the_planned_rounds_and_rate() -> None:
    config = smoke_config(*POISSON)
    with pytest.warns(UserWarning, match="insecure_seed"):
        stages = Stages.from_config(config)
    z = stages.privacy.noise_multiplier
    assert stages.calibration.calibrated and stages.calibration.noise_multiplier == z
    assert stages.settings["privacy"]["noise_multiplier"] == z  # run.json and the clients' fingerprint
    event = lambda v: GaussianEvent(v, 0.5)  # noqa: E731
    assert planned_epsilon(event, z, accountant_factory=RDPAccountant, delta=1e-5, steps=2) <= 8.0
    with pytest.warns(UserWarning, match="insecure_seed"):
        assert Stages.from_config(config).fingerprint() == stages.fingerprint()  # clients compute the same z


def test_an_explicit_z_with_a_target_is_kept_and_the_target_is_a_cap() -> None:
    stages = Stages.from_config(smoke_config(*CENTRAL, "privacy.params.noise_multiplier=1.0", "privacy.target_epsilon=6"))
    assert stages.privacy.noise_multiplier == 1.0
    assert not stages.calibration.calibrated
    assert "cap" in stages.calibration.describe()["noise_multiplier_source"]


@pytest.mark.parametrize(("overrides", "key"), [
    (["privacy.target_epsilon=3"], "privacy.target_epsilon"),  # mode none: unbounded from round 1
    (["privacy.client_target_epsilon=3"], "privacy.client_target_epsilon"),
    ([*CENTRAL, "privacy.target_epsilon=-1"], "privacy.target_epsilon"),
    (["run.sample_rate=0.5"], "run.sample_rate"),  # only with poisson
    (["run.sampling=bernoulli"], "run.sampling"),
])
def test_bad_budget_and_sampling_settings_are_refused_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        smoke_config(*overrides)
    assert info.value.key == key


# ---------------------------------------------------------------- run-level budget stop

def test_a_small_target_stops_at_the_right_round_with_the_documented_message(tmp_path: Path, capsys) -> None:
    """z = 1 at q = 1: round 1 spends 4.7285, round 2 would reach 7.077 > 6, so only round 1 runs."""
    out = tmp_path / "run"
    args = ["simulate", "--preset", "smoke", "--out", str(out)]
    for item in [*QUICK, *CENTRAL, "privacy.params.noise_multiplier=1.0", "privacy.target_epsilon=6", "run.rounds=3"]:
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    message = "stopped at round 2: the next release would spend epsilon 7.077 > privacy.target_epsilon = 6"
    assert message in printed
    assert [e["round"] for e in _lines(out / "ledger.jsonl")] == [1]
    assert [m["round"] for m in _lines(out / "metrics.jsonl")] == [1]
    run = json.loads((out / "run.json").read_text())
    assert run["stopped"]["round"] == 2 and run["stopped"]["cause"] == "target_epsilon"
    assert run["stopped"]["reason"].startswith(message)
    report = json.loads((out / "report" / "privacy_report.json").read_text())
    budget = report["budget"]
    assert budget["target_epsilon"] == 6.0 and budget["stopped_at_round"] == 2
    assert budget["spent"] == pytest.approx(4.7285, abs=1e-4) and budget["remaining"] == pytest.approx(1.2715, abs=1e-4)
    codes = {w["code"]: w for w in report["warnings"]}
    assert codes["budget-stop"]["message"].startswith(message)
    assert "q = 1 view" in codes["q1-view"]["message"]  # fixed sampling: no amplification claimed
    page = (out / "report" / "privacy_report.html").read_text()
    assert "Budget: target ε 6.0000, spent 4.7285, remaining 1.2715" in page
    assert "stopped at round 2: the next release would spend epsilon 7.077 &gt; privacy.target_epsilon = 6" in page


# ---------------------------------------------------------------- per-client budget

def test_a_client_at_its_budget_is_not_selected() -> None:
    guard = BudgetGuard("rdp", delta=1e-5, target_epsilon=0.0, client_target_epsilon=6.0)
    event = GaussianEvent(1.0, 0.25)  # the per-client view composes it at q = 1: 4.7285, then 7.077
    guard.record_release(event, ["a", "b"])
    assert guard.eligible(["a", "b", "c"], event) == ["c"]
    assert guard.client_spent("a") == pytest.approx(4.7285, abs=1e-4)
    assert guard.client_spent("c", event) == pytest.approx(4.7285, abs=1e-4)


def test_per_client_budget_excludes_spent_clients_then_stops(tmp_path: Path) -> None:
    """Each client can be in one release at z = 1 (4.73 <= 6 < 7.08): rounds 1 and 2 take disjoint pairs,
    and round 3 finds no client within its budget, so the run stops with a message."""
    config = smoke_config(*QUICK, *CENTRAL, "privacy.params.noise_multiplier=1.0", "privacy.client_target_epsilon=6",
                          "run.rounds=3", "run.clients_per_round=2", "run.min_updates=2")
    result = simulate(config, tmp_path / "run", progress=False)
    ledger = result.ledger
    assert [e["round"] for e in ledger] == [1, 2]
    first, second = (set(e["contributors"]) for e in ledger)
    assert len(first) == len(second) == 2 and not first & second
    assert result.stopped_early
    assert result.stop_reason.startswith("stopped at round 3: only 0 of 4 connected client(s) are within "
                                         "privacy.client_target_epsilon = 6")
    report = json.loads(result.report_json.read_text())
    assert all(c["epsilon"]["rdp"] <= 6.0 for c in report["clients"])
    assert report["budget"]["client_target_epsilon"] == 6.0


# ---------------------------------------------------------------- Poisson sampling

def test_poisson_selection_frequencies_are_close_to_q() -> None:
    clients = [f"client-{i}" for i in range(200)]
    q, draws = 0.3, 300
    counts = np.zeros(len(clients))
    sizes = []
    for _ in range(draws):
        cohort = poisson_cohort(clients, q)
        sizes.append(len(cohort))
        counts[[int(c.split("-")[1]) for c in cohort]] += 1
    total = counts.sum() / (len(clients) * draws)
    assert abs(total - q) < 4 * math.sqrt(q * (1 - q) / (len(clients) * draws))  # overall rate
    per_client = counts / draws  # every client near q (binomial, 5 sigma)
    assert np.all(np.abs(per_client - q) < 5 * math.sqrt(q * (1 - q) / draws))
    assert np.var(sizes) > 0  # variable cohort sizes, not a fixed-size draw
    assert poisson_cohort(clients, 1.0) == sorted(clients)


def test_sampling_plan_and_skip_probability() -> None:
    plan = SamplingPlan.from_config(smoke_config("run.sampling=poisson"))
    assert plan.sample_rate == 1.0 and not plan.amplified  # clients_per_round / num_clients = 4 / 4
    plan = SamplingPlan.from_config(smoke_config("run.sampling=poisson", "run.clients_per_round=2"))
    assert plan.sample_rate == 0.5 and plan.amplified and plan.expected_cohort == 2.0
    assert SamplingPlan.from_config(smoke_config("run.clients_per_round=2")).sample_rate == 1.0  # fixed: q = 1 view
    # a cohort of fewer than 2 is skipped: worst over N - 1, N, N + 1 = 3, 4, 5 is N = 3: P[Bin(3, .5) < 2] = 1/2
    assert skip_probability(4, 0.5, lambda size: size >= 2) == pytest.approx(0.5)
    assert skip_probability(100, 0.5, lambda size: size >= 1) == pytest.approx(0.5**99)


def test_the_engine_passes_the_run_level_rate_and_divides_by_the_expected_cohort(tmp_path: Path) -> None:
    event = privacy_event(CentralDP(clip_norm=1.0, noise_multiplier=1.0), cohort_size=3, population=10,
                          contributions=3, sample_rate=0.3)
    assert event == GaussianEvent(1.0, 0.3, 1)
    config = smoke_config(*CENTRAL, "privacy.params.noise_multiplier=1.0", "run.sampling=poisson", "run.sample_rate=0.5")
    server = FederatedServer(config, tmp_path / "run", transport="in-process")
    assert server.pipeline.expected_contributions == 2.0  # q N: (sum + noise) / 2, not / the secret count


def test_a_poisson_run_records_q_and_the_calibrated_z_and_an_insecure_seed_is_red(tmp_path: Path) -> None:
    config = smoke_config(*POISSON)
    with pytest.warns(UserWarning, match="insecure_seed"):
        result = simulate(config, tmp_path / "run", progress=False)
    metrics = result.metrics
    ran = [m["round"] for m in metrics if m["status"] == "ok"]
    assert {m["status"] for m in metrics} <= {"ok", "skipped"}
    ledger = result.ledger
    assert [e["round"] for e in ledger] == ran  # a skipped round has no ledger line
    run = json.loads((result.run_dir / "run.json").read_text())
    z = run["budget"]["calibration"]["noise_multiplier"]
    assert run["budget"]["calibration"]["calibrated"] and run["sampling"]["amplified"]
    assert run["stages"]["privacy"]["params"]["noise_multiplier"] == z
    for entry in ledger:
        assert entry["sample_rate"] == 0.5 and entry["noise_multiplier"] == z and entry["sampling"] == "poisson"
    report = json.loads(result.report_json.read_text())
    assert report["budget"]["calibrated"] and (report["budget"]["spent"] or 0.0) <= 8.0
    assert report["mechanism"]["amplified"] is True
    seed = [w for w in report["warnings"] if w["code"] == "insecure-seed"]
    assert seed and seed[0]["severity"] == "high"
    page = result.report_html.read_text()
    assert f"z = {z!r} (calibrated)" in page  # the budget line
    box = page[page.index('<div class="high-box">'):page.index("</div>")]
    assert "insecure-seed" in box  # in the red box of high-severity warnings


# ---------------------------------------------------------------- insecure seed outside simulation

def test_insecure_seed_is_refused_by_a_grpc_server_naming_the_key(tmp_path: Path) -> None:
    config = smoke_config(*CENTRAL, "privacy.params.insecure_seed=7")
    with pytest.raises(ConfigError) as info:
        FederatedServer(config, tmp_path / "run", transport="grpc")
    assert info.value.key == "privacy.params.insecure_seed"
    assert "only in simulation" in str(info.value)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_insecure_seed_is_refused_by_the_grpc_client(tmp_path: Path) -> None:
    from secure_fl.api import run_client

    with pytest.raises(ConfigError) as info:
        run_client(smoke_config(*CENTRAL, "privacy.params.insecure_seed=7"), server="127.0.0.1:1", client_id="client-0")
    assert info.value.key == "privacy.params.insecure_seed"


def test_secagg_plus_checks_the_expected_and_the_actual_poisson_cohort(tmp_path: Path) -> None:
    """With the default fractions SecAgg+ protects buckets of 4 or more. The expected cohort (q N = 4) is
    checked at start; smaller cohorts would be skipped, and run.json's skip probability is the worst over
    N - 1, N, N + 1 (N - 1 = 7: P[Bin(7, 1/2) < 4] = 1/2)."""
    config = smoke_config("secure.mode=secagg+", "run.num_clients=8", "run.sampling=poisson", "run.sample_rate=0.5")
    server = FederatedServer(config, tmp_path / "run", transport="in-process")
    assert not server._runnable(3) and server._runnable(4) and server._runnable(8)
    assert server.skip_probability == pytest.approx(0.5)
    sampling = json.loads((tmp_path / "run" / "run.json").read_text())["sampling"]
    assert sampling["mode"] == "poisson" and sampling["skip_probability"] == pytest.approx(0.5)
    with pytest.raises(ConfigError) as info:  # an expected cohort of 2 is below what SecAgg+ protects
        FederatedServer(smoke_config("secure.mode=secagg+", "run.num_clients=8", "run.sampling=poisson",
                                     "run.sample_rate=0.25"), tmp_path / "other", transport="in-process")
    assert info.value.key == "secure.params" and "expected Poisson cohort 2" in str(info.value)


# ---------------------------------------------------------------- other mechanisms

def test_poisson_sampling_with_adaptive_clipping_is_refused_naming_the_key() -> None:
    config = smoke_config(*CENTRAL, "privacy.params.adaptive_clip=true", "privacy.params.clip_count_stddev=2.0",
                          "run.sampling=poisson", "run.clients_per_round=2")
    with pytest.raises(ConfigError) as info:
        Stages.from_config(config)
    assert info.value.key == "run.sampling"


def test_adaptive_clipping_is_calibrated_on_its_total_z() -> None:
    stages = Stages.from_config(smoke_config(*CENTRAL, "privacy.params.adaptive_clip=true",
                                             "privacy.params.clip_count_stddev=20.0", "privacy.target_epsilon=6"))
    mechanism = stages.privacy
    assert stages.calibration.calibrated and mechanism.noise_multiplier == stages.calibration.noise_multiplier
    assert mechanism.update_noise_multiplier > mechanism.noise_multiplier  # z_delta from the calibrated total z
    assert stages.calibration.planned_epsilon <= 6.0


def test_distributed_is_calibrated_to_a_target_and_checked_with_its_exact_event(tmp_path: Path) -> None:
    """Calibrated on the Gaussian curve before the model exists, then confirmed with the discrete event."""
    base = ["secure.mode=secagg+", "privacy.mode=distributed", "privacy.target_epsilon=6"]
    stages = Stages.from_config(smoke_config(*base))  # the clients' view: the same z, from the config alone
    assert stages.calibration.calibrated and stages.privacy.noise_multiplier == stages.calibration.noise_multiplier
    result = simulate(smoke_config(*base, *QUICK, "run.rounds=2"), tmp_path / "run", progress=False)
    ledger = _lines(result.run_dir / "ledger.jsonl")
    assert [line["event"] for line in ledger] == ["distributed-discrete-gaussian"] * 2
    assert all(line["noise_multiplier"] == pytest.approx(stages.calibration.noise_multiplier, rel=1e-9) for line in ledger)
    assert 6.0 - 0.01 <= ledger[-1]["epsilon"]["rdp"] <= 6.0
    budget = json.loads((result.run_dir / "run.json").read_text())["budget"]["calibration"]
    assert budget["calibrated"] and budget["planned_epsilon"] == pytest.approx(ledger[-1]["epsilon"]["rdp"])
    explicit = Stages.from_config(smoke_config(*base, "privacy.params.noise_multiplier=1.0"))
    assert not explicit.calibration.calibrated  # an explicit z: the target is a cap
    with pytest.raises(ConfigError) as info:  # its noise follows the actual (secret) buckets
        Stages.from_config(smoke_config(*base, "privacy.params.noise_multiplier=1.0", "run.sampling=poisson"))
    assert info.value.key == "run.sampling"
