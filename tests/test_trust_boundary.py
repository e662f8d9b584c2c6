"""The coordinator as a trust boundary, probed over real loopback gRPC by a party that lies.

Each test reproduces one probe that used to succeed against the server (weights that overflow
float32, silent streams that take every worker thread, a declared size that reserves memory,
unlimited joins, raw control characters in ids, undecodable messages, absurd metrics) and checks
the refusal that replaces it.
"""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protocols.errors import MalformedMessage
from protocols.wire import serde
from protocols.wire.limits import PROTOCOL_VERSION
from protocols.wire.v1 import federation_pb2 as pb
from protocols.wire.v1 import federation_pb2_grpc as pb_grpc
from secure_fl.errors import RunError
from secure_fl.transport.grpc_client import GrpcTransport
from tests.conftest import smoke_config
from tests.test_grpc_round import make_client


class Party:
    """A hand-written client that speaks the wire protocol directly and can lie in every field."""

    def __init__(self, address: str, running, client_id: str, *, num_examples: int = 100) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.FederationStub(self.channel)
        self.client_id = client_id
        self.fingerprint = running.server.coordinator.model_fingerprint
        self.stage_info = {f"stage.{k}": v for k, v in running.server.stages.fingerprint().items()}
        self.run_id = ""
        self.num_examples = num_examples

    def join(self) -> pb.JoinReply:
        reply = self.stub.Join(
            pb.JoinRequest(
                envelope=serde.envelope("", 0, self.client_id), protocol_version=PROTOCOL_VERSION,
                model_fingerprint=self.fingerprint, num_examples=self.num_examples, info=self.stage_info,
            ),
            timeout=10,
        )
        self.run_id = reply.envelope.run_id
        return reply

    def pull_until_train(self, timeout: float = 30) -> tuple[int, dict[str, np.ndarray]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunks = list(self.stub.PullTask(pb.PullTaskRequest(envelope=serde.envelope(self.run_id, 0, self.client_id)), timeout=10))
            header, payload = serde.read_task_stream(chunks, max_bytes=1 << 30)
            if header.kind == pb.TaskHeader.TRAIN:
                return header.envelope.round, serde.unpack_tensors(header.manifest, payload)
            time.sleep(0.05)
        raise AssertionError("no TRAIN task")

    def push(self, round_number: int, tensors: dict[str, np.ndarray], *, weight: float, metrics=None) -> pb.PushReply:
        manifest, body = serde.pack_tensors(tensors)
        header = pb.UpdateHeader(
            envelope=serde.envelope(self.run_id, round_number, self.client_id), manifest=manifest, weight=weight,
            encoding="plain", metrics=metrics or {},
        )
        return self.stub.PushUpdate(iter(list(serde.update_stream(header, body, 4096))), timeout=10)


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as excinfo:
        call()
    return excinfo.value


def test_float32_overflow_cannot_poison_the_global_adapter(grpc_server) -> None:
    """Probe: weight=1e39 with a zero update, then 3e38 values with weight 90 (issue: every value NaN/Inf)."""
    config = smoke_config("run.num_clients=1", "run.clients_per_round=1", "run.rounds=3", "run.round_timeout=30")
    running = grpc_server(config)
    party = Party(running.address, running, "mallory", num_examples=100)
    party.join()
    round_number, global_state = party.pull_until_train()
    zeros = {k: np.zeros_like(v) for k, v in global_state.items()}

    huge = _refused(lambda: party.push(round_number, zeros, weight=1e39))
    assert huge.code() == grpc.StatusCode.INVALID_ARGUMENT and "weight" in huge.details()
    inflated = _refused(lambda: party.push(round_number, zeros, weight=101))
    assert inflated.code() == grpc.StatusCode.INVALID_ARGUMENT and "declared" in huge.details() + inflated.details()
    metrics = _refused(lambda: party.push(round_number, zeros, weight=90, metrics={"fed_eval_accuracy": 1e300}))
    assert metrics.code() == grpc.StatusCode.INVALID_ARGUMENT and "fed_eval_accuracy" in metrics.details()
    accuracy = _refused(lambda: party.push(round_number, zeros, weight=90, metrics={"eval_accuracy": 7.0}))
    assert "eval_accuracy" in accuracy.details()

    # 3e38 * 90 overflowed float32 before; aggregated in float64 the global adapter stays finite.
    big = {k: np.full_like(v, 3e38) for k, v in global_state.items()}
    assert party.push(round_number, big, weight=90).accepted
    # Round 2: 3e38 more on top of 3e38 cannot be represented: the round fails, nothing is released.
    round_two, state_one = party.pull_until_train()
    assert round_two == 2 and all(np.isfinite(v).all() for v in state_one.values())
    assert party.push(round_two, big, weight=90).accepted
    round_three, state_after = party.pull_until_train()
    assert round_three == 3
    for name, value in state_after.items():  # round 2 released nothing: the task still holds round 1's state
        np.testing.assert_array_equal(value, state_one[name])
    assert party.push(round_three, zeros, weight=90).accepted
    result = running.result(timeout=60)
    statuses = [r["status"] for r in result.metrics]
    assert statuses == ["ok", "failed", "ok"], result.metrics
    assert "not finite" in result.metrics[1]["reason"]
    assert [entry["round"] for entry in result.ledger] == [1, 3]
    assert all(np.isfinite(v).all() for v in result.global_state.values())
    assert not (result.run_dir / "checkpoints" / "round-0002.safetensors").exists()
    party.channel.close()


def _silent_stream(stop: threading.Event) -> Iterator[pb.UpdateChunk]:
    stop.wait(60)
    return
    yield  # pragma: no cover - a generator that never sends


def test_silent_streams_cannot_starve_join_and_health(grpc_server) -> None:
    """Probe: 40 PushUpdate calls that never send a message (issue: Join and health time out)."""
    config = smoke_config(
        "run.num_clients=2", "run.clients_per_round=2", "run.join_timeout=60",
        "transport.first_message_timeout=1.5", "transport.max_streams=8", "transport.max_streams_per_peer=4",
    )
    running = grpc_server(config)
    channel = grpc.insecure_channel(running.address)
    stub = pb_grpc.FederationStub(channel)
    stop = threading.Event()
    calls = [stub.PushUpdate.future(_silent_stream(stop), timeout=30) for _ in range(40)]
    time.sleep(0.5)
    started = time.monotonic()
    party = Party(running.address, running, "honest")
    assert party.join().envelope.run_id
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="secure_fl.v1.Federation"), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert time.monotonic() - started < 10  # generous: two test workers share two cores
    codes = [call.exception().code() for call in calls]  # every silent stream ends, none hangs
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 36
    assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED}
    deadline = time.monotonic() + 5  # the server's handlers release their slots just after the status is sent
    while running.grpc.guard.open_streams() > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running.grpc.guard.open_streams() <= 1  # the honest party may be polling
    stop.set()
    channel.close()


def test_declared_size_is_checked_before_memory_is_reserved(grpc_server) -> None:
    """Probe: a header declaring 1 GiB for a 4.6 kB update (issue: +1 GiB at once per stream)."""
    config = smoke_config("run.num_clients=1", "run.clients_per_round=1", "run.round_timeout=30")
    running = grpc_server(config)
    party = Party(running.address, running, "c0")
    party.join()
    round_number, global_state = party.pull_until_train()
    manifest, _ = serde.pack_tensors({k: np.zeros_like(v) for k, v in global_state.items()})
    manifest.total_bytes = 1 << 30
    stop = threading.Event()

    def header_then_silence() -> Iterator[pb.UpdateChunk]:
        yield pb.UpdateChunk(header=pb.UpdateHeader(
            envelope=serde.envelope(party.run_id, round_number, "c0"), manifest=manifest, weight=1.0, encoding="plain"
        ))
        stop.wait(30)

    started = time.monotonic()
    error = _refused(lambda: party.stub.PushUpdate(header_then_silence(), timeout=20))
    stop.set()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "total_bytes" in error.details()
    assert time.monotonic() - started < 12, "refused on the header, without waiting for chunks (timeout 20 s)"
    party.channel.close()


def test_chunk_assembler_holds_only_what_arrived() -> None:
    manifest = pb.Manifest(total_bytes=512 << 20, sha256="0" * 64)
    tracemalloc.start()
    assembler = serde.ChunkAssembler(manifest, max_bytes=1 << 30, who="client 'c'")
    assembler.add(pb.Chunk(offset=0, data=b"x" * 4096))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 << 20, f"reserved {peak} bytes for 4 kB of data"
    with pytest.raises(MalformedMessage, match="truncated"):
        assembler.finish()


def test_joins_are_capped_and_silent_parties_make_room(grpc_server) -> None:
    """Probe: 20,000 distinct ids join (issue: all admitted, silent ones hold their place forever)."""
    config = smoke_config(
        "run.num_clients=2", "run.clients_per_round=1", "run.rounds=1", "run.join_timeout=30", "run.round_timeout=30",
        "transport.liveness_timeout=1.0",
    )
    running = grpc_server(config)
    first, second, third = (Party(running.address, running, f"p{i}") for i in range(3))
    first.join()
    second.join()
    full = _refused(third.join)
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in full.details()
    coordinator = running.server.coordinator
    deadline = time.monotonic() + 10
    while coordinator._round is None and time.monotonic() < deadline:
        time.sleep(0.05)
    (member,) = coordinator._round.cohort  # owes the open round: never evicted while it is open
    bystander = second if member == "p0" else first
    time.sleep(1.5)  # both are now silent for longer than the liveness timeout
    third.join()  # the run is full, but the silent party that owes nothing makes room
    assert sorted(coordinator.active_clients()) == sorted([member, "p2"])
    gone = _refused(lambda: list(bystander.stub.PullTask(
        pb.PullTaskRequest(envelope=serde.envelope(bystander.run_id, 0, bystander.client_id)), timeout=5
    )))
    assert gone.code() == grpc.StatusCode.NOT_FOUND and "silent" in gone.details()
    fourth = Party(running.address, running, "p3")
    assert _refused(fourth.join).code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the cohort member is kept
    for party in (first, second, third, fourth):
        party.channel.close()


def test_silent_parties_leave_cohorts(grpc_server) -> None:
    """Probe: silent joiners fill cohorts (issue: every round waits out its deadline)."""
    config = smoke_config(
        "run.num_clients=3", "run.clients_per_round=3", "run.rounds=1", "run.join_timeout=30",
        "run.round_timeout=30", "transport.liveness_timeout=1.5",
    )
    running = grpc_server(config)
    silent = [Party(running.address, running, f"quiet-{i}") for i in (1, 2)]
    for party in silent:
        party.join()
    time.sleep(2.0)  # silent for longer than the liveness timeout
    honest = make_client(config, 0, GrpcTransport(running.address))
    worker = threading.Thread(target=honest.run, kwargs={"connect_timeout": 30})
    worker.start()
    result = running.result(timeout=60)
    worker.join(30)
    record = result.metrics[0]
    assert record["status"] == "ok" and record["selected"] == ["client-0"], record
    assert record["unresponsive"] == ["quiet-1", "quiet-2"]
    assert record["seconds"] < 20, "the round did not wait for the silent parties"
    for party in silent:
        party.channel.close()


def test_ids_are_restricted_and_peer_strings_are_bounded(grpc_server) -> None:
    """Probe: ids with NUL, CR/LF and escape codes; 1 MB run and client ids outside Join."""
    running = grpc_server(smoke_config("run.num_clients=2", "run.clients_per_round=2", "run.join_timeout=30"))
    for bad in ("evil\x1b[2J", "a\nround 9 | acc 1.0", "nul\x00", "x" * 65, "-leading", "sp ace"):
        error = _refused(Party(running.address, running, bad).join)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert "\n" not in error.details() and "\x1b" not in error.details() and "\x00" not in error.details()
    stub = pb_grpc.FederationStub(grpc.insecure_channel(running.address))
    run_id = running.server.run_id
    for envelope in (serde.envelope(run_id, 0, "y" * (1 << 20)), serde.envelope("r" * (1 << 20), 0, "c")):
        error = _refused(lambda: list(stub.PullTask(pb.PullTaskRequest(envelope=envelope), timeout=10)))
        assert len(error.details()) < 400, error.details()[:100]


def test_undecodable_message_is_invalid_argument_and_refusals_keep_secrets(grpc_server) -> None:
    running = grpc_server(smoke_config("run.num_clients=2", "run.clients_per_round=2", "run.join_timeout=30"))
    channel = grpc.insecure_channel(running.address)
    raw_join = channel.unary_unary("/secure_fl.v1.Federation/Join")
    error = _refused(lambda: raw_join(b"\xff\xff\xff\xff", timeout=5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "JoinRequest" in error.details()
    stub = pb_grpc.FederationStub(channel)
    fingerprint = running.server.coordinator.model_fingerprint
    refused = _refused(lambda: stub.Join(pb.JoinRequest(
        envelope=serde.envelope("", 0, "c"), protocol_version=PROTOCOL_VERSION, model_fingerprint="0" * 64, num_examples=3
    )))
    assert fingerprint[:12] not in refused.details() and "0" * 12 not in refused.details()
    labels = _refused(lambda: stub.Join(pb.JoinRequest(
        envelope=serde.envelope("", 0, "c"), protocol_version=PROTOCOL_VERSION, model_fingerprint="0" * 64,
        num_examples=3, info={"num_labels": "2"},
    )))
    ours = running.server.coordinator.model_info["num_labels"]
    assert "2 labels" in labels.details() and f"this run has {ours}" in labels.details()
    channel.close()


def test_duplicate_join_is_refused_and_a_client_reports_it(grpc_server, caplog) -> None:
    config = smoke_config("run.num_clients=2", "run.clients_per_round=2", "run.join_timeout=30")
    running = grpc_server(config)
    first = Party(running.address, running, "client-0")
    first.join()
    again = _refused(Party(running.address, running, "client-0").join)
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS and "taken" in again.details()
    impostor = make_client(config, 0, GrpcTransport(running.address))
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="secure_fl"), pytest.raises(RunError, match="already taken"):
        impostor.run(connect_timeout=2)
    assert time.monotonic() - started < 20
    assert any("its id is taken" in r.getMessage() for r in caplog.records)
    first.channel.close()


def test_evicted_client_rejoins_and_finishes(grpc_server, caplog) -> None:
    """A client the server forgot (NOT_FOUND) says so and joins again instead of exiting."""
    config = smoke_config("run.num_clients=2", "run.clients_per_round=2", "run.rounds=1", "run.join_timeout=30")
    running = grpc_server(config)
    coordinator = running.server.coordinator
    first = make_client(config, 0, GrpcTransport(running.address))
    first.join()
    worker = threading.Thread(target=first.run, kwargs={"connect_timeout": 30})
    with caplog.at_level("WARNING", logger="secure_fl"):
        worker.start()
        time.sleep(0.5)
        with coordinator._cond:  # injected fault: the server forgets the client (as after an eviction)
            del coordinator._clients["client-0"]
            coordinator._evicted["client-0"] = None
        time.sleep(1.0)
        second = make_client(config, 1, GrpcTransport(running.address))
        second_worker = threading.Thread(target=second.run, kwargs={"connect_timeout": 30})
        second_worker.start()
        result = running.result(timeout=60)
        worker.join(30)
        second_worker.join(30)
    assert result.metrics[0]["status"] == "ok" and result.metrics[0]["clients"] == 2
    assert first.rounds_trained == [1]
    assert any("joining again" in r.getMessage() for r in caplog.records)


def test_second_server_on_the_same_port_is_refused(grpc_server) -> None:
    from secure_fl.transport.grpc_server import GrpcServer

    running = grpc_server(smoke_config())
    with pytest.raises(OSError, match="another server"):
        GrpcServer(running.server.coordinator, running.address)
    for address in ("127.0.0.1:99999", "127.0.0.1:-1", "127.0.0.1", "127.0.0.1:http"):
        with pytest.raises(ValueError, match="address"):
            GrpcServer(running.server.coordinator, address)


def test_metrics_record_is_json_with_bounded_keys(grpc_server) -> None:
    """A normal run still writes the same metrics keys plus the new cohort bookkeeping."""
    config = smoke_config("run.num_clients=2", "run.clients_per_round=2", "run.rounds=1", "run.join_timeout=30")
    running = grpc_server(config)
    clients = [make_client(config, i, GrpcTransport(running.address)) for i in range(2)]
    threads = [threading.Thread(target=c.run, kwargs={"connect_timeout": 30}) for c in clients]
    for t in threads:
        t.start()
    result = running.result(timeout=60)
    for t in threads:
        t.join(30)
    line = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["cohort_target"] == 2 and line["unresponsive"] == [] and line["status"] == "ok"
