"""gRPC server transport: exposes a coordinator as the v1 Federation service, with health checks.

Protocol errors become gRPC status codes with the coordinator's message; anything unexpected is
logged and answered with INTERNAL, and the server keeps serving the other clients.

The server is the trust boundary, so it defends its threads and its port:

- requests are decoded here, not by gRPC, so an undecodable message is answered with
  INVALID_ARGUMENT (gRPC itself would say INTERNAL);
- streaming calls (PushUpdate, PullTask) are capped overall and per network peer (IP address):
  one host opening many silent streams cannot take every worker thread, so Join, Leave and the
  health check of honest parties are always served (refused streams get RESOURCE_EXHAUSTED and
  the client retries);
- an upload stream that sends no first message within ``first_message_timeout``, or stalls for
  ``idle_timeout`` between two messages, is cancelled and its thread freed;
- every call counts against its party's rate limit (``transport.max_requests_per_second``,
  bursts of ``transport.request_burst``): the party is its certificate's id under mutual TLS,
  else the client id its message declares, never the IP address (simulations run every party on
  127.0.0.1); over the limit the call gets RESOURCE_EXHAUSTED and the client retries later;
- the port is bound exclusively: a second server on the same address fails to start instead of
  sharing the clients with the first (gRPC enables ``SO_REUSEPORT`` by default).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protocols.errors import Impersonation, MalformedMessage, ProtocolError
from protocols.wire.limits import MAX_ID_LENGTH
from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.server.coordinator import Coordinator
from secure_fl.server.limits import OverLimit, RateLimiter
from secure_fl.transport.address import parse_address
from secure_fl.transport.credentials import PeerIdentity, ServerTLS, Unauthenticated
from secure_fl.transport.grpc_client import CHANNEL_OPTIONS

if TYPE_CHECKING:
    from secure_fl.config import TransportConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=Message)
#: The unary requests, each carrying an envelope.
R = TypeVar("R", pb.JoinRequest, pb.PullTaskRequest, pb.LeaveRequest)
SERVICE_NAME = "secure_fl.v1.Federation"


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> NoReturn:
    if isinstance(exc, ProtocolError):
        if not isinstance(exc, OverLimit):  # the limiter logs the first refusal of a flood, not each one
            log.info("%s refused: %s", method, exc)
        context.abort(exc.code, str(exc))
    log.exception("%s failed", method)
    context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal server error: {type(exc).__name__}")
    raise AssertionError("grpc context.abort returned")  # abort always raises


def _decode(kind: type[M], raw: bytes, method: str) -> M:
    """Parse ``raw`` as ``kind``; an undecodable message is a `MalformedMessage` (INVALID_ARGUMENT)."""
    try:
        message: M = kind.FromString(raw)
        return message
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise MalformedMessage(f"{method}: the message is not a valid {kind.__name__} ({exc})") from None


def _peer_host(peer: str) -> str:
    """The host part of a gRPC peer string (``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class StreamGuard:
    """Caps concurrent streams (overall and per peer) and cancels streams that go silent.

    A single monitor thread checks the deadlines of the watched streams four times a second, so
    a silent stream costs no thread of its own beyond the worker it was already holding.
    """

    def __init__(
        self, *, max_streams: int, max_streams_per_peer: int, first_message_timeout: float, idle_timeout: float
    ) -> None:
        self.max_streams = max_streams
        self.max_streams_per_peer = max_streams_per_peer
        self.first_message_timeout = first_message_timeout
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._open = 0
        self._per_peer: Counter[str] = Counter()
        self._deadlines: dict[int, tuple[float, grpc.ServicerContext, str]] = {}
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="secure-fl-stream-guard", daemon=True)
        self._monitor.start()

    @contextmanager
    def admit(self, context: grpc.ServicerContext, method: str) -> Iterator[None]:
        """Hold one stream slot for the duration of the block, or refuse with RESOURCE_EXHAUSTED."""
        peer = _peer_host(context.peer())
        with self._lock:
            if self._open >= self.max_streams:
                refusal = f"{method}: the server is serving {self._open} streams (transport.max_streams); retry shortly"
            elif self._per_peer[peer] >= self.max_streams_per_peer:
                refusal = (
                    f"{method}: {peer} already holds {self._per_peer[peer]} open streams "
                    "(transport.max_streams_per_peer); retry shortly"
                )
            else:
                refusal = ""
                self._open += 1
                self._per_peer[peer] += 1
        if refusal:
            log.info("refused: %s", refusal)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1
                self._per_peer[peer] -= 1
                if self._per_peer[peer] <= 0:
                    del self._per_peer[peer]

    def watched(self, messages: Iterator[bytes], context: grpc.ServicerContext, method: str) -> Iterator[bytes]:
        """Yield the messages of a client stream; cancel it if one is late."""
        key = id(context)
        why = f"{method}: no first message within {self.first_message_timeout:g} s"
        self._set(key, self.first_message_timeout, context, why)
        iterator = iter(messages)
        try:
            while True:
                try:
                    message = next(iterator)
                except StopIteration:
                    return
                except grpc.RpcError:  # cancelled: by the monitor (late) or by the client
                    with self._lock:
                        late = key not in self._deadlines
                    if late:
                        raise ProtocolError(f"{why}; stream closed", code=grpc.StatusCode.DEADLINE_EXCEEDED) from None
                    raise ProtocolError(f"{method}: the client cancelled the stream", code=grpc.StatusCode.CANCELLED) from None
                why = f"{method}: no message for {self.idle_timeout:g} s"
                self._set(key, self.idle_timeout, context, why)
                yield message
        finally:
            with self._lock:
                self._deadlines.pop(key, None)

    def _set(self, key: int, timeout: float, context: grpc.ServicerContext, why: str) -> None:
        with self._lock:
            self._deadlines[key] = (time.monotonic() + timeout, context, why)

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [(k, c, why) for k, (due, c, why) in self._deadlines.items() if due <= now]
                for key, _, _ in late:
                    del self._deadlines[key]
            for _, context, why in late:
                log.info("closing a stream from %s: %s", context.peer(), why)
                context.cancel()

    def open_streams(self) -> int:
        """How many streams hold a slot now."""
        with self._lock:
            return self._open

    def close(self) -> None:
        """Stop the monitor thread."""
        self._stop.set()


class FederationServicer:
    """Maps each RPC onto the coordinator; decodes requests itself and guards the streams.

    With an ``identity`` (mutual TLS), every call must come with a valid party certificate
    (UNAUTHENTICATED otherwise: none, unknown, revoked) and every message's ``client_id`` must be
    that certificate's party (PERMISSION_DENIED otherwise): the authenticated identity, not the
    declared id, is who acts in the round.
    """

    def __init__(
        self, coordinator: Coordinator, guard: StreamGuard, identity: PeerIdentity | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.guard = guard
        self.identity = identity
        self.limiter = limiter if limiter is not None else RateLimiter(rate=0, burst=1)

    def _limit(self, party: str | None, envelope: pb.Envelope | None, method: str) -> None:
        """Count one call against its party's rate limit: the authenticated id, else the declared one.

        A declared id is cut to `MAX_ID_LENGTH` + 1 characters so that made-up long ids cannot
        make the bucket table large (the coordinator refuses such ids anyway).
        """
        key = party if party is not None else (envelope.client_id if envelope is not None else "")
        self.limiter.check(key[: MAX_ID_LENGTH + 1], method)

    def _unary(self, method: str, fn: Callable[[], T], context: grpc.ServicerContext) -> T:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, the server keeps serving
            _abort(context, exc, method)

    def _bound(self, message: M, context: grpc.ServicerContext, method: str, party: str | None) -> M:
        """``message`` if its envelope names the authenticated ``party`` (no check without mTLS)."""
        if party is None:
            return message
        envelope = getattr(message, "envelope", None)
        if envelope is None and isinstance(message, pb.UpdateChunk):
            envelope = message.header.envelope if message.WhichOneof("part") == "header" else None
        if envelope is not None and envelope.client_id != party:
            raise Impersonation(f"{method}: message for client {envelope.client_id!r} on the connection of "
                                f"authenticated party {party!r}; a party may only act as itself")
        return message

    def _party(self, context: grpc.ServicerContext, method: str) -> str | None:
        if self.identity is None:
            return None
        try:
            return self.identity.authenticate(context)
        except Unauthenticated as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a certificate we cannot read is no identity
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{method}: unreadable client certificate: {exc}")
        raise AssertionError("unreachable")  # context.abort raises

    def _request(self, kind: type[R], raw: bytes, context: grpc.ServicerContext, method: str, party: str | None) -> R:
        """Decode one request, bind it to the authenticated party and count it against the rate limit."""
        request = self._bound(_decode(kind, raw, method), context, method, party)
        self._limit(party, request.envelope, method)
        return request

    def join(self, raw: bytes, context: grpc.ServicerContext) -> pb.JoinReply:
        """Join RPC."""
        party = self._party(context, "Join")
        return self._unary(
            "Join", lambda: self.coordinator.join(self._request(pb.JoinRequest, raw, context, "Join", party)), context
        )

    def pull_task(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[pb.TaskChunk]:
        """PullTask RPC (server stream)."""
        party = self._party(context, "PullTask")
        try:  # the rate limit is checked before a stream slot is taken: a flood holds none
            request = self._request(pb.PullTaskRequest, raw, context, "PullTask", party)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc, "PullTask")
        with self.guard.admit(context, "PullTask"):
            try:
                yield from self.coordinator.pull_task(request)
            except Exception as exc:  # noqa: BLE001
                _abort(context, exc, "PullTask")

    def push_update(self, raw_messages: Iterator[bytes], context: grpc.ServicerContext) -> pb.PushReply:
        """PushUpdate RPC (client stream)."""
        party = self._party(context, "PushUpdate")
        if party is not None:  # authenticated: counted before a stream slot is taken
            self._unary("PushUpdate", lambda: self._limit(party, None, "PushUpdate"), context)
        with self.guard.admit(context, "PushUpdate"):
            messages = self._limited(
                (self._bound(_decode(pb.UpdateChunk, raw, "PushUpdate"), context, "PushUpdate", party)
                 for raw in self.guard.watched(raw_messages, context, "PushUpdate")),
                party,
            )
            return self._unary("PushUpdate", lambda: self.coordinator.push_update(messages), context)

    def _limited(self, messages: Iterator[pb.UpdateChunk], party: str | None) -> Iterator[pb.UpdateChunk]:
        """The upload's messages; without mTLS its first (header) message counts against the declared id."""
        for index, message in enumerate(messages):
            if index == 0 and party is None:
                header = message.header if message.WhichOneof("part") == "header" else None
                self._limit(None, header.envelope if header is not None else None, "PushUpdate")
            yield message

    def leave(self, raw: bytes, context: grpc.ServicerContext) -> pb.LeaveReply:
        """Leave RPC."""
        party = self._party(context, "Leave")
        return self._unary(
            "Leave", lambda: self.coordinator.leave(self._request(pb.LeaveRequest, raw, context, "Leave", party)), context
        )

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler of the Federation service (requests arrive as raw bytes)."""
        methods: dict[str, Any] = {
            "Join": grpc.unary_unary_rpc_method_handler(self.join, response_serializer=pb.JoinReply.SerializeToString),
            "PullTask": grpc.unary_stream_rpc_method_handler(
                self.pull_task, response_serializer=pb.TaskChunk.SerializeToString
            ),
            "PushUpdate": grpc.stream_unary_rpc_method_handler(
                self.push_update, response_serializer=pb.PushReply.SerializeToString
            ),
            "Leave": grpc.unary_unary_rpc_method_handler(self.leave, response_serializer=pb.LeaveReply.SerializeToString),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)


class GrpcServer:
    """A running gRPC server for one coordinator, with the standard health service.

    Raises ``ValueError`` for a malformed address or port and ``OSError`` when the address cannot
    be bound (for example because another server listens there).
    """

    def __init__(
        self,
        coordinator: Coordinator,
        address: str,
        *,
        max_workers: int = 32,
        max_streams: int = 16,
        max_streams_per_peer: int = 8,
        first_message_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        max_requests_per_second: float = 100.0,
        request_burst: int = 200,
        tls: ServerTLS | None = None,
    ) -> None:
        host, _ = parse_address(address, what="server address", allow_port_zero=True)
        #: ``"insecure"``, ``"tls"`` or ``"mtls"``: what this server's port speaks.
        self.security = "insecure" if tls is None else tls.mode
        if max_streams >= max_workers:
            raise ValueError(f"max_streams={max_streams} must leave worker threads for Join and health checks (max_workers={max_workers})")
        self.guard = StreamGuard(
            max_streams=max_streams, max_streams_per_peer=max_streams_per_peer,
            first_message_timeout=first_message_timeout, idle_timeout=idle_timeout,
        )
        #: Per-party token buckets (``transport.max_requests_per_second``, ``transport.request_burst``).
        self.limiter = RateLimiter(rate=max_requests_per_second, burst=request_burst)
        options = [*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)]
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
        identity = tls.identity if tls is not None else None
        servicer = FederationServicer(coordinator, self.guard, identity, self.limiter)
        self._server.add_generic_rpc_handlers((servicer.handler(),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        try:
            if tls is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, tls.credentials)
        except RuntimeError as exc:  # grpc >= 1.5x raises instead of returning 0
            self.guard.close()
            raise OSError(f"cannot listen on {address}: {exc} (is another server already using this port?)") from None
        if self.port == 0:
            self.guard.close()
            raise OSError(f"cannot listen on {address} (is another server already using this port?)")
        self.address = f"{host}:{self.port}"

    @classmethod
    def from_config(
        cls, coordinator: Coordinator, address: str, transport: TransportConfig, *,
        tls: ServerTLS | None = None, max_streams_per_peer: int | None = None,
    ) -> GrpcServer:
        """A server with every ``[transport]`` limit of ``transport`` (``max_streams_per_peer`` overrides one)."""
        return cls(
            coordinator, address, max_streams=transport.max_streams,
            max_streams_per_peer=transport.max_streams_per_peer if max_streams_per_peer is None else max_streams_per_peer,
            first_message_timeout=transport.first_message_timeout, idle_timeout=transport.idle_timeout,
            max_requests_per_second=transport.max_requests_per_second, request_burst=transport.request_burst, tls=tls,
        )

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
        self.guard.close()
