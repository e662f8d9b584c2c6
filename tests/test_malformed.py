"""Malformed and stray messages over real gRPC get clear errors; the server keeps serving."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protocols.wire import serde
from protocols.wire.v1 import federation_pb2 as pb
from protocols.wire.v1 import federation_pb2_grpc as pb_grpc
from secure_fl.transport.grpc_client import GrpcTransport
from tests.conftest import smoke_config
from tests.test_grpc_round import _pull_until_train, make_client


def _push(stub: pb_grpc.FederationStub, messages: list[pb.UpdateChunk]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.PushUpdate(iter(messages), timeout=10)
    return excinfo.value


def test_malformed_updates_are_refused_and_server_keeps_serving(grpc_server) -> None:
    config = smoke_config("run.num_clients=2", "run.clients_per_round=2", "run.rounds=1", "run.round_timeout=60")
    running = grpc_server(config)
    channel = grpc.insecure_channel(running.address)
    stub = pb_grpc.FederationStub(channel)
    client = make_client(config, 0, GrpcTransport(running.address))
    client.join()
    other = make_client(config, 1, GrpcTransport(running.address))
    other.join()  # the round starts once clients_per_round clients joined
    header, payload = _pull_until_train(client)
    global_state = serde.unpack_tensors(header.manifest, payload)
    good = {k: np.zeros_like(v) for k, v in global_state.items()}
    run_id, name = client.run_id, next(iter(good))

    def stream(tensors, *, envelope=None, weight=5.0, encoding="plain", chunk=256):
        manifest, body = serde.pack_tensors(tensors)
        head = pb.UpdateHeader(
            envelope=envelope or serde.envelope(run_id, 1, "client-0"), manifest=manifest, weight=weight, encoding=encoding
        )
        return list(serde.update_stream(head, body, chunk))

    cases = []
    renamed = dict(good)
    renamed["not.a.tensor"] = renamed.pop(name)
    cases.append(("wrong name", stream(renamed), grpc.StatusCode.INVALID_ARGUMENT, "not.a.tensor"))
    reshaped = dict(good)
    reshaped[name] = np.zeros((3, 5), np.float32)
    cases.append(("wrong shape", stream(reshaped), grpc.StatusCode.INVALID_ARGUMENT, "shape"))
    wrong_dtype = dict(good)
    wrong_dtype[name] = good[name].astype(np.float64)
    cases.append(("wrong dtype", stream(wrong_dtype), grpc.StatusCode.INVALID_ARGUMENT, "float64"))
    nan = dict(good)
    nan[name] = np.full_like(good[name], np.nan)
    cases.append(("nan", stream(nan), grpc.StatusCode.INVALID_ARGUMENT, "NaN"))
    cases.append(("truncated", stream(good)[:-1], grpc.StatusCode.INVALID_ARGUMENT, "truncated"))
    corrupted = stream(good)
    data = bytearray(corrupted[1].chunk.data)
    data[0] ^= 0xFF
    corrupted[1].chunk.data = bytes(data)
    cases.append(("bad checksum", corrupted, grpc.StatusCode.INVALID_ARGUMENT, "sha256"))
    cases.append(("no header", stream(good)[1:], grpc.StatusCode.INVALID_ARGUMENT, "header"))
    cases.append(("bad weight", stream(good, weight=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "weight"))
    cases.append(("wrong encoding", stream(good, encoding="ckks"), grpc.StatusCode.FAILED_PRECONDITION, "secure mode"))
    cases.append(("wrong run", stream(good, envelope=serde.envelope("other-run", 1, "client-0")), grpc.StatusCode.FAILED_PRECONDITION, "other-run"))
    cases.append(("wrong round", stream(good, envelope=serde.envelope(run_id, 7, "client-0")), grpc.StatusCode.FAILED_PRECONDITION, "round 7"))
    cases.append(("unknown client", stream(good, envelope=serde.envelope(run_id, 1, "mallory")), grpc.StatusCode.NOT_FOUND, "mallory"))

    for label, messages, code, fragment in cases:
        error = _push(stub, messages)
        assert error.code() == code, (label, error.code(), error.details())
        assert fragment.lower() in error.details().lower(), (label, error.details())
        if label not in ("wrong run", "unknown client"):
            assert "client-0" in error.details() or label in ("no header",), (label, error.details())

    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="secure_fl.v1.Federation"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    # after all that, the same client and another one complete the round normally
    worker = threading.Thread(target=other.run, kwargs={"connect_timeout": 30})
    worker.start()
    reply = stub.PushUpdate(iter(stream(good)), timeout=10)
    assert reply.accepted
    duplicate = _push(stub, stream(good))
    assert duplicate.code() == grpc.StatusCode.ALREADY_EXISTS
    result = running.result()
    worker.join(30)
    assert result.metrics[0]["clients"] == 2 and result.metrics[0]["status"] == "ok"
    channel.close()


def test_join_refusals(grpc_server) -> None:
    running = grpc_server(smoke_config("run.num_clients=2", "run.clients_per_round=2", "run.join_timeout=30"))
    stub = pb_grpc.FederationStub(grpc.insecure_channel(running.address))
    fingerprint = running.server.coordinator.model_fingerprint
    with pytest.raises(grpc.RpcError) as bad_model:
        stub.Join(pb.JoinRequest(envelope=serde.envelope("", 0, "c"), protocol_version=1, model_fingerprint="0" * 64))
    assert bad_model.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "model" in bad_model.value.details()
    with pytest.raises(grpc.RpcError) as bad_version:
        stub.Join(pb.JoinRequest(envelope=serde.envelope("", 0, "c"), protocol_version=99, model_fingerprint=fingerprint))
    assert "version" in bad_version.value.details()
    with pytest.raises(grpc.RpcError) as no_id:
        stub.Join(pb.JoinRequest(envelope=serde.envelope("", 0, ""), protocol_version=1, model_fingerprint=fingerprint))
    assert no_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as stranger:
        list(stub.PullTask(pb.PullTaskRequest(envelope=serde.envelope(running.server.run_id, 0, "nobody"))))
    assert stranger.value.code() == grpc.StatusCode.NOT_FOUND
    ok = stub.Join(
        pb.JoinRequest(
            envelope=serde.envelope("", 0, "c"), protocol_version=1, model_fingerprint=fingerprint, num_examples=10,
            info={f"stage.{k}": v for k, v in running.server.stages.fingerprint().items()},
        )
    )
    assert ok.envelope.run_id == running.server.run_id
