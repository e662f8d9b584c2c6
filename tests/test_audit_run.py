"""The ledger and the audit report in real runs: order of writes, result object, CLI, per-client view."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

import secure_fl
from secure_fl.server.resume import recover
from privacy.ledger import PrivacyLedger, chain_lines
from secure_fl.audit import audit as audit_run_dir
from secure_fl.simulation import simulate
from secure_fl.models import load_adapter
from tests.conftest import smoke_config

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "secure_fl.cli", *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_result_carries_ledger_and_report(tmp_path: Path) -> None:
    result = secure_fl.simulate(smoke_config(), tmp_path, progress=False)
    assert [e["round"] for e in result.ledger] == [1, 2] and result.ledger_path == tmp_path / "ledger.jsonl"
    assert result.epsilon == {"rdp": math.inf, "prv": math.inf}
    report = result.report
    assert report is not None and report["schema"] == "secure-fl/privacy-report/v1"
    assert report["run"]["run_id"] == result.run_id and report["run"]["rounds_completed"] == 2
    assert report["run"]["final_accuracy"] == pytest.approx(result.final_accuracy)
    assert {w["code"] for w in report["warnings"]} >= {"dp-off", "server-sees-updates"}
    assert "no-tls" not in {w["code"] for w in report["warnings"]}  # in-process simulation: no network
    assert [c["rounds_contributed"] for c in report["clients"]] == [2, 2, 2, 2]
    assert report["stages"]["secure"]["params"]["bucket_size"] == 1
    page = result.report_html.read_text(encoding="utf-8") if result.report_html else ""
    assert "unbounded in every round" in page and page.count("data:image/png;base64,") == 2  # clients + accuracy
    assert result.run_id in page


def test_the_ledger_line_is_written_before_the_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected fault: the ledger write of round 2 fails, so nothing of round 2 may leave the server."""
    real_append = PrivacyLedger.append

    def append(self: PrivacyLedger, entry: Mapping[str, Any]) -> dict[str, Any]:
        if entry["round"] == 2:
            raise OSError("injected: ledger disk full")
        return real_append(self, entry)

    monkeypatch.setattr(PrivacyLedger, "append", append)
    with pytest.raises(OSError, match="injected"):
        secure_fl.simulate(smoke_config("run.rounds=3"), tmp_path, progress=False)
    assert [e["round"] for e in PrivacyLedger(tmp_path / "ledger.jsonl").entries()] == [1]
    # round 2's checkpoint is still pending (no ledger line, so never released); a resume deletes it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-0001.safetensors", "round-0002.pending"]
    plan = recover(tmp_path)
    assert plan.next_round == 2 and plan.checkpoint is not None and plan.checkpoint.round == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-0001.safetensors"]
    released = {k: v.detach().numpy() for k, v in load_adapter(tmp_path / "adapter")[0].state_dict().items()}
    round_one = load_file(str(tmp_path / "checkpoints" / "round-0001.safetensors"))
    assert set(round_one) <= set(released)
    for key, value in round_one.items():  # the released adapter is round 1's, not round 2's
        np.testing.assert_array_equal(released[key], value, err_msg=key)
    # the report of the failed run is still written and shows what was released
    report = json.loads((tmp_path / "report" / "privacy_report.json").read_text())
    assert report["mechanism"]["releases"] == 1


def test_a_directory_holding_a_run_is_refused(tmp_path: Path) -> None:
    secure_fl.simulate(smoke_config("run.rounds=1"), tmp_path, progress=False)
    with pytest.raises(secure_fl.RunError, match="already holds a run.*two runs never share one privacy ledger"):
        secure_fl.simulate(smoke_config("run.rounds=1"), tmp_path, progress=False)
    assert len(PrivacyLedger(tmp_path / "ledger.jsonl").entries()) == 1  # the first run's ledger is untouched


class _CentralGaussianForTest(secure_fl.PrivacyMechanism):
    """Server-side Gaussian noise with a stated multiplier; used only to test the accounting path."""

    name = "central-gaussian-test"
    guarantee = "test"

    def client_transform(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(update)

    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng()
        return {k: v + rng.normal(0.0, 1e-3, v.shape).astype(np.float32) for k, v in delta.items()}

    def privacy_event(self, *, cohort_size: int, population: int, contributions: int) -> secure_fl.GaussianEvent:
        return secure_fl.GaussianEvent(noise_multiplier=2.0, sample_rate=cohort_size / population)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.name, "guarantee": self.guarantee, "clip_norm": 1.0, "noise_multiplier": 2.0}


def test_per_client_epsilon_counts_only_the_rounds_a_client_was_in(tmp_path: Path) -> None:
    """Run-level epsilon: all releases at q; per client: only its releases, at q = 1 (known participation)."""
    secure_fl.register_privacy_mechanism("central-gaussian-test", _CentralGaussianForTest, force=True)
    config = smoke_config("privacy.mode=central-gaussian-test", "run.rounds=4", "run.clients_per_round=2", "run.min_updates=2")
    result = secure_fl.simulate(config, tmp_path, progress=False)
    ledger = result.ledger
    assert all(e["sample_rate"] == 0.5 and e["noise_multiplier"] == 2.0 for e in ledger)
    run_eps = secure_fl.create_accountant("rdp")
    run_eps.compose(secure_fl.GaussianEvent(2.0, 0.5, 4))
    assert result.epsilon["rdp"] == pytest.approx(run_eps.epsilon(1e-5))
    report = result.report
    assert report is not None
    by_round = [r["epsilon"]["rdp"] for r in report["epsilon"]["by_round"]]
    assert by_round == sorted(by_round) and len(set(by_round)) == 4  # grows every release
    for client in report["clients"]:
        rounds = sum(client["client_id"] in e["contributors"] for e in ledger)
        assert client["rounds_contributed"] == rounds
        expected = secure_fl.create_accountant("rdp")
        if rounds:
            expected.compose(secure_fl.GaussianEvent(2.0, 1.0, rounds))
        assert client["epsilon"]["rdp"] == pytest.approx(expected.epsilon(1e-5))
    assert "dp-off" not in {w["code"] for w in report["warnings"]}
    page = (tmp_path / "report" / "privacy_report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 3  # epsilon, clients, accuracy
    assert f"{result.epsilon['rdp']:.4f}" in page


def test_cli_audit_rebuilds_the_report_and_refuses_damage(tmp_path: Path) -> None:
    secure_fl.simulate(smoke_config("run.rounds=1"), tmp_path, progress=False)
    (tmp_path / "report" / "privacy_report.json").unlink()
    done = _cli("audit", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "epsilon at delta=1e-05: rdp inf, prv inf" in done.stdout and "[high]" in done.stdout
    assert json.loads((tmp_path / "report" / "privacy_report.json").read_text())["run"]["rounds_completed"] == 1

    with (tmp_path / "ledger.jsonl").open("a") as handle:
        handle.write('{"round": 2, "mech')
    done = _cli("audit", str(tmp_path))
    assert done.returncode == 1 and "ledger.jsonl line 2 is not valid JSON" in done.stderr, done.stderr

    # tampering: the chain names the edited line; an emptied ledger no longer reads epsilon 0
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    (tmp_path / "ledger.jsonl").write_text(lines[0] + "\n")
    assert _cli("audit", str(tmp_path)).returncode == 0
    (tmp_path / "ledger.jsonl").write_text("")
    done = _cli("audit", str(tmp_path))
    assert done.returncode == 1 and "round(s) 1 released according to metrics.jsonl (status ok) have no ledger line" in done.stderr

    done = _cli("audit", str(tmp_path / "nowhere"))
    assert done.returncode == 1 and "is not a run directory: config.toml is missing" in done.stderr, done.stderr
    assert not (tmp_path / "nowhere").exists()


def _append_interrupted_round(run_dir: Path, number: int, selected: list[str], trained: list[str]) -> None:
    """What the round engine writes for a round cut short by Ctrl-C: a metrics record, no ledger line."""
    record = {
        "round": number, "status": "interrupted", "reason": "interrupted by the user (Ctrl-C)",
        "clients": len(trained), "cohort": len(selected), "selected": selected,
        "dropped": sorted(set(selected) - set(trained)), "accuracy": None, "stages": {},
    }
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "interrupted": True}))


def test_an_interrupted_run_is_reported_and_its_last_round_not_released(tmp_path: Path) -> None:
    simulate(smoke_config("run.rounds=3"), tmp_path, progress=False)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # round 3 never finished ...
    ledger = (tmp_path / "ledger.jsonl").read_text().splitlines()
    (tmp_path / "ledger.jsonl").write_text("\n".join(ledger[:2]) + "\n")  # ... and released nothing
    clients = ["client-0", "client-1", "client-2", "client-3"]
    _append_interrupted_round(tmp_path, 3, clients, trained=["client-0"])
    report = audit_run_dir(tmp_path).data
    warning = next(w for w in report["warnings"] if w["code"] == "run-interrupted")
    assert warning["severity"] == "high" and "run interrupted in round 3" in warning["message"]
    assert "Ctrl-C" in warning["message"] and "failed-rounds" not in {w["code"] for w in report["warnings"]}
    run = report["run"]
    assert run["interrupted"] is True and run["rounds_completed"] == 2 and run["rounds_interrupted"] == 1
    assert run["rounds_failed"] == 0 and report["mechanism"]["releases"] == 2
    for row in report["clients"]:  # selected in round 3 but not dropped out: the run stopped
        assert (row["rounds_selected"], row["rounds_contributed"], row["rounds_dropped"]) == (3, 2, 0)
        assert row["rounds_interrupted"] == 1
    page = (tmp_path / "report" / "privacy_report.html").read_text(encoding="utf-8")
    high_box = page.split('class="high-box"', 1)[1].split("</div>", 1)[0]
    assert "run-interrupted" in high_box and "Run interrupted" in page and "(run interrupted)" in page
    clients_table = page.split(">Clients<", 1)[1].split("</table>", 1)[0]
    assert "<th>interrupted</th>" in clients_table


def _handcrafted_run(run_dir: Path, metrics: list[dict[str, Any]], ledger: list[dict[str, Any]], **info: Any) -> Path:
    """A run directory written by hand: DP off, plain aggregation, in-process transport."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(
        '[run]\nrounds = 3\n[privacy]\nmode = "none"\ndelta = 1e-05\naccountants = ["rdp"]\n', encoding="utf-8"
    )
    stages = {"secure": {"name": "plain", "params": {"server_sees_individual_updates": True}},
              "privacy": {"name": "none", "params": {"guarantee": "none"}}}
    (run_dir / "run.json").write_text(json.dumps({"run_id": "hand", "transport": "in-process", "stages": stages, **info}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run_dir / "ledger.jsonl").write_text(chain_lines(ledger))
    return run_dir


def test_clients_that_never_contributed_show_no_epsilon_number(tmp_path: Path) -> None:
    release = {"round": 1, "mechanism": "none", "guarantee": "none", "noise_multiplier": 0.0, "sample_rate": 0.5,
               "steps": 1, "clip_norm": None, "delta": 1e-5, "epsilon": {"rdp": None}, "run_id": "hand",
               "cohort": ["a", "b"], "contributors": ["a"], "dropouts": ["b"], "excluded": []}
    metrics = [
        {"round": 1, "status": "ok", "selected": ["a", "b"], "dropped": ["b"], "excluded": [], "accuracy": 0.5},
        {"round": 2, "status": "interrupted", "reason": "Ctrl-C", "selected": ["c"], "dropped": ["c"]},
    ]
    run_dir = _handcrafted_run(tmp_path / "run", metrics, [release])
    report = audit_run_dir(run_dir).data
    rows = {row["client_id"]: row for row in report["clients"]}
    assert rows["b"]["rounds_dropped"] == 1 and rows["c"]["rounds_dropped"] == 0  # c was cut short, not dropped
    assert report["run"]["interrupted"] is True  # from metrics alone; run.json does not say it
    page = (run_dir / "report" / "privacy_report.html").read_text(encoding="utf-8")
    table = page.split(">Clients<", 1)[1].split("</table>", 1)[0]
    row_b = table.split("<td>b</td>", 1)[1].split("</tr>", 1)[0]
    row_c = table.split("<td>c</td>", 1)[1].split("</tr>", 1)[0]
    for row in (row_b, row_c):
        assert "0.0000" not in row and "not released" in row and "no guarantee" not in row
    row_a = table.split("<td>a</td>", 1)[1].split("</tr>", 1)[0]
    assert "∞ (no guarantee)" in row_a


def test_run_json_alone_marks_a_run_interrupted(tmp_path: Path) -> None:
    metrics = [{"round": 1, "status": "ok", "selected": ["a"], "dropped": [], "excluded": []}]
    release = {"round": 1, "mechanism": "none", "guarantee": "none", "noise_multiplier": 0.0, "sample_rate": 1.0,
               "steps": 1, "clip_norm": None, "delta": 1e-5, "epsilon": {"rdp": None}, "contributors": ["a"]}
    report = audit_run_dir(_handcrafted_run(tmp_path / "run", metrics, [release], interrupted=True)).data
    assert report["run"]["interrupted"] is True and report["run"]["rounds_interrupted"] == 0
    assert [w["severity"] for w in report["warnings"] if w["code"] == "run-interrupted"] == ["high"]


def test_a_run_whose_every_round_failed_spent_nothing_and_published_no_losses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected fault: every aggregate is non-finite. Nothing is released, so the run says "no release:
    nothing spent" (never epsilon 0 next to "unbounded"), and no client loss or evaluation metric is published."""
    from secure_fl.server import engine

    monkeypatch.setattr(engine, "_non_finite", lambda state: "injected")
    result = secure_fl.simulate(smoke_config("run.rounds=2", "client.eval_fraction=0.5"), tmp_path, progress=False)
    assert result.ledger == [] and [m["status"] for m in result.metrics] == ["failed", "failed"]
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["train_loss"] is None and not [k for k in record if k.startswith("fed_eval")], record
    done = _cli("audit", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no release: nothing spent;") and "unbounded" not in done.stdout, done.stdout
    report = json.loads((tmp_path / "report" / "privacy_report.json").read_text())
    assert report["mechanism"]["releases"] == 0
    assert "unbounded" not in json.dumps(report["warnings"]) and "no release: nothing spent" in json.dumps(report["warnings"])
    page = (tmp_path / "report" / "privacy_report.html").read_text(encoding="utf-8")
    summary = page.split('class="summary">', 1)[1].split("</p>", 1)[0]
    assert "no release: nothing spent" in summary and "0.0000" not in summary


def test_a_ledger_line_without_its_metrics_record_is_flagged_high(tmp_path: Path) -> None:
    release = {"round": 1, "mechanism": "none", "guarantee": "none", "noise_multiplier": 0.0, "sample_rate": 1.0,
               "steps": 1, "clip_norm": None, "delta": 1e-5, "epsilon": {"rdp": None}, "contributors": ["a"]}
    report = audit_run_dir(_handcrafted_run(tmp_path / "run", [], [release])).data
    warning = next(w for w in report["warnings"] if w["code"] == "ledger-without-metrics")
    assert warning["severity"] == "high" and "round(s) 1" in warning["message"]
    assert report["mechanism"]["releases"] == 1  # counted as spent
