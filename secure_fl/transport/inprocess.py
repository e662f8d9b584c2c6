"""In-process transport for simulation: the same messages, handed to the coordinator directly.

No sockets and no serialization, but the coordinator runs exactly the validation, chunking and
byte accounting it runs behind gRPC; protocol errors come back as the same
`TransportError` the gRPC transport raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from protocols.errors import ProtocolError
from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.errors import TransportError
from secure_fl.server.coordinator import Coordinator
from secure_fl.transport.base import ClientTransport

T = TypeVar("T")


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except ProtocolError as exc:
        raise TransportError(str(exc), code=exc.code.name) from exc


class InProcessTransport(ClientTransport):
    """Calls a `Coordinator` living in the same process."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        """Join the run."""
        return _call(lambda: self.coordinator.join(request))

    def pull_task(self, request: pb.PullTaskRequest) -> Iterator[pb.TaskChunk]:
        """Poll for work (the chunks are materialised, as a network would deliver them)."""
        return iter(_call(lambda: list(self.coordinator.pull_task(request))))

    def push_update(self, messages: Iterable[pb.UpdateChunk]) -> pb.PushReply:
        """Upload an update."""
        return _call(lambda: self.coordinator.push_update(messages))

    def leave(self, request: pb.LeaveRequest) -> pb.LeaveReply:
        """Leave the run."""
        return _call(lambda: self.coordinator.leave(request))
