"""`secure-fl bench robustness`: a real grid of simulations, its cache, its refusals and its flags.

A test-only defense and a test-only attack are registered for the module (and removed after), so
the harness is shown to pick up any registered plug-in, as it will the built-in ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from robustness.attacks.base import Attack
from robustness.attacks.registry import _ATTACKS, register_attack
from robustness.defenses.base import Defense, DefenseResult
from robustness.defenses.registry import _DEFENSES, register_defense
from robustness.errors import InsufficientHonestClients
from secure_fl import simulation
from secure_fl.bench.cells import CellResult, cell_key
from secure_fl.bench.robustness import RobustnessGrid, plan_cells, run_robustness_table
from secure_fl.bench.table import render_markdown, table_data
from secure_fl.cli import main
from secure_fl.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
FAST = ("client.local_steps=2",)


class DropLargest(Defense):
    """Drop the f rows of largest norm; refuse unless n >= 2f + 3 (a Krum-like precondition)."""

    name = "test-drop-largest"
    paper = "https://example.org/test-only"

    def __init__(self, *, f: int = 0) -> None:
        if f < 0:
            raise ValueError(f"f must be >= 0, got {f}")
        self.f = f

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        n = updates.shape[0]
        if n < 2 * self.f + 3:
            raise InsufficientHonestClients(f"{self.name} needs n >= 2f+3 rows, got n={n} with f={self.f}")
        order = np.argsort(np.linalg.norm(updates, axis=1))
        keep = np.sort(order[: n - self.f])
        return DefenseResult(updates[keep], weights[keep], excluded=tuple(int(i) for i in order[n - self.f:]))


class FlipTimesFour(Attack):
    """Send -4 times the honest update."""

    name = "test-flip4"
    paper = "https://example.org/test-only"

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {k: -4.0 * v for k, v in update.items()}


@pytest.fixture(autouse=True)
def test_plugins() -> Iterator[None]:
    register_defense(DropLargest.name, DropLargest, force=True)
    register_attack(FlipTimesFour.name, FlipTimesFour, force=True)
    yield
    _DEFENSES._entries.pop(DropLargest.name)
    _ATTACKS._entries.pop(FlipTimesFour.name)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    calls: list[Any] = []
    real = simulation.simulate

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(simulation, "simulate", counted)
    return calls


def test_grid_writes_a_table_of_real_runs_and_a_second_run_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = RobustnessGrid(
        preset="smoke", defenses=("none", DropLargest.name), attacks=("none", FlipTimesFour.name), modes=("plain",),
        rounds=1, clients=5, overrides=FAST,
    )
    calls = _counting(monkeypatch)
    data = run_robustness_table(grid, tmp_path, progress=False)
    assert len(calls) == 4
    cells = {(c["defense"], c["attack"]): c for c in data["cells"]}
    assert all(c["status"] == "ok" and 0.0 <= c["accuracy"] <= 1.0 and c["rounds_run"] == c["rounds_ok"] == 1 for c in cells.values())
    assert data["attackers"] == 1 and cells[("none", "none")]["attackers"] == 0
    guarded = cells[(DropLargest.name, FlipTimesFour.name)]
    assert guarded["f"] == 1 and guarded["rows"] == 5 and "robustness.params.f=1" in guarded["overrides"]
    assert "attack.fraction=0.2" in guarded["overrides"] and "client.local_steps=2" == guarded["overrides"][-1]
    assert "attack.fraction=0.0" in cells[(DropLargest.name, "none")]["overrides"]
    assert not any("robustness.params" in o for o in cells[("none", FlipTimesFour.name)]["overrides"])
    assert len({c["key"] for c in cells.values()}) == 4
    for cell in cells.values():
        assert (tmp_path / "cells" / f"{cell['key']}.json").is_file() and (tmp_path / cell["run_dir"] / "metrics.jsonl").is_file()
    table = (tmp_path / "table.md").read_text(encoding="utf-8")
    assert f"| defense | none | {FlipTimesFour.name} |" in table
    assert f"| {DropLargest.name} | {cells[(DropLargest.name, 'none')]['accuracy']:.3f} |" in table
    assert json.loads((tmp_path / "table.json").read_text(encoding="utf-8")) == data

    again = run_robustness_table(grid, tmp_path, progress=False)
    assert len(calls) == 4, "a cached cell ran again"
    assert all(c["cached"] for c in again["cells"])
    assert [c["accuracy"] for c in again["cells"]] == [c["accuracy"] for c in data["cells"]]

    # An interrupted cell: its run directory was written but not its cell file. It re-runs in a clean directory.
    # So does a cell file this version cannot read.
    (tmp_path / "cells" / f"{guarded['key']}.json").unlink()
    (tmp_path / "cells" / f"{cells[('none', 'none')]['key']}.json").write_text('{"schema": "old"}', encoding="utf-8")
    resumed = run_robustness_table(grid, tmp_path, progress=False)
    assert len(calls) == 6
    redone = next(c for c in resumed["cells"] if c["key"] == guarded["key"])
    assert redone["status"] == "ok" and not redone["cached"] and redone["rounds_run"] == 1
    assert redone["accuracy"] == pytest.approx(guarded["accuracy"])

    # Another threat, the same no-defense no-attack config: cached, described by the new grid (f = 2 of 5 rows).
    other = RobustnessGrid(preset="smoke", defenses=("none",), attacks=("none",), modes=("plain",), rounds=1, clients=5,
                           fraction=0.4, overrides=FAST)
    relabelled = run_robustness_table(other, tmp_path, progress=False)
    assert len(calls) == 6 and relabelled["cells"][0]["cached"] and relabelled["cells"][0]["f"] == 2
    assert "## plain: 5 rows (client updates), f = 2" in (tmp_path / "table.md").read_text(encoding="utf-8")


def test_changing_a_setting_changes_the_key() -> None:
    grid = RobustnessGrid(defenses=("none",), attacks=("none",), modes=("plain",), clients=4)
    other = RobustnessGrid(defenses=("none",), attacks=("none",), modes=("plain",), clients=4, overrides=("client.lr=0.02",))
    keys = {cell_key("smoke", plan_cells(g)[0].overrides)[0] for g in (grid, other)}
    assert len(keys) == 2


class NeedsFactor(FlipTimesFour):
    """An attack whose setting ``factor`` has no default: a cell that does not set it is refused by the config."""

    name = "test-needs-factor"

    def __init__(self, *, factor: float) -> None:
        self.factor = factor


def test_refused_cells_are_recorded_with_their_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 clients, 1 attacker: f = 1 needs 5 rows (refused in round 1); SecAgg+ refuses buckets of 2 when the
    # server is built; the config refuses an attack without its required setting (nothing runs).
    monkeypatch.setitem(_ATTACKS._entries, NeedsFactor.name, NeedsFactor)
    grid = RobustnessGrid(
        defenses=(DropLargest.name,), attacks=("none", NeedsFactor.name), modes=("plain", "secagg+"), rounds=1,
        clients=4, bucket_size=2, overrides=FAST,
    )
    calls = _counting(monkeypatch)
    data = run_robustness_table(grid, tmp_path, progress=False)
    assert len(calls) == 2
    cells = {(c["mode"], c["attack"]): c for c in data["cells"]}
    plain, secure = cells[("plain", "none")], cells[("secagg+", "none")]
    assert plain["status"] == "refused" and "n >= 2f+3" in plain["reason"] and plain["f"] == 1 and plain["rows"] == 4
    assert secure["status"] == "refused" and "bucket_size" in secure["reason"] and secure["rows"] == 2
    unset = cells[("plain", NeedsFactor.name)]
    assert unset["status"] == "refused" and "attack.params" in unset["reason"] and unset["run_dir"] is None
    assert all("\n" not in c["reason"] for c in data["cells"])
    table = (tmp_path / "table.md").read_text(encoding="utf-8")
    assert f"| {DropLargest.name} | refused | refused |" in table
    assert f"- {DropLargest.name} x none: refused: {plain['reason']}" in table
    run_robustness_table(grid, tmp_path, progress=False)
    assert len(calls) == 2  # refusals are cached too


@pytest.mark.parametrize(("flag", "value"), [
    ("--defenses", "none,no-such-defense"),
    ("--attacks", "no-such-attack"),
    ("--modes", "plain,he"),
    ("--fraction", "1.0"),
    ("--fraction", "-0.1"),
    ("--rounds", "0"),
    ("--bucket-size", "-1"),
    ("--set", "robustness"),
    ("--set", "robustness.defense=none"),
    ("--set", "attack.params.no_such_setting=1"),
])
def test_a_bad_flag_exits_2_naming_it(flag: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "robustness", flag, value, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag}:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cells").exists()


def test_a_plugin_setting_override_reaches_only_the_plugins_that_have_it() -> None:
    grid = RobustnessGrid(defenses=("none", DropLargest.name), attacks=("none",), modes=("plain",), clients=8,
                          overrides=("robustness.params.f=0", "client.lr=0.02"))
    plans = {p.defense: p for p in plan_cells(grid)}
    assert plans[DropLargest.name].overrides[-2:] == ("robustness.params.f=0", "client.lr=0.02")
    assert "robustness.params.f=2" in plans[DropLargest.name].overrides  # the derived one, overridden after it
    assert plans["none"].overrides[-1] == "client.lr=0.02" and not any("params" in o for o in plans["none"].overrides)
    assert cell_key("smoke", plans[DropLargest.name].overrides)[1].robustness.params == {"f": 0}  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="--set: 'run.rounds=2': the table sets run.rounds in every cell; use --rounds"):
        RobustnessGrid(overrides=("run.rounds=2",))


def test_grid_validation_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--clients"):
        RobustnessGrid(clients=10000)  # 2400 synthetic examples are too few for 10000 clients
    with pytest.raises(ConfigError, match="--defenses: names a defense twice"):
        RobustnessGrid(defenses=("none", "none"))


def test_the_benchmark_script_takes_the_same_flags() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "robustness_table.py"), "--attacks", "none,nope"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 2 and "error: --attacks: unknown attack 'nope'" in done.stderr


def test_the_command_prints_the_table_it_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "robustness", "--defenses", "none", "--attacks", "none", "--modes", "plain", "--clients", "4",
            "--rounds", "1", "--set", "client.local_steps=2", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/1] plain none x none: acc " in out
    assert (tmp_path / "table.md").read_text(encoding="utf-8") in out
    assert f"wrote {tmp_path / 'table.md'} and {tmp_path / 'table.json'}" in out


def test_defaults_put_the_baselines_first_and_a_row_refused_alike_gets_one_reason_line() -> None:
    grid = RobustnessGrid(modes=("plain",), clients=8)
    assert grid.defenses[0] == "none" and DropLargest.name in grid.defenses
    assert grid.attacks[0] == "none" and FlipTimesFour.name in grid.attacks
    grid = RobustnessGrid(defenses=("none", DropLargest.name), attacks=("none", FlipTimesFour.name),
                          modes=("plain",), clients=8)

    def cell(defense: str, attack: str, status: str, reason: str | None, accuracy: float | None) -> CellResult:
        return CellResult(key=f"{defense}-{attack}", defense=defense, attack=attack, mode="plain", status=status,
                          reason=reason, accuracy=accuracy, backdoor_accuracy=None,
                          rounds_run=1, rounds_ok=1, seconds=1.0, attackers=2, rows=8, f=2, overrides=[], run_dir=None)

    data = table_data(grid, [
        cell("none", "none", "ok", None, 0.9), cell("none", FlipTimesFour.name, "failed", "boom", None),
        cell(DropLargest.name, "none", "refused", "needs more rows", None),
        cell(DropLargest.name, FlipTimesFour.name, "refused", "needs more rows", None),
    ])
    table = render_markdown(data)
    assert "| none | 0.900 | failed |" in table and f"| {DropLargest.name} | refused | refused |" in table
    assert f"- none x {FlipTimesFour.name}: failed: boom" in table
    assert f"- {DropLargest.name} x every attack: refused: needs more rows" in table
    assert table.count("needs more rows") == 1
