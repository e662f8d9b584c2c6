"""Every example's fast mode runs, so the examples never rot; user plug-ins show up in metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


def _run(name: str, out: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--fast", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _report(out: Path) -> dict:
    return json.loads((out / "report" / "privacy_report.json").read_text())


def _page(out: Path) -> str:
    return (out / "report" / "privacy_report.html").read_text(encoding="utf-8")


def test_every_example_is_covered() -> None:
    assert EXAMPLES == [
        "custom_accountant.py", "custom_defense.py", "custom_rule.py", "custom_secure_mode.py", "frozen_a_rule.py",
        "loopback_server_clients.py", "own_model_simulation.py", "rank_vote.py",
    ]


def test_own_model_simulation(tmp_path: Path) -> None:
    _run("own_model_simulation.py", tmp_path)
    records = _metrics(tmp_path)
    assert len(records) == 2 and all(r["clients"] == 5 for r in records)
    assert 0.0 <= records[-1]["macro_f1"] <= 1.0 and records[-1]["accuracy"] > 1 / 3  # learns beyond chance
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_loopback_server_clients(tmp_path: Path) -> None:
    done = _run("loopback_server_clients.py", tmp_path)
    assert "client-0 trained rounds [1, 2]" in done.stdout and "client-1 trained rounds [1, 2]" in done.stdout
    assert [r["clients"] for r in _metrics(tmp_path)] == [2, 2]
    report = _report(tmp_path)  # a real network run: the report names the wire as a threat
    assert report["run"]["transport"] == "grpc" and "no-tls" in {w["code"] for w in report["warnings"]}
    assert "network observer" in {row["party"] for row in report["threat_model"]}


def test_user_defense_and_attack_show_up_in_metrics(tmp_path: Path) -> None:
    _run("custom_defense.py", tmp_path)
    records = _metrics(tmp_path)
    assert all(r["stages"]["defense"] == "norm-filter" for r in records)
    # the one attacker (25% of 4 clients) is excluded every round, and only it
    excluded = [r["excluded"] for r in records]
    assert all(len(e) == 1 for e in excluded) and len({e[0] for e in excluded}) == 1
    assert all("median_norm" in r and "reference_norm" in r for r in records)
    # ... and in the audit report: the plug-in, its settings, and whom it excluded
    report = _report(tmp_path)
    defense = report["stages"]["defense"]
    assert defense["name"] == "norm-filter" and defense["plugin"].endswith(".NormFilter") and defense["builtin"] is False
    # the real settings: factor from [robustness.params] (4.0, not the class default 3.0), momentum's default
    assert defense["params"] == {"factor": 4.0, "momentum": 0.5} and defense["paper"].startswith("https://")
    assert json.loads((tmp_path / "run.json").read_text())["stages"]["defense"]["params"]["factor"] == 4.0
    assert "robustness.params" in (tmp_path / "config.toml").read_text()
    assert report["stages"]["attack"]["name"] == "flip-scale"
    assert [(x["round"], x["client_id"], x["defense"]) for x in report["exclusions"]] == [
        (r["round"], r["excluded"][0], "norm-filter") for r in records
    ]
    attacker = excluded[0][0]
    assert [c["rounds_excluded"] for c in report["clients"] if c["client_id"] == attacker] == [len(records)]
    assert "simulated-attack" in {w["code"] for w in report["warnings"]}
    assert "norm-filter" in _page(tmp_path) and attacker in _page(tmp_path)
    # state across rounds, saved with the last round's checkpoint
    from secure_fl.server.rundir import RunDirectory

    checkpoint = RunDirectory(tmp_path).load_checkpoint()
    assert checkpoint is not None and checkpoint.round == len(records)
    assert checkpoint.plugin_state["defense"] == {"reference_norm": records[-1]["reference_norm"], "rounds": len(records)}
    assert checkpoint.rng_state is not None and checkpoint.rng_state["bit_generator"] == "PCG64"


def test_user_rule_shows_up_in_metrics(tmp_path: Path) -> None:
    _run("custom_rule.py", tmp_path)
    assert all(r["stages"]["rule"] == "fedavgm" for r in _metrics(tmp_path))
    rule = _report(tmp_path)["stages"]["rule"]
    assert rule["name"] == "fedavgm" and rule["plugin"].endswith(".FedAvgM") and rule["builtin"] is False
    assert rule["params"] == {"beta": 0.7}  # public settings only, never the momentum array
    assert "fedavgm" in _page(tmp_path)


def test_frozen_a_rule_sends_half_the_lora_bytes_and_never_changes_a(tmp_path: Path) -> None:
    done = _run("frozen_a_rule.py", tmp_path)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == {"a_unchanged": True, "lora_ratio": 0.5}
    assert "trained and sent: ['head', 'lora_B']" in done.stdout
    mine, fedit = _metrics(tmp_path), _metrics(tmp_path / "fedit-baseline")
    assert all(r["stages"]["rule"] == "ffa-lora" for r in mine)
    ratio = mine[0]["bytes_up"] / fedit[0]["bytes_up"]  # the head and framing are sent by both
    assert 0.5 < ratio < 0.65, ratio
    for report in (_report(tmp_path), json.loads((tmp_path / "run.json").read_text())):
        rule = report["stages"]["rule"]
        assert rule["name"] == "ffa-lora" and rule["plugin"].endswith(".FFALoRA") and rule["builtin"] is True
        assert rule["params"] == {"a_scale": 1.0}
    assert "ffa-lora" in _page(tmp_path)


def test_user_accountant_shows_up_in_ledger_and_report(tmp_path: Path) -> None:
    done = _run("custom_accountant.py", tmp_path)
    assert "rdp: epsilon 2.1014" in done.stdout and "gdp: epsilon 1.6177" in done.stdout
    ledger = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [e["epsilon"] for e in ledger] == [{"rdp": None, "gdp": None}] * 2
    report = _report(tmp_path)
    assert report["mechanism"]["accountants"] == ["rdp", "gdp"] and report["epsilon"]["final"] == {"rdp": None, "gdp": None}
    assert "gdp" in _page(tmp_path)
    assert all(set(c["epsilon"]) == {"rdp", "gdp"} for c in report["clients"])
    # a fresh process that never registered "gdp": the report says what it could not compute
    done = subprocess.run([sys.executable, "-m", "secure_fl.cli", "audit", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = _report(tmp_path)
    assert "accountant-unavailable" in {w["code"] for w in report["warnings"]} and "gdp" in done.stdout
    assert all(set(c["epsilon"]) == {"rdp"} for c in report["clients"]) and "not computed" in _page(tmp_path)
    assert report["epsilon"]["final"] == {"rdp": None, "gdp": None}  # run-level values still come from the ledger


def test_user_secure_mode_and_privacy_mechanism(tmp_path: Path) -> None:
    _run("custom_secure_mode.py", tmp_path)
    records = _metrics(tmp_path)
    assert all(r["stages"]["secure"] == "plain-fp16" and r["stages"]["privacy"] == "clip" for r in records)
    report = _report(tmp_path)
    assert report["mechanism"]["clip_norm"] == 0.5 and "dp-off" in {w["code"] for w in report["warnings"]}
    assert report["stages"]["secure"]["params"]["server_sees_individual_updates"] is True
    plain = tmp_path / "plain"
    subprocess.run(
        [sys.executable, "-m", "secure_fl.cli", "simulate", "--preset", "smoke", "--out", str(plain)],
        check=True, capture_output=True, timeout=300, cwd=ROOT,
    )
    # float16 uploads: about half the bytes of float32 (headers and framing aside)
    ratio = records[0]["bytes_up"] / _metrics(plain)[0]["bytes_up"]
    assert 0.45 < ratio < 0.6, ratio


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_has_docstring_and_fast_flag(name: str) -> None:
    text = (ROOT / "examples" / name).read_text()
    assert text.startswith('"""') and "--fast" in text


def test_rank_vote(tmp_path: Path) -> None:
    done = _run("rank_vote.py", tmp_path)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["same_model"] is True and summary["accuracy"] == summary["secagg_accuracy"] > 0.5
    plain, secure = _metrics(tmp_path / "plain"), _metrics(tmp_path / "secagg")
    assert [r["stages"]["rule"] for r in plain + secure] == ["rank-vote"] * 4
    assert {r["stages"]["secure"] for r in secure} == {"secagg+"}
