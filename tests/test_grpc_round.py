"""Real gRPC server on 127.0.0.1 with real clients (threads with their own channels)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np
import pytest
from safetensors.numpy import load_file

from protocols.wire import serde
from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.client.client import ClientStages, FederatedClient
from secure_fl.client.trainer import LocalTrainer
from secure_fl.config import Config
from secure_fl.data.sources import client_dataset
from secure_fl.errors import TransportError
from secure_fl.transport.grpc_client import GrpcTransport
from tests.conftest import smoke_config


class RecordingTransport(GrpcTransport):
    """A real gRPC transport that also keeps what went over the wire, for independent checks."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.tasks: dict[int, dict[str, np.ndarray]] = {}
        self.uploads: dict[int, tuple[float, dict[str, np.ndarray]]] = {}

    def pull_task(self, request: pb.PullTaskRequest) -> Iterator[pb.TaskChunk]:
        chunks = list(super().pull_task(request))
        header, payload = serde.read_task_stream(chunks, max_bytes=1 << 30)
        if header.kind == pb.TaskHeader.TRAIN:
            self.tasks[header.envelope.round] = serde.unpack_tensors(header.manifest, payload)
        return iter(chunks)

    def push_update(self, messages: Iterable[pb.UpdateChunk]) -> pb.PushReply:
        messages = list(messages)
        header, payload = serde.read_update_stream(messages, max_bytes=1 << 30)
        reply = super().push_update(messages)
        self.uploads[header.envelope.round] = (header.weight, serde.unpack_tensors(header.manifest, payload))
        return reply


def make_client(config: Config, index: int, transport: GrpcTransport, chunk_size: int = 4096) -> FederatedClient:
    trainer = LocalTrainer.from_config(config, client_dataset(config, index))
    return FederatedClient(
        f"client-{index}", transport, trainer, ClientStages.from_config(config), seed=config.run.seed, chunk_size=chunk_size
    )


def test_three_grpc_clients_two_rounds_weighted_mean(grpc_server) -> None:
    config = smoke_config("run.num_clients=3", "run.clients_per_round=3", "run.rounds=2", "data.partition='dirichlet'", "data.alpha=1.0")
    running = grpc_server(config)
    transports = [RecordingTransport(running.address) for _ in range(3)]
    clients = [make_client(config, i, t) for i, t in enumerate(transports)]
    threads = [threading.Thread(target=c.run, kwargs={"connect_timeout": 30}) for c in clients]
    for t in threads:
        t.start()
    result = running.result()
    for t in threads:
        t.join(30)
    assert [r["round"] for r in result.metrics] == [1, 2]
    assert all(r["clients"] == 3 and r["status"] == "ok" for r in result.metrics)
    assert all(c.rounds_trained == [1, 2] for c in clients)
    weights = {c.client_id: t.uploads[1][0] for c, t in zip(clients, transports)}
    assert len(set(weights.values())) > 1, "Dirichlet split should give unequal weights"

    for round_number in (1, 2):
        before = transports[0].tasks[round_number]
        # every client got the same global adapter
        for t in transports[1:]:
            for key in before:
                np.testing.assert_array_equal(t.tasks[round_number][key], before[key])
        after = load_file(str(result.run_dir / "checkpoints" / f"round-{round_number:04d}.safetensors"))
        total_weight = sum(t.uploads[round_number][0] for t in transports)
        for key in before:
            mean = sum(t.uploads[round_number][0] * t.uploads[round_number][1][key].astype(np.float64) for t in transports)
            expected = before[key] + mean / total_weight
            np.testing.assert_allclose(after[key], expected, rtol=1e-5, atol=1e-6)
    # round 2's task carried round 1's aggregate
    for key, value in transports[0].tasks[2].items():
        np.testing.assert_array_equal(value, load_file(str(result.run_dir / "checkpoints" / "round-0001.safetensors"))[key])
    for record in result.metrics:
        assert record["bytes_up"] > 0 and record["bytes_down"] > 0


def _pull_until_train(client: FederatedClient, timeout: float = 30.0) -> tuple[pb.TaskHeader, bytes]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        header, payload = serde.read_task_stream(
            client.transport.pull_task(pb.PullTaskRequest(envelope=serde.envelope(client.run_id, 0, client.client_id))),
            max_bytes=1 << 30,
        )
        if header.kind == pb.TaskHeader.TRAIN:
            return header, payload
        time.sleep(0.05)
    raise AssertionError("no TRAIN task arrived")


def test_client_vanishing_mid_round_is_dropped_and_late_update_refused(grpc_server) -> None:
    config = smoke_config("run.num_clients=3", "run.clients_per_round=3", "run.rounds=2", "run.round_timeout=12.0")
    running = grpc_server(config)
    ghost = make_client(config, 2, GrpcTransport(running.address))
    ghost.join()
    honest = [make_client(config, i, GrpcTransport(running.address)) for i in range(2)]
    threads = [threading.Thread(target=c.run, kwargs={"connect_timeout": 30}) for c in honest]
    for t in threads:
        t.start()
    header, payload = _pull_until_train(ghost)  # the ghost takes round 1's task, then goes silent
    assert header.envelope.round == 1
    delta, _ = ghost.trainer.train(serde.unpack_tensors(header.manifest, payload), dict(header.plan), seed=1)
    while running.server.coordinator.active_clients() and not running.server.run_dir.read_metrics():
        time.sleep(0.1)  # wait until round 1 closed without the ghost
    first = running.server.run_dir.read_metrics()[0]
    assert first["clients"] == 2 and first["dropped"] == ["client-2"] and first["status"] == "ok"

    manifest, body = serde.pack_tensors(delta)
    late = pb.UpdateHeader(
        envelope=serde.envelope(ghost.run_id, 1, ghost.client_id), manifest=manifest, weight=10.0, encoding="plain"
    )
    with pytest.raises(TransportError) as excinfo:
        ghost.transport.push_update(serde.update_stream(late, body, 4096))
    assert excinfo.value.code == "FAILED_PRECONDITION"
    assert "round 1" in excinfo.value.details and "closed" in excinfo.value.details
    ghost.leave("test")  # round 2 then completes without waiting for the ghost
    result = running.result()
    for t in threads:
        t.join(30)
    assert [r["clients"] for r in result.metrics] == [2, 2]
    assert result.metrics[1]["seconds"] < config.run.round_timeout  # did not wait for the ghost


def test_grpc_deployment_matches_simulation_exactly(grpc_server, tmp_path) -> None:
    """Same server and client code: gRPC and in-process runs give the same rounds, bit for bit."""
    from secure_fl.simulation import simulate

    config = smoke_config("run.num_clients=3", "run.clients_per_round=3")
    simulated = simulate(config, tmp_path / "sim", progress=False)
    running = grpc_server(config)
    clients = [make_client(config, i, GrpcTransport(running.address), config.transport.chunk_size) for i in range(3)]
    threads = [threading.Thread(target=c.run, kwargs={"connect_timeout": 30}) for c in clients]
    for t in threads:
        t.start()
    deployed = running.result()
    for t in threads:
        t.join(30)
    for a, b in zip(simulated.metrics, deployed.metrics, strict=True):
        assert (a["accuracy"], a["loss"], a["train_loss"], a["bytes_up"]) == (b["accuracy"], b["loss"], b["train_loss"], b["bytes_up"])
    for key, value in simulated.global_state.items():
        np.testing.assert_array_equal(value, deployed.global_state[key])
    # every client said goodbye, so a server would not linger
    assert running.server.coordinator.active_clients() == []
