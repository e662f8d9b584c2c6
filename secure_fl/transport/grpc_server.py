"""gRPC server transport: exposes a coordinator as the v1 Federation service, with health checks.

Protocol errors become gRPC status codes with the coordinator's message; anything unexpected is
logged and answered with INTERNAL, and the server keeps serving the other clients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import NoReturn, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protocols.errors import ProtocolError
from protocols.wire.v1 import federation_pb2 as pb
from protocols.wire.v1 import federation_pb2_grpc as pb_grpc
from secure_fl.server.coordinator import Coordinator
from secure_fl.transport.grpc_client import CHANNEL_OPTIONS

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = "secure_fl.v1.Federation"


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> NoReturn:
    if isinstance(exc, ProtocolError):
        log.info("%s refused: %s", method, exc)
        context.abort(exc.code, str(exc))
    log.exception("%s failed", method)
    context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal server error: {type(exc).__name__}: {exc}")
    raise AssertionError("grpc context.abort returned")  # abort always raises


class FederationServicer(pb_grpc.FederationServicer):  # type: ignore[misc]  # generated base is untyped
    """Maps each RPC onto the coordinator."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def _unary(self, method: str, fn: Callable[[], T], context: grpc.ServicerContext) -> T:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, the server keeps serving
            _abort(context, exc, method)

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:  # noqa: N802
        """Join RPC."""
        return self._unary("Join", lambda: self.coordinator.join(request), context)

    def PullTask(self, request: pb.PullTaskRequest, context: grpc.ServicerContext) -> Iterator[pb.TaskChunk]:  # noqa: N802
        """PullTask RPC (server stream)."""
        try:
            yield from self.coordinator.pull_task(request)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc, "PullTask")

    def PushUpdate(self, request_iterator: Iterator[pb.UpdateChunk], context: grpc.ServicerContext) -> pb.PushReply:  # noqa: N802
        """PushUpdate RPC (client stream)."""
        return self._unary("PushUpdate", lambda: self.coordinator.push_update(request_iterator), context)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:  # noqa: N802
        """Leave RPC."""
        return self._unary("Leave", lambda: self.coordinator.leave(request), context)


class GrpcServer:
    """A running gRPC server for one coordinator, with the standard health service."""

    def __init__(self, coordinator: Coordinator, address: str, *, max_workers: int = 32) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=CHANNEL_OPTIONS)
        pb_grpc.add_FederationServicer_to_server(FederationServicer(coordinator), self._server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    def start(self) -> GrpcServer:
        """Start serving and report SERVING on the health service."""
        self._server.start()
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float = 1.0) -> None:
        """Report NOT_SERVING and stop."""
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.stop(grace).wait()
