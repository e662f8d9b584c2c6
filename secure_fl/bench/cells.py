"""One cell of the robustness table: run it (a real simulation) or read it from the cache.

A cell's key is a hash of its resolved config; its result is ``OUT/cells/<key>.json`` (written
atomically once the run ended, so a file there is always a finished cell) and its run directory
``OUT/runs/<key>/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from secure_fl.config import Config, load_preset
from secure_fl.errors import ConfigError, RunError

#: Cell outcomes: ran to the end, refused by a config or defense precondition, failed while running.
STATUSES = ("ok", "refused", "failed")


@dataclass(frozen=True)
class CellPlan:
    """One cell: its names, its full override list and the threat its defense settings assume."""

    defense: str
    attack: str
    mode: str
    overrides: tuple[str, ...]
    attackers: int
    rows: int
    f: int


@dataclass
class CellResult:
    """What one cell measured (the fields of ``cells/<key>.json`` and of ``table.json``).

    Attributes
    ----------
    status, reason:
        One of `STATUSES`; the one-line reason when not ``ok``.
    accuracy, backdoor_accuracy:
        After the last released round (``backdoor_accuracy`` only where the attack measures it).
    rounds_run, rounds_ok:
        Rounds recorded in the run's ``metrics.jsonl``, and those with status ``ok``.
    seconds:
        Wall time of the cell's simulation (of the original run, for a cached cell).
    cached:
        Read from ``cells/<key>.json`` in this invocation (not stored in the file).
    """

    key: str
    defense: str
    attack: str
    mode: str
    status: str
    reason: str | None
    accuracy: float | None
    backdoor_accuracy: float | None
    rounds_run: int
    rounds_ok: int
    seconds: float
    attackers: int
    rows: int
    f: int
    overrides: list[str]
    run_dir: str | None
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        """The stored fields (everything but `cached`)."""
        data = asdict(self)
        del data["cached"]
        return data


def cell_key(base: str, overrides: Sequence[str]) -> tuple[str, Config | None, str | None]:
    """``(key, config, refusal)``: the hash of the resolved config, or of the inputs when it is refused."""
    try:
        config = load_preset(base).with_overrides(overrides)
    except ConfigError as exc:
        text = "\n".join(["refused", base, *overrides])
        return hashlib.sha256(text.encode()).hexdigest()[:16], None, _one_line(exc)
    return hashlib.sha256(config.to_toml().encode()).hexdigest()[:16], config, None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _last(records: Sequence[dict[str, Any]], key: str) -> float | None:
    for record in reversed(records):
        if record.get("status", "ok") == "ok" and record.get(key) is not None:
            return float(record[key])
    return None


def _cached(cell_file: Path, plan: CellPlan) -> CellResult | None:
    """The stored result (same resolved config: its measurements hold; names and threat from ``plan``).

    ``None`` when there is none, or when it cannot be read as a cell of this version (it is re-run).
    """
    if not cell_file.is_file():
        return None
    names = {"defense": plan.defense, "attack": plan.attack, "mode": plan.mode, "attackers": plan.attackers,
             "rows": plan.rows, "f": plan.f, "overrides": list(plan.overrides)}
    try:
        stored = json.loads(cell_file.read_text(encoding="utf-8"))
        return CellResult(**{**stored, **names}, cached=True)
    except (ValueError, TypeError):
        return None


def run_cell(plan: CellPlan, base: str, out: Path) -> CellResult:
    """Run one cell (or read it from the cache) and store its result in ``out/cells/<key>.json``.

    A run directory without a cell file belongs to an interrupted cell and is removed first (a run
    directory holds one run). A refused config (`ConfigError`) or defense precondition
    (`robustness.errors.InsufficientHonestClients`) gives status ``refused``; `RunError` and other
    robustness errors give ``failed``; anything else is a bug and propagates.
    """
    from robustness.errors import InsufficientHonestClients, RobustnessError

    key, config, refusal = cell_key(base, plan.overrides)
    cell_file = out / "cells" / f"{key}.json"
    cached = _cached(cell_file, plan)
    if cached is not None:
        return cached
    run_dir = out / "runs" / key
    status, reason, started = "ok", refusal, time.perf_counter()
    if config is None:
        status = "refused"
    else:
        from secure_fl import simulation  # the module attribute, so a test can count the calls

        if run_dir.exists():
            shutil.rmtree(run_dir)
        try:
            simulation.simulate(config, run_dir, progress=False)
        except (ConfigError, InsufficientHonestClients) as exc:
            status, reason = "refused", _one_line(exc)
        except (RunError, RobustnessError) as exc:
            status, reason = "failed", _one_line(exc)
    records = _metrics(run_dir)
    bad = [r for r in records if r.get("status", "ok") != "ok"]
    if status == "ok" and records and len(bad) == len(records):  # no round released anything
        reason = " ".join(str(bad[0].get("reason") or "every round failed").split())
        status = "refused" if "refused the round" in reason else "failed"
    result = CellResult(
        key=key, defense=plan.defense, attack=plan.attack, mode=plan.mode, status=status, reason=reason,
        accuracy=_last(records, "accuracy"), backdoor_accuracy=_last(records, "backdoor_accuracy"),
        rounds_run=len(records), rounds_ok=sum(r.get("status", "ok") == "ok" for r in records),
        seconds=round(time.perf_counter() - started, 3), attackers=plan.attackers, rows=plan.rows, f=plan.f,
        overrides=list(plan.overrides), run_dir=str(run_dir.relative_to(out)) if config is not None else None,
    )
    atomic_write(cell_file, json.dumps(result.to_json(), indent=2) + "\n")
    return result
