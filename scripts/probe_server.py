"""Probe a running secure-fl server the way a hostile party would, speaking the wire protocol directly.

Starts ``secure-fl-server --preset smoke`` from the given checkout (``--tree``, default: this one)
on a free loopback port, runs each probe against it and prints one JSON line per probe: what was
sent, what came back and how long it took. Run it on two checkouts to compare before and after:

    python scripts/probe_server.py                      # this checkout
    python scripts/probe_server.py --tree ../old-commit # another checkout (same venv)

The probes use only the .proto (the generated stubs of this checkout), so they work against any
v1 server. They are the ones the "independent client" review used; the regression tests live in
tests/test_trust_boundary.py and tests/test_run_lifecycle.py.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from protocols.wire import serde  # noqa: E402
from protocols.wire.v1 import federation_pb2 as pb  # noqa: E402
from protocols.wire.v1 import federation_pb2_grpc as pb_grpc  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _outcome(call: Callable[[], Any]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        value = call()
        out: dict[str, Any] = {"result": "accepted", "detail": str(value)[:160]}
    except grpc.RpcError as exc:
        out = {"result": exc.code().name, "detail": (exc.details() or "")[:160]}
    out["seconds"] = round(time.perf_counter() - started, 3)
    return out


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Prober:
    def __init__(self, tree: Path, out: Path) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        code = "import sys; from secure_fl.cli import server_main; sys.exit(server_main())"
        self.server = subprocess.Popen(
            [sys.executable, "-c", code, "--preset", "smoke", "--address", self.address, "--out", str(out),
             "--set", "run.join_timeout=600", "--set", "run.num_clients=4", "--set", "run.clients_per_round=4"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tree,
        )
        assert self.server.stdout is not None
        self.server.stdout.readline()  # "listening on ..."
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.fingerprint = ""
        self.run_id = ""
        self.joined: set[str] = set()

    def join(self, client_id: str, *, fingerprint: str | None = None, examples: int = 100, info=None) -> Any:
        reply = self.stub.Join(pb.JoinRequest(
            envelope=serde.envelope("", 0, client_id), protocol_version=1,
            model_fingerprint=self.fingerprint if fingerprint is None else fingerprint, num_examples=examples,
            info=info or {},
        ), timeout=10)
        self.run_id = reply.envelope.run_id
        self.joined.add(client_id)
        return reply.envelope.run_id

    def close(self) -> None:
        self.channel.close()
        self.server.terminate()
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()


def _silent(stop: threading.Event) -> Iterator[pb.UpdateChunk]:
    stop.wait(120)
    return
    yield  # pragma: no cover


class _Rows(list):  # type: ignore[type-arg]
    """Prints each probe's line as soon as it is known (a later probe may wedge an old server)."""

    def __init__(self, tree: Path) -> None:
        super().__init__()
        self.tree = tree

    def append(self, row: dict[str, Any]) -> None:
        super().append(row)
        print(json.dumps({"tree": str(self.tree), **row}), flush=True)


def _lying_client(probe: Prober, rows: list[dict[str, Any]], info: dict[str, str]) -> list[dict[str, Any]]:
    """Fill the run, then let c0 send lying uploads for the round that opens."""
    joins = [_outcome(lambda i=i: probe.join(f"c{i}", info=info)) for i in (0, 1, 2, 3) if f"c{i}" not in probe.joined]
    if any(j["result"] != "accepted" for j in joins):
        rows.append({"probe": "Joins after the earlier probes", **joins[-1]})
        return rows
    rows.append({"probe": "a 5th party joins a 4-party run", **_outcome(lambda: probe.join("c4", info=info))})
    # the round opens; the cohort members among c0..c4 pull the task and lie
    run_id = probe.run_id
    members: list[str] = []
    deadline = time.monotonic() + 30
    while len(members) < 3 and time.monotonic() < deadline:
        for who in ("c0", "c1", "c2", "c3", "c4"):
            if who in members or who not in probe.joined:
                continue
            chunks = list(probe.stub.PullTask(pb.PullTaskRequest(envelope=serde.envelope(run_id, 0, who)), timeout=10))
            header_, payload_ = serde.read_task_stream(chunks, max_bytes=1 << 30)
            if header_.kind == pb.TaskHeader.TRAIN:
                members.append(who)
                header, payload = header_, payload_
        time.sleep(0.2)
    state = serde.unpack_tensors(header.manifest, payload)
    round_number, phase = header.envelope.round, getattr(header, "phase", "")

    def push(tensors: dict[str, np.ndarray], weight: float, metrics=None, total: int | None = None, who: str = "c0") -> Any:
        manifest, body = serde.pack_tensors(tensors)
        if total is not None:
            manifest.total_bytes = total
        envelope = serde.envelope(run_id, round_number, who)
        if phase:
            envelope.phase = phase
        head = pb.UpdateHeader(envelope=envelope, manifest=manifest, weight=weight, encoding="plain", metrics=metrics or {})
        messages = [pb.UpdateChunk(header=head)] + [pb.UpdateChunk(chunk=c) for c in serde.iter_chunks(body, 4096)]
        return probe.stub.PushUpdate(iter(messages), timeout=20).accepted

    zeros = {k: np.zeros_like(v) for k, v in state.items()}
    rss = _rss_mb(probe.server.pid)
    result = _outcome(lambda: push(zeros, 1.0, total=1 << 30, who=members[0]))
    rows.append({"probe": "header declares 1 GiB for a small update", **result,
                 "server_rss_growth_mb": round(_rss_mb(probe.server.pid) - rss, 1)})
    rows.append({"probe": "fed_eval_accuracy = 1e300 in the metrics", **_outcome(lambda: push(zeros, 1.0, {"fed_eval_accuracy": 1e300}, who=members[1]))})
    rows.append({"probe": "weight 1e39 with a zero update", **_outcome(lambda: push(zeros, 1e39, who=members[2]))})
    return rows


def run(tree: Path, *, gentle: bool = False) -> list[dict[str, Any]]:
    rows = _Rows(tree)
    with tempfile.TemporaryDirectory() as tmp:
        probe = Prober(tree, Path(tmp) / "run")
        try:
            refused = _outcome(lambda: probe.join("probe-fp", fingerprint="0" * 64))
            rows.append({"probe": "fingerprint refusal leaks the server fingerprint?", **refused})
            # learn the real fingerprint the way a client with the right model would: from a real client
            from secure_fl.client.trainer import LocalTrainer  # noqa: PLC0415 - heavy, only here
            from secure_fl.config import load_preset  # noqa: PLC0415
            from secure_fl.data.sources import client_dataset  # noqa: PLC0415
            from secure_fl.models import model_fingerprint  # noqa: PLC0415

            config = load_preset("smoke")
            trainer = LocalTrainer.from_config(config, client_dataset(config, 0))
            probe.fingerprint = model_fingerprint(trainer.adapted.model)
            info = {}
            try:
                from secure_fl.stages import Stages  # noqa: PLC0415 - only in checkouts with stage fingerprints

                info = {f"stage.{k}": v for k, v in Stages.from_config(config).fingerprint().items()}
            except ImportError:
                pass
            rows.append({"probe": "id with terminal escape codes", **_outcome(lambda: probe.join("evil\x1b[2J\r\nround 9", info=info))})
            undecodable = probe.channel.unary_unary("/secure_fl.v1.Federation/Join")
            rows.append({"probe": "undecodable Join bytes", **_outcome(lambda: undecodable(b"\xff\xff\xff\xff", timeout=10))})
            if gentle:  # skip the probes that wedged the v0.1 server, to reach the later ones
                return _lying_client(probe, rows, info)
            rows.append({"probe": "1 MB client id outside Join", **_outcome(lambda: list(probe.stub.PullTask(
                pb.PullTaskRequest(envelope=serde.envelope("r", 0, "y" * (1 << 20))), timeout=10)))})
            # silent streams: 40 PushUpdate calls that never send, then a Join and a health check
            stop = threading.Event()
            calls = [probe.stub.PushUpdate.future(_silent(stop), timeout=60) for _ in range(40)]
            time.sleep(1.0)
            rows.append({"probe": "Join while 40 silent streams are open", **_outcome(lambda: probe.join("c0", info=info))})
            health = health_pb2_grpc.HealthStub(probe.channel)
            rows.append({"probe": "health check while 40 silent streams are open", **_outcome(
                lambda: health.Check(health_pb2.HealthCheckRequest(service="secure_fl.v1.Federation"), timeout=10).status)})
            stop.set()
            for call in calls:
                try:
                    call.result(timeout=5)
                except (grpc.RpcError, grpc.FutureTimeoutError):
                    pass
            time.sleep(2.0)
            _lying_client(probe, rows, info)
        finally:
            probe.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose server is probed (default: this one)")
    parser.add_argument("--gentle", action="store_true", help="skip the probes that wedged the v0.1 server (silent streams, 1 MB ids)")
    args = parser.parse_args()
    run(args.tree.resolve(), gentle=args.gentle)


if __name__ == "__main__":
    main()
