"""The server's message handlers and round state, independent of the transport.

The gRPC servicer and the in-process transport both call these four handlers with the same
protobuf messages, so simulation exercises exactly the validation a real deployment does. The
round engine (`secure_fl.server.engine`) drives the rounds through `open_round`,
`wait_round` and `finish`. One condition variable guards all state; handlers never
hold it while reading a client's stream, so a slow upload does not block other clients.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from protocols.errors import MalformedMessage, Refused, StaleMessage, UnknownClient
from protocols.secagg import Contribution
from protocols.wire import serde
from protocols.wire.limits import PROTOCOL_VERSION, check_client_id, check_metrics, shown
from protocols.wire.v1 import federation_pb2 as pb

__all__ = ["PROTOCOL_VERSION", "ClientRecord", "Coordinator", "RoundState"]

#: Default bound on an update's weight (its example count), whatever a client declares.
DEFAULT_MAX_WEIGHT = 1e9


@dataclass
class RoundState:
    """Everything the server holds about one round."""

    number: int
    cohort: tuple[str, ...]
    deadline: float
    manifest: pb.Manifest
    payload: bytes
    plan: dict[str, float]
    sent: set[str] = field(default_factory=set)
    received: dict[str, Contribution] = field(default_factory=dict)
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    left: set[str] = field(default_factory=set)
    bytes_up: int = 0
    bytes_down: int = 0
    closed: bool = False
    #: Set when the run was stopped (Ctrl-C, an error) while this round was open: nothing derived
    #: from it may be released.
    interrupted: str | None = None

    def complete(self) -> bool:
        """True once every cohort member delivered or left."""
        return all(c in self.received or c in self.left for c in self.cohort)


@dataclass
class ClientRecord:
    """A joined client: what it declared at Join and when it was last heard from."""

    client_id: str
    num_examples: int
    joined_at: float
    last_seen: float = field(default_factory=time.monotonic)


class Coordinator:
    """Thread-safe protocol state machine shared by every transport."""

    def __init__(
        self,
        *,
        run_id: str,
        model_fingerprint: str,
        payload_spec: Mapping[str, serde.TensorSpec],
        stages: Mapping[str, str],
        max_update_bytes: int,
        chunk_size: int,
        poll_interval: float,
        on_update: Callable[[str, int], None] | None = None,
        max_clients: int | None = None,
        max_weight: float = DEFAULT_MAX_WEIGHT,
        liveness_timeout: float = 60.0,
        model_info: Mapping[str, str] | None = None,
        stage_fingerprints: Mapping[str, str] | None = None,
    ) -> None:
        self.run_id = run_id
        self.model_fingerprint = model_fingerprint
        self.payload_spec = dict(payload_spec)
        self.stages = dict(stages)
        self.max_update_bytes = max_update_bytes
        self.chunk_size = chunk_size
        self.poll_ms = max(1, int(poll_interval * 1000))
        self.on_update = on_update
        self.max_clients = max_clients
        self.max_weight = float(max_weight)
        self.liveness_timeout = float(liveness_timeout)
        self.model_info = dict(model_info or {})
        # Per stage (secure, privacy, rule): hash of name + settings a client must send at Join.
        self.stage_fingerprints = dict(stage_fingerprints or {})
        self._cond = threading.Condition()
        self._clients: dict[str, ClientRecord] = {}
        self._round: RoundState | None = None
        self._closed_rounds: set[int] = set()
        self._finished: str | None = None
        self._evicted: set[str] = set()

    # ------------------------------------------------------------------ handlers (any thread)
    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        """Register a client; refuse another run, protocol version or model, a bad or taken id, a full run.

        Ids are restricted to a safe character set (see `protocols.wire.limits`). An id that is
        active is refused with ALREADY_EXISTS unless its holder went silent for longer than the
        liveness timeout (a client restarting after a crash). When ``max_clients`` are active, a
        silent party that owes nothing is evicted to make room; if none is, the Join is refused
        with RESOURCE_EXHAUSTED.
        """
        client_id = check_client_id(request.envelope.client_id, field="Join: envelope.client_id")
        if request.envelope.run_id and request.envelope.run_id != self.run_id:
            raise StaleMessage(f"client {client_id!r} asked to join run {shown(request.envelope.run_id)}; this server runs {self.run_id!r}")
        if request.protocol_version != PROTOCOL_VERSION:
            raise Refused(
                f"client {client_id!r} speaks protocol version {request.protocol_version}; this server speaks {PROTOCOL_VERSION}"
            )
        if request.model_fingerprint != self.model_fingerprint:
            raise Refused(f"client {client_id!r} {self._layout_mismatch(dict(request.info))}")
        stage_problem = self._stage_mismatch(client_id, dict(request.info))
        if stage_problem is not None:
            raise Refused(stage_problem)
        declared = int(request.num_examples)
        if not 1 <= declared <= self.max_weight:
            raise MalformedMessage(
                f"client {client_id!r} declared {declared} training examples; a party needs between 1 and "
                f"run.max_weight={self.max_weight:g}"
            )
        now = time.monotonic()
        with self._cond:
            if self._finished is not None:
                raise Refused(f"run {self.run_id!r} is finished: {self._finished}")
            existing = self._clients.get(client_id)
            if existing is not None and now - existing.last_seen <= self.liveness_timeout:
                raise Refused(
                    f"client id {client_id!r} is already taken by an active party; use another --client-id "
                    f"(an id is freed when its holder leaves or is silent for {self.liveness_timeout:g} s)",
                    code=grpc.StatusCode.ALREADY_EXISTS,
                )
            if existing is None and self.max_clients is not None and len(self._clients) >= self.max_clients:
                if not self._evict_one_silent(now):
                    raise Refused(
                        f"run {self.run_id!r} is full: {len(self._clients)} of run.num_clients={self.max_clients} "
                        f"parties joined; client {client_id!r} was not admitted",
                        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                    )
            self._clients[client_id] = ClientRecord(client_id, declared, time.time(), last_seen=now)
            self._cond.notify_all()
        return pb.JoinReply(
            envelope=serde.envelope(self.run_id, 0, client_id),
            protocol_version=PROTOCOL_VERSION,
            poll_interval_ms=self.poll_ms,
        )

    def _stage_mismatch(self, client_id: str, info: Mapping[str, str]) -> str | None:
        """Why a client's stage settings differ from the server's (``None`` if they agree).

        A client that sends no fingerprint for a stage is refused when the server has one: it
        cannot show that it runs the same protections (a client older than stage fingerprints).
        """
        for stage, ours in self.stage_fingerprints.items():
            theirs = info.get(f"stage.{stage}")
            if theirs is None:
                return (
                    f"client {client_id!r} sent no fingerprint of its {stage} settings (stage.{stage}); this server "
                    "compares stage settings at Join: run a secure-fl client that sends them"
                )
            if theirs != ours:
                tables = {"rule": "[peft] rule and [peft.rule_params]"}.get(stage, f"[{stage}] and [{stage}.params]")
                return (
                    f"client {client_id!r} runs {stage} with other settings than the server: "
                    f"use the same {tables} on both sides"
                )
        return None

    def _layout_mismatch(self, info: Mapping[str, str]) -> str:
        """Why a client's model fingerprint differs, as precisely as the Join tells (never the fingerprint)."""
        theirs, ours = info.get("num_labels"), self.model_info.get("num_labels")
        if theirs is not None and ours is not None and theirs != ours and theirs.isdigit() and len(theirs) <= 9:
            return (
                f"has a classifier for {theirs} labels but this run has {ours}: give the client data with "
                "the same labels, or set the same data.label_names on both sides"
            )
        return (
            "has a different model or adapter layout than the server (model fingerprints differ): "
            "use the same [model] and [peft] settings (and seed) on both sides"
        )

    def _evict_one_silent(self, now: float) -> bool:
        """Forget the longest-silent party that owes nothing in the open round; False if none is silent."""
        owing = set()
        current = self._round
        if current is not None and not current.closed:
            owing = {c for c in current.cohort if c not in current.received and c not in current.left}
        silent = [
            r for r in self._clients.values() if now - r.last_seen > self.liveness_timeout and r.client_id not in owing
        ]
        if not silent:
            return False
        oldest = min(silent, key=lambda r: r.last_seen)
        del self._clients[oldest.client_id]
        self._evicted.add(oldest.client_id)
        return True

    def pull_task(self, request: pb.PullTaskRequest) -> Iterator[pb.TaskChunk]:
        """Answer a poll: TRAIN (with the global adapter in chunks), WAIT or FINISHED."""
        client_id = self._check_client(request.envelope, "PullTask")
        with self._cond:
            current = self._round
            if self._finished is not None:
                header = pb.TaskHeader(
                    envelope=serde.envelope(self.run_id, 0, client_id), kind=pb.TaskHeader.FINISHED, message=self._finished
                )
                payload = b""
            elif (
                current is not None
                and not current.closed
                and client_id in current.cohort
                and client_id not in current.received
                and client_id not in current.left
            ):
                current.sent.add(client_id)
                header = pb.TaskHeader(
                    envelope=serde.envelope(self.run_id, current.number, client_id),
                    kind=pb.TaskHeader.TRAIN,
                    manifest=current.manifest,
                    plan=current.plan,
                    deadline_s=max(0.0, current.deadline - time.monotonic()),
                    stages=self.stages,
                )
                payload = current.payload
            else:
                header = pb.TaskHeader(
                    envelope=serde.envelope(self.run_id, current.number if current else 0, client_id),
                    kind=pb.TaskHeader.WAIT,
                    retry_after_ms=self.poll_ms,
                )
                payload = b""
        sent = 0
        for message in serde.task_stream(header, payload, self.chunk_size):
            sent += message.ByteSize()
            yield message
        if payload and current is not None:
            with self._cond:
                current.bytes_down += sent

    def push_update(self, messages: Iterable[pb.UpdateChunk]) -> pb.PushReply:
        """Receive one client's update; validate it fully before it joins the round."""
        counted = _CountingIterator(messages)
        try:
            first = next(counted)
        except StopIteration:
            raise MalformedMessage("PushUpdate: empty stream (no header)") from None
        if first.WhichOneof("part") != "header":
            raise MalformedMessage("PushUpdate: stream must start with a header")
        header = first.header
        client_id = self._check_client(header.envelope, "PushUpdate")
        who = f"client {client_id!r}"
        with self._cond:
            declared = self._clients[client_id].num_examples if client_id in self._clients else 0
        with self._cond:
            current = self._check_round_open(header.envelope.round, client_id)
            if client_id not in current.cohort:
                raise Refused(f"{who} is not in the cohort of round {current.number}")
            if client_id in current.received:
                raise Refused(f"{who} already delivered an update for round {current.number}", code=grpc.StatusCode.ALREADY_EXISTS)
        if header.encoding != self.stages["secure"]:
            raise Refused(f"{who} sent a {shown(header.encoding)} payload; this run uses secure mode {self.stages['secure']!r}")
        if not (math.isfinite(header.weight) and header.weight > 0):
            raise MalformedMessage(f"{who}: update weight must be a finite number > 0, got {header.weight}")
        if header.weight > declared or header.weight > self.max_weight:
            raise MalformedMessage(
                f"{who}: update weight {header.weight:g} exceeds the {declared} training examples it declared at Join"
                + (f" or run.max_weight={self.max_weight:g}" if header.weight > self.max_weight else "")
            )
        metrics = check_metrics(dict(header.metrics), who=who)
        # The manifest is checked against the expected payload before a byte of it is read, and
        # memory grows only with the data that actually arrives.
        _, payload = serde.read_update_stream(
            itertools.chain([first], counted), max_bytes=self.max_update_bytes, who=who, expected=self.payload_spec
        )
        tensors = serde.unpack_tensors(header.manifest, payload, expected=self.payload_spec, who=who)
        for name, value in tensors.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise MalformedMessage(f"{who}: tensor {name!r} contains NaN or infinite values")
        with self._cond:
            current = self._check_round_open(header.envelope.round, client_id)
            if client_id in current.received:
                raise Refused(f"{who} already delivered an update for round {current.number}", code=grpc.StatusCode.ALREADY_EXISTS)
            current.received[client_id] = Contribution(client_id, tensors, float(header.weight))
            current.client_metrics[client_id] = metrics
            current.bytes_up += counted.bytes
            self._cond.notify_all()
        if self.on_update is not None:
            self.on_update(client_id, current.number)
        return pb.PushReply(
            envelope=serde.envelope(self.run_id, current.number, client_id),
            accepted=True,
            message="accepted",
            received_bytes=len(payload),
        )

    def leave(self, request: pb.LeaveRequest) -> pb.LeaveReply:
        """Forget a client; if it owed an update for the open round, stop waiting for it."""
        client_id = self._check_client(request.envelope, "Leave")
        with self._cond:
            self._clients.pop(client_id, None)
            if self._round is not None and client_id in self._round.cohort and client_id not in self._round.received:
                self._round.left.add(client_id)
            self._cond.notify_all()
        return pb.LeaveReply(envelope=serde.envelope(self.run_id, 0, client_id))

    # ------------------------------------------------------------------ engine side
    def active_clients(self) -> list[str]:
        """Ids of the joined clients, sorted."""
        with self._cond:
            return sorted(self._clients)

    def selectable_clients(self) -> tuple[list[str], list[str]]:
        """``(responsive, unresponsive)`` joined clients, each sorted.

        Responsive: heard from (Join, a poll, an upload) within the liveness timeout. A party that
        joined and went silent is left out of cohorts once the timeout passed, so it cannot make
        every round wait out its deadline; it is back as soon as it polls again.
        """
        now = time.monotonic()
        with self._cond:
            responsive = sorted(c for c, r in self._clients.items() if now - r.last_seen <= self.liveness_timeout)
            return responsive, sorted(set(self._clients) - set(responsive))

    def wait_for_clients(self, count: int, timeout: float) -> list[str]:
        """Block until ``count`` clients joined or ``timeout`` passed; return who is there."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._clients) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(timeout=min(remaining, 1.0))
            return sorted(self._clients)

    def open_round(
        self, number: int, cohort: Iterable[str], manifest: pb.Manifest, payload: bytes, plan: Mapping[str, float], timeout: float
    ) -> None:
        """Start round ``number`` for ``cohort`` with the given global adapter payload."""
        with self._cond:
            self._round = RoundState(number, tuple(cohort), time.monotonic() + timeout, manifest, payload, dict(plan))
            if self._finished is not None:  # stopped between the engine's check and this call
                self._round.interrupted = self._finished
                self._round.closed = True
            self._cond.notify_all()

    def wait_round(self) -> RoundState:
        """Block until the open round is complete or its deadline passed, then close it."""
        with self._cond:
            current = self._round
            if current is None:
                raise RuntimeError("no round is open")
            while not current.complete() and self._finished is None and not current.closed:
                remaining = current.deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(timeout=min(remaining, 1.0))
            current.closed = True
            self._closed_rounds.add(current.number)
            return current

    def finish(self, message: str) -> None:
        """Mark the run finished; every later poll gets FINISHED with ``message``.

        A round still open is marked interrupted (Ctrl-C, `Server.stop`, an aborted simulation):
        the engine releases nothing derived from it.
        """
        with self._cond:
            self._finished = message
            if self._round is not None:
                if not self._round.closed:
                    self._round.interrupted = message
                self._round.closed = True
            self._cond.notify_all()

    @property
    def finished(self) -> bool:
        """Whether `finish` was called."""
        return self._finished is not None

    # ------------------------------------------------------------------ checks
    def _check_client(self, envelope: pb.Envelope, method: str) -> str:
        client_id = envelope.client_id
        if envelope.run_id != self.run_id:
            raise StaleMessage(
                f"{method} from client {shown(client_id)} is for run {shown(envelope.run_id)}; this server runs {self.run_id!r}"
            )
        with self._cond:
            record = self._clients.get(client_id)
            if record is None:
                why = (
                    "was removed after going silent (join again)" if client_id in self._evicted
                    else "has not joined (call Join first)"
                )
                raise UnknownClient(f"{method}: client {shown(client_id)} {why}")
            record.last_seen = time.monotonic()
        return client_id

    def _check_round_open(self, number: int, client_id: str) -> RoundState:
        current = self._round
        if current is not None and current.interrupted:
            raise StaleMessage(f"update from client {client_id!r} is for round {number}, which was interrupted")
        if current is None or number != current.number:
            if number in self._closed_rounds:
                raise StaleMessage(
                    f"update from client {client_id!r} is for round {number}, which is closed"
                    + (f" (current round: {current.number})" if current else "")
                )
            raise StaleMessage(
                f"update from client {client_id!r} is for round {number}, but the open round is "
                f"{current.number if current else 'none'}"
            )
        if current.closed:
            raise StaleMessage(f"update from client {client_id!r} is for round {number}, which is closed")
        return current


class _CountingIterator:
    """Counts the serialized bytes of the messages it passes through."""

    def __init__(self, messages: Iterable[pb.UpdateChunk]) -> None:
        self._it = iter(messages)
        self.bytes = 0

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> pb.UpdateChunk:
        message = next(self._it)
        self.bytes += message.ByteSize()
        return message
