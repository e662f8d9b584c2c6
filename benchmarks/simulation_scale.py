"""Peak memory and seconds per round of ``secure-fl simulate`` as the population grows.

For each population size P (default 10, 100, 1,000 and 10,000 parties) one child process runs the
smoke preset's model (tiny-bert, LoRA r = 4) on a synthetic set of ``--examples-per-party`` * P
training examples plus 240 held out (the same evaluation for every P), IID, with ``--cohort``
parties per round, and prints one JSON line:

* ``parties``, ``cohort``, ``rounds``, ``backend``;
* ``peak_rss_mb``: the child's peak resident set (``ru_maxrss``), everything included: Python,
  torch, the server, the population's raw text and every party built;
* ``join_s``: seconds outside the rounds: the server and the shared model, then every party
  joining (each is built once, joins and is dropped);
* ``seconds_per_round``: the mean wall time of a round (the server's ``seconds`` in metrics.jsonl);
* ``rss_ratio_to_smallest``: peak RSS over the smallest population's (the target: <= 1.5 at 10,000).

A child process per size keeps one run's peak from hiding another's. The raw synthetic text grows
with P (``examples_per_party`` short texts a party); nothing else does.

Run:  .venv/bin/python benchmarks/simulation_scale.py --parties 10 100 1000 10000 --cohort 10 --rounds 3
      (add ``--backend ray`` for the Ray backend on a local instance)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


#: Examples the server holds out and evaluates every round, whatever the population.
HELD_OUT = 240


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parties", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--cohort", type=int, default=10, help="parties per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples-per-party", type=int, default=8)
    parser.add_argument("--backend", choices=("in-process", "ray"), default="in-process")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray instance (--backend ray)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def overrides(parties: int, args: argparse.Namespace) -> list[str]:
    """The smoke preset changed to ``parties`` parties, ``args.cohort`` a round, synthetic IID data."""
    return [
        f"run.num_clients={parties}", f"run.clients_per_round={min(args.cohort, parties)}",
        f"run.min_updates={min(args.cohort, parties)}", f"run.rounds={args.rounds}",
        "data.dataset='synthetic'", "data.partition='iid'",
        # a held-out set of the same size for every population (the server evaluates it each round)
        f"data.synthetic_examples={args.examples_per_party * parties + HELD_OUT}",
        f"data.test_fraction={HELD_OUT / (args.examples_per_party * parties + HELD_OUT)!r}",
        f"simulation.backend='{args.backend}'", "simulation.client_resources.num_cpus=1",
    ]


def child(parties: int, args: argparse.Namespace) -> dict[str, object]:
    """Run one simulation in this process and measure it."""
    from secure_fl.config import load_preset
    from secure_fl.simulation import simulate

    config = load_preset("smoke").with_overrides(overrides(parties, args))
    if args.backend == "ray":
        import ray

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = simulate(config, Path(out) / "run", progress=False)
    total = time.perf_counter() - started
    rounds = [float(r["seconds"]) for r in result.metrics]
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "benchmark": "simulation_scale", "backend": args.backend, "parties": parties, "cohort": min(args.cohort, parties),
        "rounds": len(rounds), "peak_rss_mb": round(peak_kb / 1024, 1),
        "seconds_per_round": round(sum(rounds) / len(rounds), 3), "join_s": round(total - sum(rounds), 3),
        "clients_per_round": [r["clients"] for r in result.metrics],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args)), flush=True)
        return 0
    smallest: float | None = None
    for parties in args.parties:
        command = [sys.executable, __file__, "--child", str(parties), "--cohort", str(args.cohort),
                   "--rounds", str(args.rounds), "--examples-per-party", str(args.examples_per_party),
                   "--backend", args.backend, "--ray-cpus", str(args.ray_cpus)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            print(json.dumps({"benchmark": "simulation_scale", "parties": parties, "error": proc.stderr[-2000:]}))
            return 1
        line = json.loads(proc.stdout.strip().splitlines()[-1])
        smallest = smallest or float(line["peak_rss_mb"])
        line["rss_ratio_to_smallest"] = round(float(line["peak_rss_mb"]) / smallest, 3)
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
