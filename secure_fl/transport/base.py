"""The client's view of the server: four calls carrying the v1 protobuf messages.

`GrpcTransport` sends them over gRPC;
`InProcessTransport` hands them to a coordinator in the same
process (simulation). Both raise `TransportError` with the gRPC status
name, so client code handles one error type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator

from protocols.wire.v1 import federation_pb2 as pb


class ClientTransport(ABC):
    """How a client reaches the server."""

    @abstractmethod
    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        """Join the run."""

    @abstractmethod
    def pull_task(self, request: pb.PullTaskRequest) -> Iterator[pb.TaskChunk]:
        """Poll for work; the answer streams in chunks."""

    @abstractmethod
    def push_update(self, messages: Iterable[pb.UpdateChunk]) -> pb.PushReply:
        """Upload an update as a stream of chunks."""

    @abstractmethod
    def leave(self, request: pb.LeaveRequest) -> pb.LeaveReply:
        """Leave the run."""

    def close(self) -> None:
        """Release connections (default: nothing to release)."""
