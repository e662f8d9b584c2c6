"""Load test (issue 15): P concurrent parties speaking the real protocol to one real server on loopback.

The server is the real ``secure-fl-server`` binary in its own process, on 127.0.0.1, with mutual
TLS from ``secure-fl provision`` (the default users get; ``--insecure`` for plaintext), the smoke
preset's model (tiny-bert, LoRA r = 4), ``secure.mode = "secagg+"`` and every party in every
cohort (``run.clients_per_round = P``), for ``--rounds`` rounds.

The P parties are real clients: ``--client-procs`` worker processes each run their share of them
in threads, every party through `secure_fl.api.run_client` (what ``secure-fl-client`` calls: the
same `FederatedClient`, its own gRPC channel and its own party certificate). One process per party
would need about 300 MB each (torch), so threads share a process; each thread is still a separate
party to the server (own channel, own TLS identity, own protocol session). The only thing added
to a worker is a count of the gRPC status codes its transports see (RESOURCE_EXHAUSTED included).

Meanwhile this process polls the server's resident memory (``/proc/<pid>/status``) and calls the
standard gRPC health check every ``--probe-interval`` seconds over its own mTLS channel (party
``probe``, which never joins). Prints one JSON line:

* ``parties``, ``rounds``, ``rounds_ok``, ``seconds_per_round`` (the server's ``seconds`` in
  ``metrics.jsonl``), ``server_ready_s`` (start to listening: imports, model, TLS) and ``join_s``
  (everything outside the rounds: every worker importing torch and building its trainers, every
  party joining, the server lingering (up to 10 s) until the parties left);
* ``server_peak_rss_mb`` (VmHWM), ``server_rss_mb_after_round`` (VmRSS when each metrics line
  appeared), ``server_rss_mb_start`` (VmRSS once listening);
* ``server_cpu_s_per_round``: the server's CPU seconds (user + system) between two metrics lines,
  so rounds 2 .. R;
* ``health_ms``: p50, p99, max latency of the health checks, with ``checks`` and ``failures``;
* ``client_status_codes``: gRPC errors the parties saw, by code (retried ones included), and
  ``server_refusals`` (the server's logged stream refusals, transport.max_streams[_per_peer]);
* ``bytes_up_per_party_round`` / ``bytes_down_per_party_round`` (from the server's metrics);
* ``settings``: every ``--set`` given on top of the benchmark's own, so a changed default shows;
  ``load_1m``: the machine's 1-minute load average when the run started (other work on it).

Run:  PYTHONPATH=. python benchmarks/load.py --parties 200 --rounds 3 --record benchmarks/results/load.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Examples the server holds out and evaluates every round.
HELD_OUT = 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parties", type=int, default=200, help="concurrent parties (all in every cohort)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--client-procs", type=int, default=4, help="worker processes the parties are spread over")
    p.add_argument("--examples-per-party", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=2, help="client.local_steps (batch size = examples per party)")
    p.add_argument("--bucket-size", type=int, default=32,
                   help="secure.bucket_size: at the default quantisation (clip_range 8, precision 2^-12, max_weight "
                        "1024) secagg+ refuses buckets over 32 (32-bit words), so a cohort of P runs in ceil(P / 32) buckets")
    p.add_argument("--round-timeout", type=float, default=120.0, help="run.round_timeout: every phase's deadline")
    p.add_argument("--timeout", type=float, default=900.0, help="give up on the whole run after this many seconds")
    p.add_argument("--probe-interval", type=float, default=0.2, help="seconds between two health checks")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC instead of mutual TLS")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config override for server and clients (repeat), e.g. transport.max_streams=64")
    p.add_argument("--record", metavar="JSONL", help="also append the JSON line to this file")
    p.add_argument("--keep", metavar="DIR", help="keep the run directory, PKI and logs here (default: a temp dir)")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--pki", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def overrides(args: argparse.Namespace) -> list[str]:
    """The smoke preset changed to P parties all in every cohort, secagg+, tiny data; then ``--set``."""
    train = args.examples_per_party * args.parties
    return [
        f"run.num_clients={args.parties}", f"run.clients_per_round={args.parties}", f"run.rounds={args.rounds}",
        f"run.round_timeout={args.round_timeout}", f"run.join_timeout={args.timeout}", "run.device='cpu'",
        "secure.mode='secagg+'", f"secure.bucket_size={args.bucket_size}",
        "data.dataset='synthetic'", "data.partition='iid'",
        f"data.synthetic_examples={train + HELD_OUT}", f"data.test_fraction={HELD_OUT / (train + HELD_OUT)!r}",
        f"client.local_steps={args.local_steps}", f"client.batch_size={args.examples_per_party}",
        f"transport.connect_timeout={args.timeout}",
        *args.settings,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])))
    return env


def _script(name: str) -> list[str]:
    """The installed console script next to this interpreter, else the same entry point through it."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return [str(path)]
    entry = {"secure-fl": "main", "secure-fl-server": "server_main"}[name]
    return [sys.executable, "-c", f"import sys; from secure_fl.cli import {entry}; sys.exit({entry}())"]


# ------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Run parties ``worker, worker + procs, ...`` as threads through `run_client`; count status codes."""
    import torch

    torch.set_num_threads(1)
    import secure_fl.api as api
    from secure_fl.config import load_preset
    from secure_fl.errors import TransportError
    from secure_fl.transport.credentials import ClientTLS
    from secure_fl.transport.grpc_client import GrpcTransport

    codes: Counter[str] = Counter()
    lock = threading.Lock()

    class CountingTransport(GrpcTransport):
        """`GrpcTransport` that counts the status codes of its failed calls (and changes nothing else)."""

        def _count(self, fn: Any, *a: Any) -> Any:
            try:
                return fn(*a)
            except TransportError as exc:
                with lock:
                    codes[exc.code or "?"] += 1
                raise

        def join(self, request: Any) -> Any:
            return self._count(super().join, request)

        def pull_task(self, request: Any) -> Any:
            return self._count(super().pull_task, request)

        def push_update(self, messages: Any) -> Any:
            return self._count(super().push_update, messages)

    api.GrpcTransport = CountingTransport  # type: ignore[attr-defined]  # run_client builds its transport from this name
    config = load_preset("smoke").with_overrides(overrides(args))
    mine = [f"client-{i}" for i in range(args.worker, args.parties, args.client_procs)]
    trained: dict[str, list[int]] = {}
    failed: dict[str, str] = {}

    def party(cid: str) -> None:
        try:
            tls = None if args.insecure else ClientTLS.load(Path(args.pki) / "parties" / cid, server_name="localhost")
            summary = api.run_client(config, server=args.address, client_id=cid, tls=tls)
            trained[cid] = summary.rounds_trained
        except Exception as exc:  # noqa: BLE001 - reported, the other parties go on
            failed[cid] = f"{type(exc).__name__}: {exc}"[:300]

    threads = [threading.Thread(target=party, args=(cid,), name=cid, daemon=True) for cid in mine]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"worker": args.worker, "parties": len(mine), "trained": trained, "failed": failed, "codes": dict(codes)}


# ------------------------------------------------------------------------------- measurement
def _proc_cpu_s(pid: int) -> float | None:
    """User plus system CPU seconds of process ``pid`` so far (``/proc/<pid>/stat``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _proc_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class Probe:
    """Health checks every ``interval`` s over its own channel, and the server's memory, in threads."""

    def __init__(self, address: str, pid: int, run_dir: Path, interval: float, pki: Path | None, rounds: int) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self.pid, self.run_dir, self.interval, self.rounds = pid, run_dir, interval, rounds
        #: Checks count from the first answer until the last round's metrics line: before, the
        #: server is still loading; after, it lingers and stops.
        self.measuring = False
        self.done = False
        if pki is None:
            channel = grpc.insecure_channel(address)
        else:
            bundle = pki / "parties" / "probe"
            creds = grpc.ssl_channel_credentials(
                (pki / "parties" / "probe" / "ca.crt").read_bytes(), (bundle / "party.key").read_bytes(),
                (bundle / "party.crt").read_bytes(),
            )
            channel = grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", "localhost")])
        self._stub, self._request, self._grpc = health_pb2_grpc.HealthStub(channel), health_pb2.HealthCheckRequest(), grpc
        self._channel = channel
        self.latencies: list[float] = []
        self.failures: Counter[str] = Counter()
        self.rss_after_round: list[float] = []
        self.cpu_at_round: list[float] = []  # server CPU seconds when each metrics line appeared
        self.rss_start: float | None = None
        self.peak_kb = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._health, daemon=True), threading.Thread(target=self._memory, daemon=True)]

    def start(self) -> Probe:
        for thread in self._threads:
            thread.start()
        return self

    def _health(self) -> None:
        while not self._stop.wait(self.interval):
            began = time.perf_counter()
            try:
                reply = self._stub.Check(self._request, timeout=5.0)
                elapsed = (time.perf_counter() - began) * 1000
                if self.done:
                    continue
                self.measuring = True
                if reply.status != reply.SERVING:
                    self.failures["NOT_SERVING"] += 1
                self.latencies.append(elapsed)
            except self._grpc.RpcError as exc:
                if self.measuring and not self.done:
                    self.failures[exc.code().name if hasattr(exc, "code") else "?"] += 1

    def _memory(self) -> None:
        seen = 0
        metrics = self.run_dir / "metrics.jsonl"
        while not self._stop.wait(0.2):
            peak = _proc_kb(self.pid, "VmHWM")
            if peak is None:
                return
            self.peak_kb = max(self.peak_kb, peak)
            rss = _proc_kb(self.pid, "VmRSS") or 0
            if self.rss_start is None and self.measuring:
                self.rss_start = round(rss / 1024, 1)
            lines = metrics.read_text().count("\n") if metrics.exists() else 0
            if lines > seen:
                self.rss_after_round += [round(rss / 1024, 1)] * (lines - seen)
                self.cpu_at_round += [_proc_cpu_s(self.pid) or 0.0] * (lines - seen)
                seen = lines
                self.done = seen >= self.rounds

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._channel.close()

    def health(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        if not ordered:
            return {"checks": 0, "failures": dict(self.failures)}
        return {
            "checks": len(ordered), "failures": dict(self.failures),
            "p50": round(statistics.median(ordered), 2),
            "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2), "max": round(ordered[-1], 2),
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Provision, start the server and the workers, measure until everything exited."""
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pki = None if args.insecure else work / "pki"
    if pki is not None:
        made = subprocess.run([*_script("secure-fl"), "provision", "--out", str(pki), "--clients", str(args.parties),
                               "--parties", "probe"], capture_output=True, text=True, env=_env(), check=False)
        if made.returncode != 0:
            raise RuntimeError(f"secure-fl provision failed: {made.stderr[-2000:]}")
    address = f"127.0.0.1:{_free_port()}"
    run_dir = work / "run"
    settings = [a for s in overrides(args) for a in ("--set", s)]
    security = ["--insecure"] if pki is None else ["--tls", str(pki / "server")]
    load_1m = round(os.getloadavg()[0], 2)  # other work on the machine, when the run starts
    began = time.monotonic()
    with (logs / "server.out").open("wb") as out, (logs / "server.err").open("wb") as err:
        server = subprocess.Popen([*_script("secure-fl-server"), "--preset", "smoke", *settings, "--address", address,
                                   "--out", str(run_dir), "--linger", "10", *security],
                                  stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=_env())
    workers = []
    for index in range(args.client_procs):
        command = [sys.executable, __file__, "--worker", str(index), "--address", address, "--pki", str(pki or ""),
                   "--parties", str(args.parties), "--rounds", str(args.rounds), "--client-procs", str(args.client_procs),
                   "--examples-per-party", str(args.examples_per_party), "--local-steps", str(args.local_steps),
                   "--bucket-size", str(args.bucket_size), "--round-timeout", str(args.round_timeout),
                   "--timeout", str(args.timeout),
                   *(["--insecure"] if args.insecure else []), *[a for s in args.settings for a in ("--set", s)]]
        with (logs / f"worker-{index}.out").open("wb") as out, (logs / f"worker-{index}.err").open("wb") as err:
            workers.append(subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=_env()))
    deadline = began + args.timeout
    # The probe's channel is opened once the server listens: opened earlier, gRPC's reconnect
    # backoff (1 s, x1.6 per failure) would leave it failing fast for seconds after the server is up.
    ready_s = None
    while time.monotonic() < deadline and server.poll() is None:
        if "listening on" in (logs / "server.out").read_text(errors="replace"):
            ready_s = round(time.monotonic() - began, 1)
            break
        time.sleep(0.1)
    probe = Probe(address, server.pid, run_dir, args.probe_interval, pki, args.rounds).start()
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in [server, *workers]):
            if server.poll() not in (None, 0):
                break
            time.sleep(0.5)
    finally:
        probe.stop()
        for proc in [server, *workers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    wall = time.monotonic() - began

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").exists() else []
    reports = []
    for index in range(args.client_procs):
        text = (logs / f"worker-{index}.out").read_text().strip()
        try:
            reports.append(json.loads(text.splitlines()[-1]))
        except (IndexError, json.JSONDecodeError):
            reports.append({"worker": index, "error": (logs / f"worker-{index}.err").read_text()[-1500:]})
    codes: Counter[str] = Counter()
    for report in reports:
        codes.update(report.get("codes", {}))
    failed = {cid: why for r in reports for cid, why in r.get("failed", {}).items()}
    server_log = (logs / "server.err").read_text(errors="replace")
    refusals = server_log.count("(transport.max_streams)") + server_log.count("(transport.max_streams_per_peer)")
    ok = [m for m in metrics if m.get("status") == "ok"]
    seconds = [float(m["seconds"]) for m in metrics]
    result: dict[str, Any] = {
        "benchmark": "load", "parties": args.parties, "client_procs": args.client_procs,
        "transport_security": "insecure" if pki is None else "mtls", "secure_mode": "secagg+",
        "bucket_size": args.bucket_size,
        "rounds": args.rounds, "rounds_done": len(metrics), "rounds_ok": len(ok),
        "clients_per_round": [m.get("clients") for m in metrics],
        "dropped_per_round": [len(m.get("dropped", [])) for m in metrics],
        "seconds_per_round": round(sum(seconds) / len(seconds), 2) if seconds else None,
        "round_seconds": [round(s, 2) for s in seconds],
        "server_ready_s": ready_s, "join_s": round(wall - sum(seconds), 1), "wall_s": round(wall, 1),
        "server_exit": server.returncode,
        "server_cpu_s_per_round": [round(b - a, 2) for a, b in zip(probe.cpu_at_round, probe.cpu_at_round[1:])],
        "server_peak_rss_mb": round(probe.peak_kb / 1024, 1), "server_rss_mb_start": probe.rss_start,
        "server_rss_mb_after_round": probe.rss_after_round,
        "health_ms": probe.health(),
        "client_status_codes": dict(codes), "server_refusals": refusals,
        "parties_failed": len(failed), "failures": dict(list(failed.items())[:5]),
        "worker_errors": [r["error"] for r in reports if "error" in r][:2],
        "parties_trained_all_rounds": sum(len(r.get("trained", {}).get(c, [])) == len(ok) for r in reports
                                          for c in r.get("trained", {})),
        "bytes_up_per_party_round": round(sum(m["bytes_up"] for m in ok) / max(1, sum(m["clients"] for m in ok))),
        "bytes_down_per_party_round": round(sum(m["bytes_down"] for m in ok) / max(1, sum(m["clients"] for m in ok))),
        "load_1m": load_1m, "settings": args.settings, "local_steps": args.local_steps,
        "examples_per_party": args.examples_per_party, "round_timeout": args.round_timeout,
    }
    if not metrics or server.returncode != 0:
        result["server_log_tail"] = server_log[-1500:]
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the load test (or, with ``--worker``, one worker's parties) and print one JSON line."""
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)), flush=True)
        return 0
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix="secure-fl-load-") as tmp:
            result = run(args, Path(tmp))
    line = json.dumps(result)
    print(line, flush=True)
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return 0 if result["rounds_ok"] == args.rounds and not result["parties_failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
