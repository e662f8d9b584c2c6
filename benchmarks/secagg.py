"""One SecAgg+ round of our real client and server halves, in memory, timed per phase.

N clients, one float32 update of d parameters each, a random Harary neighbour graph of degree k,
and a fraction F of the clients dropping after share-keys (before sending their masked input: the
case Flower's bench recovers, `shared/bench/flower/bench_secagg.py`). No transport, no training,
no serde: the phases' payloads go from one half to the other as Python objects, like
`tests/harness.py` ``drive``. Clients run one after another in this process.

Prints one JSON line: ``server_s`` (total) and ``server_phase_s`` (seconds the server spends on
each phase's answers), ``client_s`` (per client, all phases: mean and max over the survivors) and
``client_phase_s`` (mean and max per phase), ``upload_bytes`` (one client's masked-input answer)
next to ``float32_bytes``, ``plain_sum_s`` (the plain float32 sum of the same survivors' updates,
measured in this run), and N, d, k, t, bits, dropped.

Run:  .venv/bin/python benchmarks/secagg.py --n 100 --d 1e6 --k 10 --dropout 0.1
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import time
from collections import defaultdict

import numpy as np

from protocols.secagg import (
    Answer,
    ClientContext,
    Phase,
    PhaseData,
    PhaseResult,
    RoundContext,
    secaggplus_masks,
)
from protocols.secagg import secaggplus_stages as st
from protocols.secagg.secaggplus import SecAggPlus
from protocols.secagg.secaggplus_params import GraphParameters
from protocols.wire.serde import TensorSpec

now = time.perf_counter


def parse_args() -> argparse.Namespace:
    """Command-line options (sizes as in Flower's bench: ``-n``, ``-d``, ``-k``, ``--dropout``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", "-n", type=int, default=20, help="clients in the round (one bucket)")
    p.add_argument("--d", "-d", type=float, default=1e5, help="float32 parameters per update")
    p.add_argument("--k", "-k", type=int, default=10, help="neighbours per client (even; 0 = all)")
    p.add_argument("--dropout", type=float, default=0.0, help="fraction dropping after share-keys")
    p.add_argument("--threshold", type=float, default=0.5, help="t = floor(threshold * k) + 1")
    p.add_argument("--auto", action="store_true",
                   help="leave k and t to the parameter analysis at its default targets (ignores --k, --threshold)")
    p.add_argument("--corrupt-fraction", type=float, default=0.05, help="gamma of the (k, t) check")
    p.add_argument("--security-bits", type=int, default=20,
                   help="the (k, t) check's security target; 20 admits Flower's k=10 at n=100 (the default 40 does not)")
    p.add_argument("--correctness-bits", type=int, default=3,
                   help="the (k, t) check's correctness target; 3 admits k=10, t=6 with 10%% dropouts")
    p.add_argument("--threads", type=int, default=None, help="mask threads (default: MASK_THREADS)")
    p.add_argument("--clip-range", type=float, default=8.0, help="Flower's default clipping range")
    p.add_argument("--precision", type=float, default=2.0**-18,
                   help="quantisation step; 2**-18 over [-8, 8] is Flower's 2**22 levels")
    p.add_argument("--max-weight", type=int, default=1, help="client weights are clamped to [1, W]")
    return p.parse_args()


def _dropouts(phase: Phase, count: int, protocol: SecAggPlus, parameters: GraphParameters) -> set[str]:
    """``count`` random clients to drop in masked-input, redrawn until every survivor keeps t neighbours.

    The neighbour graph is read from the phase's public payloads (one share per neighbour). A
    draw that would abort (Flower's bench exits on it) is replaced, so every run measures a recovery.
    """
    graph = {c: {name[len(st.SHARE):] for name in data.blobs} for c, data in phase.payloads.items()}
    draw = secrets.SystemRandom()
    for _ in range(1000):
        dead = set(draw.sample(sorted(graph), count))
        if all(len(peers - dead) >= protocol.share_threshold(parameters, len(peers))
               for c, peers in graph.items() if c not in dead):
            return dead
    raise SystemExit(f"no dropout set of {count} clients leaves every survivor t live neighbours")


def main() -> None:
    """Run one round and print its JSON line."""
    a = parse_args()
    n, d = a.n, int(a.d)
    if a.threads is not None:
        secaggplus_masks.MASK_THREADS = a.threads
    graph: dict[str, object] = {} if a.auto else {
        "neighbours": a.k, "threshold": a.threshold, "security_bits": a.security_bits,
        "correctness_bits": a.correctness_bits,
    }
    protocol = SecAggPlus(
        bucket_size=0, corrupt_fraction=a.corrupt_fraction, dropout_fraction=a.dropout, clip_range=a.clip_range,
        precision=a.precision, max_weight=a.max_weight, **graph,  # type: ignore[arg-type]
    )
    parameters = protocol.parameters(n)
    ids = [f"client-{i:04d}" for i in range(n)]
    spec = {"w": TensorSpec("w", "float32", (d,))}
    rng = np.random.default_rng(secrets.randbits(64))
    updates = {c: {"w": rng.standard_normal(d, dtype=np.float32) * np.float32(0.01)} for c in ids}
    weights = {c: 1.0 for c in ids}
    dead: set[str] = set()

    server_s: dict[str, float] = {}
    client_s: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    wall0 = now()

    t0 = now()
    context = RoundContext("bench", 1, tuple(ids), protocol.assign_buckets(ids, rng), spec, 60.0)
    server = protocol.server_round(context)
    phase: Phase | None = server.first_phase()
    server_s["open"] = now() - t0
    clients = {}
    for c in ids:  # key generation happens when a client's round starts: part of advertise-keys
        t0 = now()
        clients[c] = protocol.client_round(ClientContext("bench", 1, c, spec))
        client_s[st.ADVERTISE_KEYS][c] += now() - t0
    upload_bytes = 0
    while phase is not None:
        if phase.trains:
            dead = _dropouts(phase, round(a.dropout * n), protocol, parameters)
        answers = {}
        for c in phase.participants:
            if phase.trains and c in dead:
                continue
            data = phase.payloads.get(c, PhaseData())
            t0 = now()
            if phase.trains:
                q = clients[c].quantise(updates[c])
                out = clients[c].mask(q, weight=weights[c], data=data)
                upload_bytes = int(out.tensors[st.MASKED].nbytes)
            else:
                out = clients[c].on_phase(phase.name, data)
            client_s[phase.name][c] += now() - t0
            answers[c] = Answer(c, out.tensors, out.blobs)
        t0 = now()
        name = phase.name
        phase = server.next_phase(PhaseResult(phase, answers))
        server_s[name] = now() - t0
    (bucket,) = server.result()
    server_total = sum(server_s.values())

    survivors = [c for c in ids if c not in dead]
    t0 = now()
    plain = updates[survivors[0]]["w"].copy()
    for c in survivors[1:]:
        plain += updates[c]["w"]
    plain_sum_s = now() - t0

    assert bucket.members == tuple(survivors), "the unmasked sum must cover exactly the survivors"
    err = float(np.max(np.abs(bucket.mean()["w"] - plain / len(survivors))))
    totals = [sum(client_s[p].get(c, 0.0) for p in st.PHASES) for c in survivors]

    def spread(values: list[float]) -> dict[str, float]:
        return {"mean": round(statistics.fmean(values), 5), "max": round(max(values), 5)}

    record = {
        "bench": "secagg+",
        "N": n,
        "d": d,
        "k": parameters.k,
        "t": protocol.share_threshold(parameters, parameters.k),
        "bits": protocol.plan(n).bits,
        "mask_threads": secaggplus_masks.MASK_THREADS,
        "security_failure_log2": parameters.describe()["security_failure_log2"],
        "correctness_failure_log2": parameters.describe()["correctness_failure_log2"],
        "dropout": a.dropout,
        "dropped": len(dead),
        "server_s": round(server_total, 4),
        "server_phase_s": {k: round(v, 4) for k, v in server_s.items()},
        "client_s": spread(totals),
        "client_phase_s": {p: spread([client_s[p].get(c, 0.0) for c in survivors]) for p in st.PHASES},
        "upload_bytes": upload_bytes,
        "float32_bytes": 4 * d,
        "upload_ratio": round(upload_bytes / (4 * d), 4),
        "plain_sum_s": round(plain_sum_s, 5),
        "server_over_plain_sum": round(server_total / plain_sum_s, 1),
        "max_abs_err_vs_mean": err,
        "wall_s": round(now() - wall0, 2),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
