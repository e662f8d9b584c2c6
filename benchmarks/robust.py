"""Speed of the robust aggregation rules on N x d float32 updates (Flower's workload).

The updates are Flower's: ``default_rng(0)``, ``standard_normal(d) * 0.01`` per client, and the
trimmed mean cuts ``--trim-fraction`` (Flower's ``beta``, 0.2) per side. Each rule is timed
``--repeat`` times on the pure functions of ``robustness.defenses._rules`` (input checks
included); one JSON line per rule gives the median and best seconds.

With ``--flower-json FILE`` (the output of ``shared/bench/flower/bench_robust.py --bulyan``, one
JSON line per run), each line also gives Flower's time, the fastest of its two layers (legacy
functional API and Message-API strategy) over all runs in the file, and ``ratio`` = Flower's
seconds / our median seconds: a conservative speed-up.

Run:  python benchmarks/robust.py -n 50 -d 1e6 -f 5 --repeat 3 --flower-json flower.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from robustness.defenses import _rules

#: Our rule -> Flower's timing keys (legacy functional API, Message-API strategy).
FLOWER_KEYS: dict[str, tuple[str, ...]] = {
    "krum": ("legacy_aggregate_krum", "msgapi_Krum.aggregate_train"),
    "multi-krum": ("legacy_aggregate_multikrum", "msgapi_MultiKrum.aggregate_train"),
    "median": ("legacy_aggregate_median", "msgapi_FedMedian.aggregate_train"),
    "trimmed-mean": ("legacy_aggregate_trimmed_avg", "msgapi_FedTrimmedAvg.aggregate_train"),
    "bulyan": ("legacy_aggregate_bulyan", "msgapi_Bulyan.aggregate_train"),
}


def flower_seconds(path: Path) -> dict[str, float]:
    """Flower's fastest time per rule over every JSON line of ``path`` and both of its layers."""
    best: dict[str, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip().startswith("{"):
            continue
        seconds = json.loads(line).get("seconds", {})
        for rule, keys in FLOWER_KEYS.items():
            for key in keys:
                if key in seconds:
                    best[rule] = min(best.get(rule, float("inf")), float(seconds[key]))
    return best


def rules(f: int, trim_fraction: float) -> dict[str, Callable[[np.ndarray], Any]]:
    """The timed calls, in Flower's settings (Multi-Krum keeps n - f)."""
    return {
        "krum": lambda x: _rules.krum(x, f),
        "multi-krum": lambda x: _rules.multi_krum(x, f),
        "median": _rules.coordinate_median,
        "trimmed-mean": lambda x: _rules.trimmed_mean(x, trim_fraction),
        "bulyan": lambda x: _rules.bulyan(x, f),
        "norm-bound": lambda x: _rules.norm_bound(x, _rules.median_norm(x)),
        "centered-clip": lambda x: _rules.centered_clip(x, np.zeros(x.shape[1], np.float32), 1.0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--num-clients", type=int, default=50, help="rows (clients) N")
    parser.add_argument("-d", "--dim", type=float, default=1e6, help="values per update d")
    parser.add_argument("-f", "--num-malicious", type=int, default=5, help="f for Krum, Multi-Krum and Bulyan")
    parser.add_argument("--trim-fraction", type=float, default=0.2, help="trimmed-mean cut per side (Flower's beta)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per rule")
    parser.add_argument("--rules", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--flower-json", type=Path, default=None, help="Flower's bench_robust.py output: adds ratios")
    args = parser.parse_args()
    n, d, f = args.num_clients, int(args.dim), args.num_malicious
    rng = np.random.default_rng(0)
    x = np.stack([rng.standard_normal(d, dtype=np.float32) * 0.01 for _ in range(n)])
    flower = flower_seconds(args.flower_json) if args.flower_json else {}
    chosen = [r for r in args.rules.split(",") if r] or list(rules(f, args.trim_fraction))
    table = rules(f, args.trim_fraction)
    for name in chosen:
        if name == "bulyan" and n < 4 * f + 3 or name in ("krum", "multi-krum") and n < 2 * f + 3:
            continue
        times = []
        for _ in range(max(1, args.repeat)):
            start = time.perf_counter()
            table[name](x)
            times.append(time.perf_counter() - start)
        record: dict[str, Any] = {
            "bench": "robust", "rule": name, "N": n, "d": d, "f": f,
            "seconds": round(statistics.median(times), 4), "best_s": round(min(times), 4), "repeat": len(times),
        }
        if name in flower:
            record["flower_s"] = round(flower[name], 4)
            record["ratio"] = round(flower[name] / max(statistics.median(times), 1e-9), 2)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
