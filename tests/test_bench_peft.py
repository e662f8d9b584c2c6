"""``secure-fl bench peft`` on the smoke preset: one JSON line per rule, and an aggregation error
that is float round-off for an exact rule and the cross terms for FedIT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secure_fl.bench.peft import PeftBench, run_peft_bench
from secure_fl.cli import main
from secure_fl.errors import ConfigError


def test_exact_rules_have_no_aggregation_error_and_fedit_has(tmp_path: Path) -> None:
    records = {r["rule"]: r for r in run_peft_bench(PeftBench(rules=("fedit", "ffa-lora"), rounds=1), tmp_path, progress=False)}
    assert records["ffa-lora"]["aggregation_error"][0] < 1e-5
    assert records["fedit"]["aggregation_error"][0] > 1e-3  # mean(B) mean(A) != mean(B A)
    assert records["ffa-lora"]["bytes_up_per_client"] < records["fedit"]["bytes_up_per_client"]
    for record in records.values():
        assert record["rounds"] == 1 and record["clients"] == 4 and 0 <= record["accuracy"] <= 1
    lines = (tmp_path / "results.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["rule"] for line in lines] == ["fedit", "ffa-lora"]


def test_bad_flags_are_refused_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="--rules: unknown rule"):
        PeftBench(rules=("no-such-rule",))
    assert main(["bench", "peft", "--rules", "nope", "--out", "unused"]) == 2
    assert "--rules" in capsys.readouterr().err
