"""The robustness table (defenses x attacks x secure modes), as ``secure-fl bench robustness``.

Same flags and same function (`secure_fl.bench.robustness.run_robustness_table`); each cell is a
real simulation, cached in OUT/cells/ so an interrupted table resumes. Writes OUT/table.md and
OUT/table.json and prints the markdown. A bad flag value prints one line naming it and exits 2.

Run:  .venv/bin/python benchmarks/robustness_table.py --preset smoke --modes plain --out bench/robustness-smoke
"""

from __future__ import annotations

import argparse
import sys

from secure_fl.bench.command import add_arguments, run_from_args
from secure_fl.errors import ConfigError


def main() -> int:
    """Parse the flags and run the table; 2 on a bad flag value."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    try:
        return run_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
