"""gRPC client transport: the v1 Federation service over a channel to ``HOST:PORT``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

import grpc

from protocols.wire.v1 import federation_pb2 as pb
from protocols.wire.v1 import federation_pb2_grpc as pb_grpc
from secure_fl.errors import TransportError
from secure_fl.transport.base import ClientTransport

if TYPE_CHECKING:
    from secure_fl.transport.credentials import ClientTLS

T = TypeVar("T")

# Chunks are at most a few MiB, so gRPC's default 4 MiB receive limit holds; we only raise the
# send limit slightly to leave room for headers of a full 4 MiB chunk.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 8 << 20),
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.keepalive_time_ms", 30_000),
]


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise TransportError(details or str(exc), code=code.name) from exc


class GrpcTransport(ClientTransport):
    """Talks to a ``secure-fl-server`` at ``address`` (``host:port``): TLS with ``tls``, else plaintext gRPC."""

    def __init__(self, address: str, *, timeout: float = 600.0, tls: ClientTLS | None = None) -> None:
        self.address = address
        self.timeout = timeout
        if tls is None:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(address, tls.credentials, options=options)
        self._stub = pb_grpc.FederationStub(self._channel)

    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        """Join the run."""
        reply: pb.JoinReply = _call(lambda: self._stub.Join(request, timeout=30.0))
        return reply

    def pull_task(self, request: pb.PullTaskRequest) -> Iterator[pb.TaskChunk]:
        """Poll for work; the chunks are read fully so errors surface here."""
        return iter(_call(lambda: list(self._stub.PullTask(request, timeout=self.timeout))))

    def push_update(self, messages: Iterable[pb.UpdateChunk]) -> pb.PushReply:
        """Upload an update as a client stream."""
        reply: pb.PushReply = _call(lambda: self._stub.PushUpdate(iter(messages), timeout=self.timeout))
        return reply

    def leave(self, request: pb.LeaveRequest) -> pb.LeaveReply:
        """Leave the run."""
        reply: pb.LeaveReply = _call(lambda: self._stub.Leave(request, timeout=10.0))
        return reply

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
