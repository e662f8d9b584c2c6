"""A real gRPC server and two clients on loopback, driven from Python.

The same thing ``secure-fl-server`` and ``secure-fl-client`` do, inside one script: the server
listens on 127.0.0.1 (a free port), two client threads join over their own gRPC channels, train
their partitions of the smoke preset's synthetic data, and the server's result comes back.

Run:  python examples/loopback_server_clients.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import threading

import secure_fl


def main(fast: bool = False, out: str | None = None) -> secure_fl.RunResult:
    config = secure_fl.load_preset("smoke").with_overrides(
        ["run.num_clients=2", "run.clients_per_round=2", "run.join_timeout=60", f"run.rounds={2 if fast else 5}"]
    )
    out = out or tempfile.mkdtemp(prefix="secure-fl-loopback-")
    summaries: list[secure_fl.ClientSummary] = []
    with secure_fl.Server(config, address="127.0.0.1:0", out_dir=out, progress=not fast) as server:
        threads = [
            threading.Thread(
                target=lambda cid=f"client-{i}": summaries.append(
                    secure_fl.run_client(config, server=server.address, client_id=cid)
                )
            )
            for i in range(2)
        ]
        for thread in threads:
            thread.start()
        result = server.wait(timeout=300)
        for thread in threads:
            thread.join(60)
    for summary in summaries:
        print(f"{summary.client_id} trained rounds {summary.rounds_trained}")
    print(f"server: {len(result.metrics)} rounds, final accuracy {result.final_accuracy:.3f}; outputs in {result.run_dir}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two rounds (used by the test suite)")
    parser.add_argument("--out", help="run directory (default: a temporary directory)")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
