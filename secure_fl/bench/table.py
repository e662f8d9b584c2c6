"""The robustness table's two outputs: ``table.json`` (every cell) and ``table.md`` (one table per mode).

In the markdown, rows are defenses and columns attacks; a cell is the final accuracy, with
``bd x.xx`` (the backdoor accuracy: the attacker's success) where the attack measures it,
``refused`` where a precondition does not hold and ``failed`` where the run failed; each refused or
failed cell's reason is listed under its table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from secure_fl.bench.cells import CellResult
    from secure_fl.bench.robustness import RobustnessGrid

SCHEMA = "secure-fl/bench-robustness/v1"


def table_data(grid: RobustnessGrid, cells: Sequence[CellResult]) -> dict[str, Any]:
    """The ``table.json`` content: the grid's settings, then every cell's fields."""
    return {
        "schema": SCHEMA,
        "preset": grid.preset,
        "base_preset": grid.bench.base,
        "clients": grid.num_clients,
        "rounds": grid.num_rounds,
        "fraction": grid.attack_fraction,
        "attackers": grid.attackers,
        "bucket_size": grid.bucket_size,
        "modes": list(grid.modes),
        "threat": {mode: dict(zip(("rows", "f"), grid.threat(mode))) for mode in grid.modes},
        "defenses": list(grid.defenses),
        "attacks": list(grid.attacks),
        "overrides": list(grid.overrides),
        "cells": [{**cell.to_json(), "cached": cell.cached} for cell in cells],
    }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def cell_text(cell: Mapping[str, Any]) -> str:
    """What a markdown cell shows: ``0.912``, ``0.874 bd 0.95``, ``refused`` or ``failed``."""
    if cell["status"] != "ok":
        return str(cell["status"])
    text = "n/a" if cell["accuracy"] is None else f"{cell['accuracy']:.3f}"
    if cell.get("backdoor_accuracy") is not None:
        text += f" bd {cell['backdoor_accuracy']:.2f}"
    return text


def cell_line(index: int, total: int, cell: CellResult) -> str:
    """The progress line of a finished cell: ``[3/16] plain krum x sign-flip: acc 0.9125 (9.8 s)``."""
    where = f"[{index}/{total}] {cell.mode} {cell.defense} x {cell.attack}"
    if cell.status != "ok":
        what = f"{cell.status}: {cell.reason}"
    else:
        acc = "n/a" if cell.accuracy is None else f"{cell.accuracy:.4f}"
        what = f"acc {acc}" + ("" if cell.backdoor_accuracy is None else f", backdoor acc {cell.backdoor_accuracy:.4f}")
    return f"{where}: {what} ({'cached' if cell.cached else f'{cell.seconds:.1f} s'})"


def _notes(cells: Sequence[Mapping[str, Any]], defenses: Sequence[str]) -> list[str]:
    """One line per refused or failed cell; one per defense when all its cells say the same."""
    lines = []
    for defense in defenses:
        row = [c for c in cells if c["defense"] == defense]
        bad = [c for c in row if c["status"] != "ok"]
        if len(row) > 1 and len(bad) == len(row) and len({(c["status"], c["reason"]) for c in bad}) == 1:
            lines.append(f"- {defense} x every attack: {bad[0]['status']}: {bad[0]['reason']}")
        else:
            lines += [f"- {defense} x {c['attack']}: {c['status']}: {c['reason']}" for c in bad]
    return lines


def render_markdown(data: Mapping[str, Any]) -> str:
    """``table.md``: a header saying what was run, then per mode a defenses x attacks table and its reasons."""
    attacks: list[str] = list(data["attacks"])
    lines = [
        f"# Robustness table: preset {data['preset']}",
        "",
        f"{_count(data['clients'], 'client')}, all of them every round, {_count(data['rounds'], 'round')}. "
        f"Attacked columns: {_count(data['attackers'], 'attacker')} (fraction {data['fraction']:g}); column `none`: no attackers. "
        "Defense settings from the threat, the same in every column: f = min(attackers, rows), "
        "trim_fraction = f / rows, norm_bound = 0 (the median norm). Cell: accuracy after the last round; "
        "`bd x.xx`: backdoor accuracy (the attack's success); `refused`: a precondition does not hold (reasons below).",
    ]
    if data["overrides"]:
        lines += ["", "Overrides: " + ", ".join(f"`{o}`" for o in data["overrides"])]
    for mode in data["modes"]:
        cells = [c for c in data["cells"] if c["mode"] == mode]
        if not cells:
            continue
        threat = data["threat"][mode]
        rows = "client updates" if mode == "plain" else f"bucket sums, at most {data['bucket_size']} clients a bucket"
        lines += ["", f"## {mode}: {_count(threat['rows'], 'row')} ({rows}), f = {threat['f']}", ""]
        lines.append("| defense | " + " | ".join(attacks) + " |")
        lines.append("|---" * (len(attacks) + 1) + "|")
        by_name = {(c["defense"], c["attack"]): c for c in cells}
        for defense in data["defenses"]:
            row = [cell_text(by_name[(defense, a)]) if (defense, a) in by_name else "" for a in attacks]
            lines.append(f"| {defense} | " + " | ".join(row) + " |")
        notes = _notes(cells, data["defenses"])
        if notes:
            lines += ["", *notes]
    seconds = sum(c["seconds"] for c in data["cells"])
    lines += ["", f"{len(data['cells'])} cells, {seconds:.0f} s of simulation in all."]
    return "\n".join(lines) + "\n"
