"""The one-run empirical audit (Steinke, Nasr, Jagielski 2023) with canary clients: math, runs, CLI, report."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import binom  # an independent binomial

from privacy.audit.empirical import (
    ATTACK_CAVEAT, guess_counts, guess_grid, one_run_audit, one_run_epsilon_lower_bound, one_run_p_value,
)  # fmt: skip
from privacy.mechanisms import register_privacy_mechanism
from privacy.mechanisms import registry as mechanism_registry
from privacy.mechanisms.central import CentralDP
from secure_fl.cli import EXIT_AUDIT_VIOLATION, EXIT_USAGE, main
from secure_fl.empirical_audit import CanaryClients, audit_config
from secure_fl.errors import ConfigError
from secure_fl.simulation import simulate
from tests.conftest import smoke_config

#: Cheap honest parties: the smoke model, one local step, one round (the canaries cost no training).
CHEAP = ("run.rounds=1", "client.local_steps=1")


# ------------------------------------------------------------------------------ the bound


@pytest.mark.parametrize(("r", "v", "expected"), [(1000, 700, 0.7320), (100, 90, 1.6308), (500, 400, 1.1986), (1000, 550, 0.0942)])
def test_lower_bound_oracles(r: int, v: int, expected: float) -> None:
    """algorithms.md section 8, delta = 0, beta = 0.05."""
    assert one_run_epsilon_lower_bound(r, v, canaries=r) == pytest.approx(expected, abs=1e-3)


def test_the_bound_is_the_boundary_of_the_binomial_test() -> None:
    """At the bound the scipy tail is beta; just above it the tail exceeds beta (an independent check)."""
    for r, v in [(100, 90), (37, 30), (400, 260)]:
        eps = one_run_epsilon_lower_bound(r, v, canaries=r)
        tail = binom.sf(v - 1, r, 1 / (1 + math.exp(-eps)))
        assert tail == pytest.approx(0.05, rel=1e-6)
        assert binom.sf(v - 1, r, 1 / (1 + math.exp(-(eps + 1e-4)))) > 0.05


def _paper_p_value(r: int, v: int, eps: float, m: int, delta: float) -> float:
    """The paper's appendix p-value, written as its loop (scipy pmf), to check the vectorised one."""
    q = 1 / (1 + math.exp(-eps))
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += binom.pmf(v - i, r, q)
        alpha = max(alpha, total / i)
    return min(1.0, binom.sf(v - 1, r, q) + alpha * delta * 2 * m)


@pytest.mark.parametrize(("r", "v", "m", "delta"), [(100, 90, 100, 1e-5), (200, 150, 1000, 1e-4), (50, 45, 500, 1e-3)])
def test_the_delta_correction_follows_the_paper(r: int, v: int, m: int, delta: float) -> None:
    for eps in (0.0, 0.5, 1.3, 2.0):
        assert one_run_p_value(r, v, eps, canaries=m, delta=delta) == pytest.approx(_paper_p_value(r, v, eps, m, delta), rel=1e-9, abs=1e-15)
    # delta > 0 can only weaken the bound, more so with more canaries
    plain = one_run_epsilon_lower_bound(r, v, canaries=m)
    weaker = one_run_epsilon_lower_bound(r, v, canaries=m, delta=delta)
    weakest = one_run_epsilon_lower_bound(r, v, canaries=10 * m, delta=delta)
    assert weakest <= weaker < plain


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="v <= r <= m"):
        one_run_epsilon_lower_bound(10, 11, canaries=20)
    with pytest.raises(ValueError, match="beta"):
        one_run_epsilon_lower_bound(10, 5, canaries=10, beta=1.5)
    assert one_run_epsilon_lower_bound(0, 0, canaries=10) == 0.0
    assert one_run_epsilon_lower_bound(100, 50, canaries=100) == 0.0  # chance accuracy rejects nothing


# ------------------------------------------------------------------------------ the guesses


def test_guessing_takes_the_top_and_bottom_scores() -> None:
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    inserted = [True, False, True, False, False, True]
    assert guess_counts(scores, inserted, k_in=2, k_out=2) == (4, 2)  # top: T, F; bottom: F, T
    assert guess_counts(scores, inserted, k_in=1, k_out=0) == (1, 1)
    assert guess_counts(scores, inserted, k_in=3, k_out=3) == (6, 4)  # T, F, T in; F, F, T out
    with pytest.raises(ValueError, match="k_in"):
        guess_counts(scores, inserted, k_in=4, k_out=3)


def test_the_grid_is_fixed_by_m_and_the_union_bound_is_paid() -> None:
    grid = guess_grid(100)
    assert grid == ((5, 5), (10, 10), (20, 20), (30, 30), (40, 40), (50, 50))
    inserted = np.arange(100) < 50
    perfect = one_run_audit(np.where(inserted, 1.0, 0.0) + np.linspace(0, 1e-3, 100), inserted)
    # every grid pair is perfect; the largest r wins, at level beta / 6, not beta
    assert (perfect.guesses, perfect.correct) == (100, 100)
    assert perfect.epsilon_lower_bound == pytest.approx(one_run_epsilon_lower_bound(100, 100, canaries=100, beta=0.05 / 6))
    assert perfect.epsilon_lower_bound < one_run_epsilon_lower_bound(100, 100, canaries=100)
    rng = np.random.default_rng(1)
    noise = one_run_audit(rng.standard_normal(100), rng.random(100) < 0.5)
    assert noise.epsilon_lower_bound < 0.5  # scores that say nothing bound (almost) nothing


# ------------------------------------------------------------------------------ canaries


def test_canaries_have_the_clip_norm_and_coins_from_secrets() -> None:
    design = CanaryClients(200, norm=2.0)
    assert 60 < design.count < 140  # Bin(200, 1/2): far outside this only with probability < 1e-8
    fixed = CanaryClients(3, norm=1.0, inserted=[True, False, True])
    assert fixed.count == 2
    with pytest.raises(ValueError, match="3 canaries"):
        CanaryClients(3, norm=1.0, inserted=[True])
    config = smoke_config("run.num_clients=10", "run.clients_per_round=5")
    grown = audit_config(config, 10)
    assert (grown.run.num_clients, grown.run.clients_per_round, grown.privacy.audit) == (20, 10, False)
    full = audit_config(smoke_config("privacy.audit=true"), 7)
    assert (full.run.num_clients, full.run.clients_per_round) == (11, 11)


def test_the_canary_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="privacy.audit_canaries"):
        smoke_config("privacy.audit_canaries=5")
    with pytest.raises(ConfigError, match="privacy.audit"):
        smoke_config("privacy.audit=3")


# ------------------------------------------------------------------------------ runs


def _audit_json(run_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / "empirical_audit.json").read_text(encoding="utf-8"))
    return data


def test_without_dp_the_bound_is_large_and_the_report_shows_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """privacy.mode = none: the canaries are found (lower bound well above 1); CLI, JSON and page agree."""
    run = tmp_path / "run"
    simulate(smoke_config(*CHEAP), run, progress=False)
    assert main(["audit", str(run), "--empirical", "--canaries", "100"]) == 0
    out = capsys.readouterr().out
    data = _audit_json(run)
    bound = float(data["epsilon_lower_bound"])
    assert bound > 2.0, data
    assert data["verdict"] == "no-guarantee" and data["theoretical_epsilon_min"] is None
    assert (data["canaries"], data["confidence"], data["delta"]) == (100, 0.95, 1e-5)
    assert sum(data["canary_coins"]) == data["inserted"]
    assert f"epsilon >= {bound:.4f} at 95% confidence" in out
    report = json.loads((run / "report" / "privacy_report.json").read_text(encoding="utf-8"))
    assert report["empirical_audit"]["epsilon_lower_bound"] == bound
    page = (run / "report" / "privacy_report.html").read_text(encoding="utf-8")
    assert "<h2>Empirical audit</h2>" in page and f"{bound:.4f}" in page and "95 %" in page
    assert "only as strong as the attack" in page and ATTACK_CAVEAT.split(":")[0] in page
    # the audit run is a run of its own, with its ledger and report
    assert (run / "empirical-audit" / "ledger.jsonl").is_file()
    assert (run / "empirical-audit" / "report" / "privacy_report.html").is_file()
    # a second audit does not overwrite the first
    assert main(["audit", str(run), "--empirical"]) == 1
    assert "already holds an audit run" in capsys.readouterr().err


def test_with_strong_central_dp_the_bound_is_small_and_below_theory(tmp_path: Path) -> None:
    """privacy.audit = true runs the audit after the run; z = 5 leaves the canaries hidden.

    One release at z = 5 costs epsilon 0.74 (PRV); a canary's score then has signal-to-noise about
    1/z = 0.2, and a simulation of the guesses at that ratio (3000 trials, 50 canaries) puts the
    chance of a bound above 0.6 near 1e-3, above the theory below 3e-4.
    """
    config = smoke_config(*CHEAP, "privacy.mode=central", "privacy.params.noise_multiplier=5", "privacy.audit=true",
                          "privacy.audit_canaries=50")
    result = simulate(config, tmp_path, progress=False)
    assert result.empirical_audit == tmp_path / "empirical_audit.json"
    data = _audit_json(tmp_path)
    bound, theory = float(data["epsilon_lower_bound"]), float(data["theoretical_epsilon_min"])
    assert 0.7 < theory < 0.8  # one release at z = 5
    assert bound < 0.6 < theory
    assert data["verdict"] == "consistent"
    assert data["canary_norm"] == 1.0 and data["released_rounds"] == 1 and data["canaries"] == 50
    page = (tmp_path / "report" / "privacy_report.html").read_text(encoding="utf-8")
    assert "<h2>Empirical audit</h2>" in page and f"{theory:.4f}" in page and "empirical-above-theory" not in page


class _LeakyCentral(CentralDP):
    """A deliberately broken mechanism: accounts for z but adds no noise (the bug the audit must catch)."""

    name = "leaky-central"

    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: int) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}


def test_a_mechanism_that_leaks_more_than_it_accounts_is_reported_as_a_bug(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    register_privacy_mechanism("leaky-central", _LeakyCentral, force=True)
    request.addfinalizer(lambda: mechanism_registry._MECHANISMS._entries.pop("leaky-central", None))
    args = ["simulate", "--preset", "smoke", "--out", str(tmp_path), *(f"--set={o}" for o in CHEAP),
            "--set=privacy.mode=leaky-central", "--set=privacy.params.noise_multiplier=20", "--set=privacy.audit=true",
            "--set=privacy.audit_canaries=50"]
    assert main(args) == EXIT_AUDIT_VIOLATION
    captured = capsys.readouterr()
    assert "BUG: the empirical lower bound" in captured.err
    data = _audit_json(tmp_path)
    assert data["verdict"] == "violation"
    assert float(data["epsilon_lower_bound"]) > 2 * float(data["theoretical_epsilon_min"])
    report = json.loads((tmp_path / "report" / "privacy_report.json").read_text(encoding="utf-8"))
    first = report["warnings"][0]
    assert (first["code"], first["severity"]) == ("empirical-above-theory", "high")
    page = (tmp_path / "report" / "privacy_report.html").read_text(encoding="utf-8")
    assert "this is a bug" in page and "empirical-above-theory" in page
    # rebuilding the report from the directory keeps the warning, and the plain audit says so
    assert main(["audit", str(tmp_path)]) == 0
    assert "[high] BUG: the empirical epsilon lower bound" in capsys.readouterr().out


# ------------------------------------------------------------------------------ refusals


def test_the_cli_refuses_what_it_cannot_audit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(tmp_path), "--empirical"]) == 1
    assert "is not a run directory: config.toml is missing" in capsys.readouterr().err
    (tmp_path / "config.toml").write_text(smoke_config().to_toml(), encoding="utf-8")
    assert main(["audit", str(tmp_path), "--empirical", "--canaries", "5"]) == EXIT_USAGE
    assert "--canaries must be an integer >= 10" in capsys.readouterr().err
    assert main(["audit", str(tmp_path), "--empirical", "--confidence", "1.5"]) == EXIT_USAGE
    assert "--confidence must be in (0, 1)" in capsys.readouterr().err
    assert main(["audit", str(tmp_path), "--canaries", "100"]) == EXIT_USAGE
    assert "belong to --empirical" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="custom workload"):
        simulate(smoke_config("privacy.audit=true"), tmp_path / "x", workload=object(), client_datasets=[[1]])


def test_canary_messages_sit_on_the_clip_bound_and_scores_read_the_release() -> None:
    """Flat: each message has norm C; per-tensor: each of the k tensors C / sqrt(k). A release's
    change dotted with a canary's direction is added to its score; a failed round adds nothing."""
    from types import SimpleNamespace

    state = {"a": np.zeros((3, 4)), "b": np.zeros(5), "c": np.zeros((2, 2))}
    template = SimpleNamespace(workload=None, adapted=None, data=[], update_keys=list(state), rule=None, num_examples=7)
    for per_tensor in (False, True):
        server = SimpleNamespace(global_state=dict(state))
        design = CanaryClients(20, norm=2.0, per_tensor=per_tensor)
        trainers = design.build(server, [template])  # type: ignore[list-item]
        assert len(trainers) == design.count
        for trainer in trainers:
            message, metrics = trainer.train({}, {}, seed=0)
            assert metrics == {} and trainer.num_examples == 7
            norms = [float(np.linalg.norm(message[k])) for k in state]
            if per_tensor:
                assert norms == pytest.approx([2.0 / math.sqrt(3)] * 3, rel=1e-5)
            else:
                assert math.sqrt(sum(n * n for n in norms)) == pytest.approx(2.0, rel=1e-5)
        if not trainers:
            continue
        released = {k: v + trainers[0].message[k] for k, v in state.items()}  # the first inserted canary alone
        server.global_state = released
        design.on_round_end({"status": "failed"})
        assert not design.scores.any()
        design.on_round_end({"status": "ok"})
        first = int(np.flatnonzero(design.inserted)[0])
        assert design.scores[first] == pytest.approx(2.0, rel=1e-5)  # <C u, u> = C
        assert np.abs(np.delete(design.scores, first)).max() < 2.0
