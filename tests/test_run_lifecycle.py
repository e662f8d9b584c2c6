"""How a run starts and ends as a new user meets it: interrupted rounds, short cohorts, CLI refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from secure_fl.errors import RunError
from secure_fl.server.engine import BackgroundRun, FederatedServer, RunInterrupted
from secure_fl.transport.grpc_client import GrpcTransport
from secure_fl.transport.inprocess import InProcessTransport
from tests.conftest import smoke_config
from tests.test_grpc_round import make_client

BIN = Path(sys.executable).parent


def _sigint_default() -> None:
    """Give a child the default Ctrl-C handling. A shell that starts the tests in the background
    (``pytest &``) makes SIGINT ignored, and children inherit that, so a test that sends SIGINT
    would wait for a process that never sees it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_interrupted_round_is_not_released(tmp_path: Path) -> None:
    """Stopping the run with a round open (Ctrl-C, Server.stop) releases nothing of that round."""
    config = smoke_config("run.num_clients=2", "run.clients_per_round=2", "run.rounds=3", "run.join_timeout=30")
    server = FederatedServer(config, tmp_path / "run", transport="in-process")
    clients = [make_client(config, i, InProcessTransport(server.coordinator)) for i in range(2)]
    for client in clients:
        client.join()
    rounds = BackgroundRun(server)

    def step_until_trained(client) -> None:
        deadline = time.monotonic() + 30
        while client.step() != "trained":
            assert time.monotonic() < deadline
            time.sleep(0.02)

    for client in clients:
        step_until_trained(client)  # round 1: both deliver
    step_until_trained(clients[0])  # round 2: only client-0 delivers ...
    server.coordinator.finish("interrupted (Ctrl-C)")  # ... and the run is stopped
    rounds.join(30)
    with pytest.raises(RunInterrupted, match="round 2"):
        rounds.result()

    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "interrupted"]
    interrupted = records[1]
    assert interrupted["dropped"] == [] and interrupted["updates_discarded"] == 1 and "epsilon" not in interrupted
    ledger = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert [entry["round"] for entry in ledger] == [1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001.safetensors"]
    round_one = load_file(str(run_dir / "checkpoints" / "round-0001.safetensors"))
    for name, value in server.global_state.items():
        np.testing.assert_array_equal(value, round_one[name])
    assert json.loads((run_dir / "run.json").read_text())["interrupted"] is True
    report = json.loads((run_dir / "report" / "privacy_report.json").read_text())
    assert any(w["code"] == "run-interrupted" for w in report["warnings"])


def test_ctrl_c_during_simulate_releases_only_complete_rounds(tmp_path: Path) -> None:
    """The issue's probe: SIGINT to `secure-fl simulate` while rounds are running."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [str(BIN / "secure-fl"), "simulate", "--preset", "smoke", "--out", str(out), "--set", "run.rounds=200"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_sigint_default,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until one round was released, then interrupt mid-run
        if line.startswith("round 1/"):
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    released = [r["round"] for r in records if r["status"] == "ok"]
    assert released and len(released) < 200
    assert all(r["status"] in ("ok", "interrupted") for r in records)
    ledger = [json.loads(line)["round"] for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert ledger == released
    checkpoints = {int(p.stem.split("-")[1]) for p in (out / "checkpoints").iterdir()}
    assert checkpoints <= set(released) and max(checkpoints) == max(released)
    assert json.loads((out / "run.json").read_text())["interrupted"] is True
    report = json.loads((out / "report" / "privacy_report.json").read_text())
    assert any(w["code"] == "run-interrupted" for w in report["warnings"])


def test_fewer_clients_than_configured_is_said(grpc_server, caplog) -> None:
    config = smoke_config("run.num_clients=3", "run.clients_per_round=3", "run.rounds=1", "run.join_timeout=6")
    running = grpc_server(config)
    clients = [make_client(config, i, GrpcTransport(running.address)) for i in range(2)]
    threads = [threading.Thread(target=c.run, kwargs={"connect_timeout": 30}) for c in clients]
    with caplog.at_level("WARNING", logger="secure_fl"):
        for t in threads:
            t.start()
        result = running.result(timeout=60)
    for t in threads:
        t.join(30)
    record = result.metrics[0]
    assert record["cohort"] == 2 and record["cohort_target"] == 3
    assert any("only 2 of run.clients_per_round=3" in r.getMessage() for r in caplog.records)
    from secure_fl.progress import format_record

    assert "3 wanted" in format_record(record, 1)


def test_require_full_cohort_refuses_to_start(grpc_server) -> None:
    config = smoke_config(
        "run.num_clients=3", "run.clients_per_round=3", "run.join_timeout=1.0", "run.require_full_cohort=true"
    )
    running = grpc_server(config)
    client = make_client(config, 0, GrpcTransport(running.address))
    client.join()
    with pytest.raises(RunError, match="require_full_cohort"):
        running.result(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_cli_refuses_bad_port_and_bad_id_before_connecting(tmp_path: Path) -> None:
    bad_port = subprocess.run(
        [str(BIN / "secure-fl-server"), "--insecure", "--preset", "smoke", "--address", "127.0.0.1:99999", "--out", str(tmp_path / "a")],
        capture_output=True, text=True, timeout=120,
    )
    assert bad_port.returncode == 2 and "out of range" in bad_port.stderr
    assert not (tmp_path / "a").exists()
    bad_id = subprocess.run(
        [str(BIN / "secure-fl-client"), "--insecure", "--server", "127.0.0.1:50999", "--preset", "smoke", "--client-id", "client 0\x1b"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad_id.returncode == 2 and "--client-id" in bad_id.stderr
    assert "connecting" not in bad_id.stdout


def test_client_says_at_once_what_it_waits_for() -> None:
    """The probe: a client pointed at a closed port printed nothing for 120 s."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "secure-fl-client"), "--insecure", "--server", f"127.0.0.1:{port}", "--preset", "smoke", "--client-id", "client-0",
         "--set", "transport.connect_timeout=300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    started = time.monotonic()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "waiting for the server" in line:
                break
        else:
            pytest.fail("the client never said what it waits for")
        assert time.monotonic() - started < 150, "said only after most of the connect timeout"
        assert f"127.0.0.1:{port}" in line and "retrying until" in line and "connect_timeout=300" in line
    finally:
        proc.kill()
        proc.wait(10)


def test_two_servers_cannot_share_a_port(tmp_path: Path) -> None:
    """The issue's probe: a second secure-fl-server on the same address must not start."""
    port = _free_port()
    first = subprocess.Popen(
        [str(BIN / "secure-fl-server"), "--insecure", "--preset", "smoke", "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "A"),
         "--set", "run.join_timeout=60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default,
    )
    try:
        assert first.stdout is not None
        assert "listening on" in first.stdout.readline()
        second = subprocess.run(
            [str(BIN / "secure-fl-server"), "--insecure", "--preset", "smoke", "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "B")],
            capture_output=True, text=True, timeout=120,
        )
        assert second.returncode != 0 and "another server" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
