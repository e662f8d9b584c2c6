"""Long fuzz run of the gRPC server (issue 15): malformed messages on every RPC and phase.

    PYTHONPATH=. python benchmarks/fuzz.py --messages 10000 --seed 0 --mode plain
    PYTHONPATH=. python benchmarks/fuzz.py --messages 10000 --seed 0 --mode secagg+

Prints one JSON line: messages sent, refusals by status code, crashes (INTERNAL, UNKNOWN, other
codes, hangs), accepted_invalid, the honest rounds that finished ok, seconds. The harness and its
oracles are described in ``tests/fuzz_harness.py``; the short run is ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz_harness import fuzz_config, run_fuzz  # noqa: E402


def main() -> None:
    """Run one fuzz campaign and print its summary as a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000, help="malformed messages to send (about)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutator")
    parser.add_argument("--mode", choices=("plain", "secagg+"), default="plain", help="secure mode of the run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the honest federation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_fuzz(fuzz_config(args.mode, rounds=args.rounds), Path(tmp) / "run", messages=args.messages, seed=args.seed)
    summary.pop("evidence", None) if not summary.get("evidence") else None
    print(json.dumps(summary), flush=True)
    sys.exit(1 if summary["crashes"] or summary["accepted_invalid"] or summary["honest_rounds_ok"] != args.rounds else 0)


if __name__ == "__main__":
    main()
