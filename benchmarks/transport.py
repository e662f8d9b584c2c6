"""Upload throughput and server memory for one large update over real gRPC on loopback.

Starts a coordinator behind a real gRPC server on 127.0.0.1, joins one client, opens a round that
expects a single float32 tensor of ``--mb`` megabytes, and pushes it in ``--chunk-kib`` chunks with
the default gRPC message limits (4 MiB). Prints one JSON line: seconds, MB/s, chunk count and the
server process's peak RSS growth. Shows that a 500 MB update needs no raised message limits.

Run:  python benchmarks/transport.py --mb 500
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from protocols.wire import serde
from protocols.wire.v1 import federation_pb2 as pb
from protocols.wire.limits import PROTOCOL_VERSION
from secure_fl.server.coordinator import Coordinator
from secure_fl.transport.grpc_client import GrpcTransport
from secure_fl.transport.grpc_server import GrpcServer


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="update size in MB (float32)")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="chunk size in KiB")
    args = parser.parse_args()

    count = int(args.mb * 1e6 // 4)
    update = {"weights": np.random.default_rng(0).standard_normal(count, dtype=np.float32)}
    spec = serde.spec_of(update)
    coordinator = Coordinator(
        run_id="bench", model_fingerprint="f", payload_spec=spec, stages={"secure": "plain", "privacy": "none"},
        max_update_bytes=4 << 30, chunk_size=args.chunk_kib << 10, poll_interval=0.1,
    )
    server = GrpcServer(coordinator, "127.0.0.1:0").start()
    client = GrpcTransport(server.address)
    client.join(pb.JoinRequest(envelope=serde.envelope("", 0, "c0"), protocol_version=PROTOCOL_VERSION, model_fingerprint="f", num_examples=1))
    coordinator.open_round(1, ["c0"], *serde.pack_tensors({}), plan={}, timeout=600)

    manifest, body = serde.pack_tensors(update)
    header = pb.UpdateHeader(envelope=serde.envelope("bench", 1, "c0"), manifest=manifest, weight=1.0, encoding="plain")
    rss_before = _peak_rss_mb()
    started = time.perf_counter()
    reply = client.push_update(serde.update_stream(header, body, args.chunk_kib << 10))
    seconds = time.perf_counter() - started
    state = coordinator.wait_round()
    received = state.received["c0"].tensors["weights"]
    assert reply.accepted and np.array_equal(received, update["weights"])
    print(json.dumps({
        "bench": "transport_push",
        "update_mb": round(len(body) / 1e6, 1),
        "chunk_kib": args.chunk_kib,
        "chunks": -(-len(body) // (args.chunk_kib << 10)),
        "seconds": round(seconds, 3),
        "mb_per_s": round(len(body) / 1e6 / seconds, 1),
        "wire_bytes": state.bytes_up,
        "peak_rss_growth_mb": round(_peak_rss_mb() - rss_before, 1),
    }))
    client.close()
    server.stop(grace=0)


if __name__ == "__main__":
    main()
