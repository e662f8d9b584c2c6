"""A short fuzz run over every RPC and protocol phase (issue 15): no crash, nothing invalid accepted.

The harness is `tests.fuzz_harness`; ``benchmarks/fuzz.py`` is the long run (10,000 messages per
mode), whose numbers docs/security.md reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz_harness import FUZZ_ID, fuzz_config, run_fuzz


def _check(summary: dict, *, messages: int) -> None:
    assert summary["messages"] >= 0.9 * messages, summary
    assert summary["crashes"] == 0, summary["crash_examples"]  # (a) no INTERNAL / UNKNOWN / hang
    assert summary["accepted_invalid"] == 0, summary["accepted_examples"]  # (b) nothing invalid accepted
    assert not summary["fuzz_party_contributed"], f"{FUZZ_ID} contributed to a round"
    assert summary["honest_failures"] == {}, summary["honest_failures"]  # (c) honest parties finish
    assert summary["honest_rounds_ok"] == summary["rounds"], summary
    assert all(r == list(range(1, summary["rounds"] + 1)) for r in summary["honest_rounds_trained"]), summary
    assert summary["server_alive"] and summary["harness_errors"] == 0, summary
    assert set(summary["by_rpc"]) == {"Join", "PullTask", "PushUpdate", "Leave"}, summary["by_rpc"]


@pytest.mark.parametrize("mode", ["plain", "secagg+"])
def test_fuzzed_rpcs_and_phases_are_refused_and_honest_rounds_finish(mode: str, tmp_path: Path) -> None:
    summary = run_fuzz(fuzz_config(mode, rounds=2), tmp_path / "run", messages=800, seed=0)
    _check(summary, messages=800)
    assert summary["seconds"] < 120, summary["seconds"]
