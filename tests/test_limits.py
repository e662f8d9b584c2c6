"""The ``[transport]`` limits, probed over real loopback gRPC: chunk count, per-party request rate,
silent joined parties and the server-wide budget of upload bytes in flight.

Each test reproduces a probe that the limit stops (1-byte chunks, a PullTask flood, parties that
join and go silent, many slow uploads) and checks both the refusal and that honest parties still
finish their rounds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from protocols.wire import serde
from protocols.wire.limits import PROTOCOL_VERSION
from protocols.wire.v1 import federation_pb2 as pb
from protocols.wire.v1 import federation_pb2_grpc as pb_grpc
from secure_fl.config import Config
from secure_fl.errors import ConfigError
from secure_fl.server.coordinator import Coordinator
from secure_fl.server.limits import OverLimit, RateLimiter
from secure_fl.transport.grpc_client import GrpcTransport
from secure_fl.transport.grpc_server import GrpcServer
from tests.conftest import smoke_config
from tests.test_grpc_round import make_client
from tests.test_trust_boundary import Party, _refused


def _pull(party: Party) -> list[pb.TaskChunk]:
    request = pb.PullTaskRequest(envelope=serde.envelope(party.run_id, 0, party.client_id))
    return list(party.stub.PullTask(request, timeout=5))


def test_a_stream_of_tiny_chunks_is_cut_off_naming_the_client(grpc_server) -> None:
    """Probe: an update sent as 1-byte chunks (issue: one message per byte, ~total_bytes decodes)."""
    config = smoke_config(
        "run.num_clients=1", "run.clients_per_round=1", "run.rounds=1", "run.round_timeout=30", "transport.max_chunks=64"
    )
    running = grpc_server(config)
    party = Party(running.address, running, "tiny")
    party.join()
    round_number, global_state = party.pull_until_train()
    zeros = {k: np.zeros_like(v) for k, v in global_state.items()}
    manifest, body = serde.pack_tensors(zeros)
    assert len(body) > 64, "the probe needs more bytes than transport.max_chunks"
    header = pb.UpdateHeader(envelope=serde.envelope(party.run_id, round_number, "tiny"), manifest=manifest,
                             weight=1.0, encoding="plain")
    error = _refused(lambda: party.stub.PushUpdate(iter(list(serde.update_stream(header, body, 1))), timeout=10))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert "'tiny'" in error.details() and "transport.max_chunks=64" in error.details(), error.details()
    assert party.push(round_number, zeros, weight=1.0).accepted  # chunked as configured (4 kB): accepted
    assert running.result(timeout=60).metrics[0]["status"] == "ok"
    party.channel.close()


def test_a_party_flooding_pulltask_is_limited_while_another_finishes(grpc_server, caplog) -> None:
    """Probe: one party polls as fast as it can (issue: unbounded work per party); limited per party, not per IP."""
    config = smoke_config(
        "run.num_clients=2", "run.clients_per_round=2", "run.rounds=1", "run.join_timeout=30", "run.round_timeout=30",
        "transport.max_requests_per_second=5", "transport.request_burst=10",
    )
    running = grpc_server(config)
    flood = Party(running.address, running, "flood")  # the same IP address as the honest client
    flood.join()
    honest = make_client(config, 0, GrpcTransport(running.address))
    worker = threading.Thread(target=honest.run, kwargs={"connect_timeout": 30})
    with caplog.at_level("INFO", logger="secure_fl"):
        worker.start()
        coordinator = running.server.coordinator
        deadline = time.monotonic() + 20
        while coordinator.open_cohort() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        codes: list[grpc.StatusCode] = []
        details = ""
        for _ in range(60):
            try:
                _pull(flood)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                details = exc.details()
        assert codes.count(grpc.StatusCode.OK) <= 12, codes  # the burst (10, one spent on Join) and a refill
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 45, codes
        assert "'flood'" in details and "transport.max_requests_per_second=5" in details, details
        time.sleep(1.0)  # the bucket refills; the flooder then does its part of the round
        round_number, global_state = flood.pull_until_train()
        assert flood.push(round_number, {k: np.zeros_like(v) for k, v in global_state.items()}, weight=1.0).accepted
        result = running.result(timeout=60)
        worker.join(30)
    assert result.metrics[0]["status"] == "ok" and result.metrics[0]["clients"] == 2, result.metrics
    assert honest.rounds_trained == [1]
    assert not any("client-0" in r.getMessage() and "backing off" in r.getMessage() for r in caplog.records)
    flood.channel.close()


def test_a_rate_limited_client_backs_off_and_finishes(grpc_server, caplog) -> None:
    """A limit below the client's own pace (20 polls/s against 4/s): it backs off instead of failing."""
    config = smoke_config(
        "run.num_clients=2", "run.clients_per_round=2", "run.rounds=1", "run.join_timeout=30", "run.round_timeout=30",
        "transport.poll_interval=0.05", "transport.max_requests_per_second=4", "transport.request_burst=3",
    )
    running = grpc_server(config)
    clients = [make_client(config, i, GrpcTransport(running.address)) for i in range(2)]
    with caplog.at_level("INFO", logger="secure_fl"):
        workers = [threading.Thread(target=c.run, kwargs={"connect_timeout": 30}) for c in clients]
        for worker in workers:
            worker.start()
        result = running.result(timeout=60)
        for worker in workers:
            worker.join(30)
    assert result.metrics[0]["status"] == "ok" and result.metrics[0]["clients"] == 2, result.metrics
    assert all(c.rounds_trained == [1] and c.finished for c in clients)
    assert any("backing off" in r.getMessage() for r in caplog.records), "the limit was never reached"


def test_silent_parties_beyond_the_cap_are_evicted(grpc_server) -> None:
    """Probe: parties join and go silent in a run that is far from full (issue: they stay forever)."""
    config = smoke_config(
        "run.num_clients=10", "run.clients_per_round=10", "run.join_timeout=30",
        "transport.liveness_timeout=0.5", "transport.max_silent_parties=1",
    )
    running = grpc_server(config)
    coordinator = running.server.coordinator
    parties = [Party(running.address, running, f"s{i}") for i in range(3)]
    for party in parties:
        party.join()
        time.sleep(0.05)  # s0 is the longest silent
    coordinator.vouch(["s0"])  # a simulated party: kept however long it is silent
    time.sleep(0.8)
    late = Party(running.address, running, "late")
    late.join()  # s1 and s2 are silent; one is allowed: the longer silent (s1) goes
    assert coordinator.active_clients() == ["late", "s0", "s2"]
    gone = _refused(lambda: _pull(parties[1]))
    assert gone.code() == grpc.StatusCode.NOT_FOUND and "silent" in gone.details()
    parties[1].join()  # an evicted party may come back
    assert "s1" in coordinator.active_clients()
    for party in [*parties, late]:
        party.channel.close()


def _stalled_upload(run_id: str, client: str, body: bytes, manifest: pb.Manifest, stop: threading.Event) -> Iterator[pb.UpdateChunk]:
    yield pb.UpdateChunk(header=pb.UpdateHeader(
        envelope=serde.envelope(run_id, 1, client), manifest=manifest, weight=1.0, encoding="plain"))
    yield pb.UpdateChunk(chunk=pb.Chunk(offset=0, data=body[:100]))
    stop.wait(30)  # then nothing: the server's idle timeout cancels the stream


def test_slow_uploads_beyond_the_inflight_budget_are_refused() -> None:
    """Probe: many uploads that declare their size and trickle (issue: held memory max_streams x max_update_bytes)."""
    size = 4096
    spec = {"w": serde.TensorSpec("w", "float32", (size // 4,))}
    coordinator = Coordinator(
        run_id="run", model_fingerprint="f", payload_spec=spec, stages={"secure": "plain"}, max_update_bytes=size,
        chunk_size=1024, poll_interval=0.1, max_inflight_bytes=2 * size,
    )
    server = GrpcServer(coordinator, "127.0.0.1:0", max_streams=12, max_streams_per_peer=12, idle_timeout=1.0).start()
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.FederationStub(channel)
    clients = [f"c{i}" for i in range(6)]
    for client in clients:
        stub.Join(pb.JoinRequest(envelope=serde.envelope("", 0, client), protocol_version=PROTOCOL_VERSION,
                                 model_fingerprint="f", num_examples=1), timeout=5)
    coordinator.open_round(1, clients, *serde.pack_tensors({}), plan={}, timeout=30)
    update = {"w": np.ones(size // 4, dtype=np.float32)}
    manifest, body = serde.pack_tensors(update)
    stop = threading.Event()
    try:
        slow = [stub.PushUpdate.future(_stalled_upload("run", c, body, manifest, stop), timeout=20) for c in clients[:4]]
        time.sleep(0.5)
        assert coordinator.budget.reserved == 2 * size  # two slow uploads hold the whole budget
        refused = [f for f in slow if f.done()]
        assert len(refused) == 2 and all(f.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED for f in refused)
        assert "transport.max_inflight_bytes=8192" in refused[0].exception().details()
        honest = GrpcTransport(server.address)
        header = pb.UpdateHeader(envelope=serde.envelope("run", 1, "c4"), manifest=manifest, weight=1.0, encoding="plain")
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED|max_inflight_bytes"):
            honest.push_update(serde.update_stream(header, body, 1024))  # the budget is full now
        codes = {f.exception(timeout=10).code() for f in slow}  # the idle timeout ends the stalled ones...
        assert grpc.StatusCode.CANCELLED in codes or grpc.StatusCode.DEADLINE_EXCEEDED in codes, codes
        deadline = time.monotonic() + 5
        while coordinator.budget.reserved and time.monotonic() < deadline:
            time.sleep(0.05)
        assert coordinator.budget.reserved == 0  # ...and gives their reservations back
        for client in ("c4", "c5"):  # the honest uploads now go through
            header = pb.UpdateHeader(envelope=serde.envelope("run", 1, client), manifest=manifest, weight=1.0, encoding="plain")
            assert honest.push_update(serde.update_stream(header, body, 1024)).accepted
        assert coordinator.budget.peak == 2 * size  # never above transport.max_inflight_bytes
        coordinator.finish("test over")
        state = coordinator.wait_round()
        assert sorted(state.received) == ["c4", "c5"]
        honest.close()
    finally:
        stop.set()
        channel.close()
        server.stop(grace=0)


def test_rate_limiter_is_per_party_and_its_table_is_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, max_parties=4, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("a", "PullTask")
    with pytest.raises(OverLimit, match="'a'.*transport.max_requests_per_second=2"):
        limiter.check("a", "PullTask")
    limiter.check("b", "PullTask")  # another party has its own bucket
    now[0] += 0.5  # one token back at 2 per second
    limiter.check("a", "PullTask")
    with pytest.raises(OverLimit):
        limiter.check("a", "PullTask")
    for i in range(100):
        limiter.check(f"made-up-{i}", "Join")
    assert limiter.tracked() == 4
    off = RateLimiter(rate=0, burst=1)
    for _ in range(1000):
        off.check("a", "PullTask")
    assert off.tracked() == 0


BAD_LIMITS = [
    ("transport.max_chunks=0", "transport.max_chunks", ">= 1"),
    ("transport.max_requests_per_second=-1", "transport.max_requests_per_second", ">= 0"),
    ("transport.request_burst=0", "transport.request_burst", ">= 1"),
    ("transport.max_silent_parties=-1", "transport.max_silent_parties", ">= 0"),
    ("transport.max_inflight_bytes=1024", "transport.max_inflight_bytes", "transport.max_update_bytes"),
]


@pytest.mark.parametrize(("override", "key", "fragment"), BAD_LIMITS, ids=[k for _, k, _ in BAD_LIMITS])
def test_bad_limit_values_are_refused_naming_the_key(override: str, key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config().with_overrides([override])
    assert info.value.key == key and str(info.value).startswith(f"{key}: ") and fragment in str(info.value)


def test_default_limits_hold_for_an_honest_deployment() -> None:
    t = Config().transport
    assert t.max_inflight_bytes >= t.max_update_bytes
    assert t.max_requests_per_second >= 20 * (1 / t.poll_interval)  # a wide margin over an honest poller
    assert t.max_chunks * (t.chunk_size // 4) >= t.max_update_bytes  # a full upload chunked 4x finer still fits
