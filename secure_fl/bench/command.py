"""The flags of ``secure-fl bench robustness``, shared with ``benchmarks/robustness_table.py``.

Both parse the same arguments into a `RobustnessGrid` and call `run_robustness_table`; a bad value
raises `ConfigError` naming its flag (both commands print it and exit with status 2). Importing
this module loads no torch: the simulation is imported when the first cell runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from secure_fl.bench.robustness import BENCH_PRESETS, DEFAULT_BUCKET_SIZE, MODES, RobustnessGrid, run_robustness_table
from secure_fl.bench.table import render_markdown


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the robustness table's flags to ``parser``."""
    parser.add_argument("--preset", choices=tuple(BENCH_PRESETS), default="smoke",
                        help="bench preset: smoke or bbc-news (20 clients, fraction 0.2 each); default smoke")
    parser.add_argument("--defenses", type=_names, default=(), metavar="A,B,...",
                        help="defenses to compare (default: every registered one)")
    parser.add_argument("--attacks", type=_names, default=(), metavar="X,Y,...",
                        help="attacks to compare; 'none' is the no-attack baseline (default: every registered one)")
    parser.add_argument("--modes", type=_names, default=MODES, metavar="M,...",
                        help=f"secure modes: {', '.join(MODES)} (default: both)")
    parser.add_argument("--rounds", type=int, metavar="R", help="rounds per cell (default: the preset's: smoke 3, bbc-news 4)")
    parser.add_argument("--clients", type=int, metavar="N", help="clients, all of them every round (default: the preset's)")
    parser.add_argument("--fraction", type=float, metavar="F", help="share of attackers in the attacked columns, in [0, 1)")
    parser.add_argument("--bucket-size", type=int, default=DEFAULT_BUCKET_SIZE, metavar="S",
                        help=f"most clients per SecAgg+ bucket in mode secagg+ (default {DEFAULT_BUCKET_SIZE})")
    parser.add_argument("--out", metavar="DIR", help="output directory (default bench/robustness-<preset>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value in every cell (repeatable), e.g. --set client.lr=0.02")


def grid_from_args(args: argparse.Namespace) -> RobustnessGrid:
    """The grid the parsed flags describe (raises `ConfigError` naming the bad flag)."""
    return RobustnessGrid(
        preset=args.preset, defenses=args.defenses, attacks=args.attacks, modes=args.modes, rounds=args.rounds,
        clients=args.clients, fraction=args.fraction, bucket_size=args.bucket_size, overrides=tuple(args.overrides),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run the table the flags describe and print its markdown; returns the exit status (0)."""
    grid = grid_from_args(args)
    out = args.out or f"bench/robustness-{grid.preset}"
    data = run_robustness_table(grid, out)
    print(render_markdown(data), end="")
    print(f"wrote {Path(out) / 'table.md'} and {Path(out) / 'table.json'}")
    return 0
