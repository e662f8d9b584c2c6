"""Multi-phase rounds: the example two-phase protocol (pairwise masks agreed in phase one, applied in
phase two) in simulation and over real gRPC, with clients dropping in each phase."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from protocols.errors import StaleMessage
from protocols.secagg import AnswerSpec, BlobSpec, Phase
from protocols.wire import serde
from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.server.engine import BackgroundRun, FederatedServer
from secure_fl.simulation import simulate
from secure_fl.transport.grpc_client import GrpcTransport
from secure_fl.transport.inprocess import InProcessTransport
from tests.conftest import smoke_config
from tests.harness import Dropped, DroppingTransport, in_process_parties, step_all
from tests.test_grpc_round import make_client

ROOT = Path(__file__).resolve().parent.parent


def _load_example() -> None:
    """Register the example's protocols (``pairwise-demo``) in this process, once."""
    if "example_custom_secure_mode" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("example_custom_secure_mode", ROOT / "examples" / "custom_secure_mode.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["example_custom_secure_mode"] = module
    spec.loader.exec_module(module)


def _run_quietly(client) -> None:
    try:
        client.run(connect_timeout=30)
    except Dropped:
        pass


def test_pairwise_demo_sums_exactly_like_plain(tmp_path: Path) -> None:
    _load_example()
    plain = simulate(smoke_config(), tmp_path / "plain", progress=False)
    masked = simulate(smoke_config("secure.mode=pairwise-demo"), tmp_path / "masked", progress=False)
    for name, value in plain.global_state.items():  # fixed point with 16 fractional bits
        np.testing.assert_allclose(masked.global_state[name], value, atol=1e-3)
    assert abs(masked.final_accuracy - plain.final_accuracy) <= 0.01
    record = masked.metrics[0]
    assert [p["phase"] for p in record["phases"]] == ["advertise", "masked-input"]
    assert all(p["answered"] == 4 and p["dropped"] == [] for p in record["phases"])
    assert "train_loss" not in record or record["train_loss"] is None  # hidden updates: no per-client loss


def _in_process(tmp_path: Path, drops: dict[int, tuple[int, str]], rounds: int = 1) -> tuple[FederatedServer, list]:
    config = smoke_config(
        "secure.mode=pairwise-demo", f"run.rounds={rounds}", "run.num_clients=4", "run.clients_per_round=4",
        "run.min_updates=2",
    )
    return in_process_parties(config, tmp_path / "run", drops)


def test_drop_in_the_first_phase_is_recovered(tmp_path: Path) -> None:
    _load_example()
    server, clients = _in_process(tmp_path, {2: (1, "advertise")})
    result = step_all(server, clients).result()
    record = result.metrics[0]
    assert record["status"] == "ok" and record["clients"] == 3 and record["dropped"] == ["client-2"]
    phases = {p["phase"]: p for p in record["phases"]}
    assert phases["advertise"]["dropped"] == ["client-2"] and phases["masked-input"]["participants"] == 3
    assert [e["round"] for e in result.ledger] == [1]


def test_drop_after_keys_were_agreed_aborts_the_round(tmp_path: Path) -> None:
    _load_example()
    server, clients = _in_process(tmp_path, {1: (1, "masked-input")})
    before = {k: v.copy() for k, v in server.global_state.items()}
    result = step_all(server, clients).result()
    record = result.metrics[0]
    assert record["status"] == "aborted" and "client-1" in record["reason"] and "cannot be removed" in record["reason"]
    phases = {p["phase"]: p for p in record["phases"]}
    assert phases["advertise"]["dropped"] == [] and phases["masked-input"]["dropped"] == ["client-1"]
    assert result.ledger == []  # nothing released
    for name, value in before.items():
        np.testing.assert_array_equal(result.global_state[name], value)
    line = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["status"] == "aborted"


def test_phases_over_grpc_with_drops_in_each_phase(grpc_server) -> None:
    """Five client threads over loopback gRPC: a drop in phase one (round 1) is recovered, a drop in
    phase two (round 2) aborts that round; metrics say who dropped where."""
    _load_example()
    config = smoke_config(
        "secure.mode=pairwise-demo", "run.rounds=2", "run.num_clients=5", "run.clients_per_round=5",
        "run.min_updates=2", "run.join_timeout=30", "run.round_timeout=60",
    )
    running = grpc_server(config)
    drops = {3: (1, "advertise"), 4: (2, "masked-input")}
    clients = [make_client(config, i, DroppingTransport(GrpcTransport(running.address), drops.get(i))) for i in range(5)]
    threads = [threading.Thread(target=_run_quietly, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    result = running.result(timeout=120)
    for thread in threads:
        thread.join(30)
    first, second = result.metrics
    assert first["status"] == "ok" and first["clients"] == 4
    assert {p["phase"]: p["dropped"] for p in first["phases"]} == {"advertise": ["client-3"], "masked-input": []}
    assert second["status"] == "aborted"
    assert {p["phase"]: p["dropped"] for p in second["phases"]} == {"advertise": [], "masked-input": ["client-4"]}
    assert [e["round"] for e in result.ledger] == [1]


def test_messages_for_a_phase_that_is_not_open_are_refused(tmp_path: Path) -> None:
    config = smoke_config("run.num_clients=2", "run.clients_per_round=2")
    server = FederatedServer(config, tmp_path / "run", transport="in-process")
    coordinator = server.coordinator
    clients = [make_client(config, i, InProcessTransport(coordinator)) for i in range(2)]
    for client in clients:
        client.join()
    manifest, payload = serde.pack_tensors(server.global_state)
    coordinator.begin_round(1, ["client-0", "client-1"], manifest, payload, {})
    coordinator.open_phase(Phase("hello", ("client-0", "client-1"), AnswerSpec(blobs=(BlobSpec("x", 4),))), 30)

    def answer(client_id: str, phase: str, round_number: int = 1, blobs=None) -> pb.PushReply:
        manifest, body = serde.pack_tensors({})
        header = pb.UpdateHeader(
            envelope=serde.envelope(clients[0].run_id, round_number, client_id, phase), manifest=manifest,
            encoding="plain", blobs=blobs or {"x": b"ok"},
        )
        return coordinator.push_update(serde.update_stream(header, body))

    with pytest.raises(StaleMessage, match="'bye'.*not open.*open phase: hello"):
        answer("client-0", "bye")
    with pytest.raises(StaleMessage, match="round 7"):
        answer("client-0", "hello", round_number=7)
    assert answer("client-0", "hello").accepted
    from protocols.errors import MalformedMessage, Refused

    with pytest.raises(Refused, match="already answered"):
        answer("client-0", "hello")
    with pytest.raises(MalformedMessage, match="does not take blob"):
        answer("client-1", "hello", blobs={"y": b"1"})
    with pytest.raises(MalformedMessage, match="at most 4"):
        answer("client-1", "hello", blobs={"x": b"12345"})
    # the phase closes at its deadline or when complete; a late answer for it is refused as closed
    done = _close(coordinator)
    assert done.phase.name == "hello" and sorted(done.received) == ["client-0"]
    with pytest.raises(StaleMessage, match="phase 'hello' of round 1, which is closed"):
        answer("client-1", "hello")
    coordinator.end_round()
    with pytest.raises(StaleMessage, match="closed"):
        answer("client-1", "hello")


def _close(coordinator):
    with coordinator._cond:  # injected: end the phase now instead of waiting for its deadline
        coordinator._round.phase.deadline = 0.0
    return coordinator.wait_phase()


def test_a_client_left_out_of_the_next_round_forgets_its_secrets(tmp_path: Path) -> None:
    _load_example()
    config = smoke_config(
        "secure.mode=pairwise-demo", "run.rounds=2", "run.num_clients=4", "run.clients_per_round=3", "run.min_updates=2",
    )
    server = FederatedServer(config, tmp_path / "run", transport="in-process")
    clients = [make_client(config, i, InProcessTransport(server.coordinator)) for i in range(4)]
    for client in clients:
        client.join()
    rounds = BackgroundRun(server)
    sessions_of_round_one = {}
    coordinator = server.coordinator
    while rounds.is_alive():
        current = coordinator._round
        if current is not None and current.number == 2 and current.phase is not None:
            break
        for client in clients:
            client.step()
            if client._round_session is not None and client._round_session[0] == 1:
                sessions_of_round_one[client.client_id] = client._round_session[1]
    cohort = coordinator._round.cohort
    (outsider,) = [c for c in clients if c.client_id not in cohort]
    assert outsider.client_id in sessions_of_round_one  # it took part in round 1 and held a key
    assert outsider.step() == "wait"
    assert outsider._round_session is None and sessions_of_round_one[outsider.client_id].secret is None
    coordinator.finish("test over")
    rounds.join(30)
