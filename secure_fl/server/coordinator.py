"""The server's message handlers and round state, independent of the transport.

The gRPC servicer and the in-process transport both call these four handlers with the same
protobuf messages, so simulation exercises exactly the validation a real deployment does. The
round engine (`secure_fl.server.engine`) drives each round as the secure-aggregation protocol
declares it: `begin_round`, then `open_phase` / `wait_phase` for every phase, then `end_round`
(`open_round` / `wait_round` run a one-phase round). A message for a phase that is not open is
refused. One condition variable guards all state; handlers never hold it while reading a
client's stream, so a slow upload does not block other clients.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import grpc
import numpy as np

from protocols.errors import MalformedMessage, Refused, StaleMessage, UnknownClient
from protocols.secagg import Answer, AnswerSpec, Phase, SecureAggregation
from protocols.wire import serde
from protocols.wire.limits import PROTOCOL_VERSION, shown
from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.server.admission import Admission, ClientRecord
from secure_fl.server.limits import ByteBudget
from secure_fl.server.rounds import (
    CountingIterator, PhaseState, RoundState, check_blobs, pack_phase_tasks, phase_for_answer, phase_owed,
)

__all__ = ["PROTOCOL_VERSION", "ClientRecord", "Coordinator", "RoundState"]

#: Default bound on an update's weight (its example count), whatever a client declares.
DEFAULT_MAX_WEIGHT = 1e9
#: Defaults of the ``[transport]`` limits the coordinator enforces (see `secure_fl.config`).
DEFAULT_MAX_CHUNKS = 4096
DEFAULT_MAX_INFLIGHT_BYTES = 2 << 30
#: Most evicted ids remembered (to tell an evicted party why it is unknown); oldest forgotten first.
MAX_REMEMBERED_EVICTIONS = 65536
T = TypeVar("T")


class Coordinator:
    """Thread-safe protocol state machine shared by every transport."""

    def __init__(
        self,
        *,
        run_id: str,
        model_fingerprint: str,
        payload_spec: Mapping[str, serde.TensorSpec] | None = None,
        stages: Mapping[str, str],
        max_update_bytes: int,
        chunk_size: int,
        poll_interval: float,
        on_update: Callable[[str, int], None] | None = None,
        max_clients: int | None = None,
        max_weight: float = DEFAULT_MAX_WEIGHT,
        liveness_timeout: float = 60.0,
        model_info: Mapping[str, str] | None = None,
        weights_in_clear: bool = True,
        spec_for: Callable[[str, Mapping[str, str]], Mapping[str, serde.TensorSpec] | None] | None = None,
        stage_fingerprints: Mapping[str, str] | None = None,
        sample_level: bool = False,
        validate_update: Callable[[Mapping[str, np.ndarray]], None] | None = None,
        max_chunks: int = DEFAULT_MAX_CHUNKS,
        max_inflight_bytes: int | None = None,
        max_silent_parties: int | None = None,
    ) -> None:
        self.run_id = run_id
        #: The upload spec of `open_round`'s one-phase rounds (the engine's phases carry their own).
        self.payload_spec = dict(payload_spec or {})
        self.stages = dict(stages)
        self.max_update_bytes = max_update_bytes
        self.chunk_size = chunk_size
        self.poll_ms = max(1, int(poll_interval * 1000))
        self.on_update = on_update
        self.max_clients = max_clients
        self.liveness_timeout = float(liveness_timeout)
        #: Chunks one upload may carry beyond what its payload needs at ``chunk_size``.
        self.max_chunks = max_chunks
        #: Bytes of uploads held at once (``transport.max_inflight_bytes``; default at least one upload).
        self.budget = ByteBudget(
            max_inflight_bytes if max_inflight_bytes is not None else max(DEFAULT_MAX_INFLIGHT_BYTES, max_update_bytes)
        )
        #: Most joined parties kept while silent past the liveness timeout (``None``: no cap).
        self.max_silent_parties = max_silent_parties
        #: False under a secure mode that hides updates: uploads then carry no weight and no
        #: metrics in the clear (the protocol carries the weight inside the masked payload).
        self.weights_in_clear = weights_in_clear
        #: The PEFT rule's check of one plaintext upload (``ValueError`` naming the tensor), or ``None``.
        self.validate_update = validate_update
        #: A client's own upload specs (rules with per-client shapes), from ``spec_for`` at Join.
        self._client_specs: dict[str, dict[str, serde.TensorSpec]] = {}
        #: What a joining client must match: model and stage fingerprints, weight bound, own specs.
        self.admission = Admission(
            run_id=run_id, model_fingerprint=model_fingerprint, model_info=dict(model_info or {}),
            stage_fingerprints=dict(stage_fingerprints or {}), max_weight=float(max_weight), spec_for=spec_for,
            sample_level=sample_level,
        )
        self._cond = threading.Condition()
        self._clients: dict[str, ClientRecord] = {}
        self._round: RoundState | None = None
        self._closed_rounds: set[int] = set()
        self._finished: str | None = None
        self._evicted: dict[str, None] = {}  # an ordered set, bounded by MAX_REMEMBERED_EVICTIONS

    @property
    def model_fingerprint(self) -> str:
        """The fingerprint of the server's model and adapter layout that a joining client must match."""
        return self.admission.model_fingerprint

    @property
    def model_info(self) -> Mapping[str, str]:
        """Layout facts of the server's model (e.g. ``num_labels``), used to say why a Join is refused."""
        return self.admission.model_info

    # ------------------------------------------------------------------ handlers (any thread)
    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        """Register a client; refuse another run, protocol version or model, a bad or taken id, a full run.

        Ids are restricted to a safe character set (see `protocols.wire.limits`). An id that is
        active is refused with ALREADY_EXISTS unless its holder went silent for longer than the
        liveness timeout (a client restarting after a crash). When ``max_clients`` are active, a
        silent party that owes nothing is evicted to make room; if none is, the Join is refused
        with RESOURCE_EXHAUSTED. Silent parties beyond ``max_silent_parties`` are evicted first
        (`_evict_silent_beyond_cap`), full run or not.
        """
        client_id, declared, own_spec = self.admission.check(request)
        rate = self.admission.sample_rate(request)
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
            self._evict_silent_beyond_cap(now)
            if existing is None and self.max_clients is not None and len(self._clients) >= self.max_clients:
                if not self._evict_one_silent(now):
                    raise Refused(
                        f"run {self.run_id!r} is full: {len(self._clients)} of run.num_clients={self.max_clients} "
                        f"parties joined; client {client_id!r} was not admitted",
                        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
                    )
            self._clients[client_id] = ClientRecord(client_id, declared, time.time(), last_seen=now, sample_rate=rate)
            if own_spec is not None:
                self._client_specs[client_id] = own_spec
            self._cond.notify_all()
        return pb.JoinReply(
            envelope=serde.envelope(self.run_id, 0, client_id),
            protocol_version=PROTOCOL_VERSION,
            poll_interval_ms=self.poll_ms,
        )

    def _evictable(self, now: float) -> list[ClientRecord]:
        """Joined parties silent past the liveness timeout that owe nothing and no simulator vouches for."""
        owing: set[str] = set()
        current = self._round
        if current is not None and not current.closed:  # any phase of the open round may still need them
            owing = set(current.cohort) - current.left
        return [
            r for r in self._clients.values()
            if not r.virtual and now - r.last_seen > self.liveness_timeout and r.client_id not in owing
        ]

    def _evict(self, client_id: str) -> None:
        del self._clients[client_id]
        self._client_specs.pop(client_id, None)
        self._evicted[client_id] = None
        if len(self._evicted) > MAX_REMEMBERED_EVICTIONS:
            del self._evicted[next(iter(self._evicted))]

    def _evict_one_silent(self, now: float) -> bool:
        """Forget the longest-silent party that owes nothing in the open round; False if none is silent."""
        silent = self._evictable(now)
        if not silent:
            return False
        self._evict(min(silent, key=lambda r: r.last_seen).client_id)
        return True

    def _evict_silent_beyond_cap(self, now: float) -> list[str]:
        """Evict the longest-silent parties beyond ``max_silent_parties`` (``transport.max_silent_parties``).

        Called (under the lock) at every Join and whenever the engine picks a cohort, so parties
        that joined and went silent cannot pile up even while the run is not full. O(joined).
        """
        if self.max_silent_parties is None:
            return []
        silent = self._evictable(now)
        excess = len(silent) - self.max_silent_parties
        if excess <= 0:
            return []
        gone = [r.client_id for r in sorted(silent, key=lambda r: r.last_seen)[:excess]]
        for client_id in gone:
            self._evict(client_id)
        return gone

    def pull_task(self, request: pb.PullTaskRequest) -> Iterator[pb.TaskChunk]:
        """Answer a poll: TRAIN (the global adapter), PHASE (a protocol step), WAIT or FINISHED.

        A poll whose envelope names a round (not 0) gets work of that round only: a simulated party
        built for one round never downloads the next round's task meant for its successor.
        """
        client_id = self._check_client(request.envelope, "PullTask")
        phase: PhaseState | None = None
        with self._cond:
            current = self._round
            if self._finished is not None:
                header = pb.TaskHeader(
                    envelope=serde.envelope(self.run_id, 0, client_id), kind=pb.TaskHeader.FINISHED, message=self._finished
                )
                payload = b""
            elif (current is not None and request.envelope.round in (0, current.number)
                  and (phase := phase_owed(current, client_id)) is not None):  # a round > 0 asks for that round only
                phase.sent.add(client_id)
                manifest, own_payload, blobs = phase.tasks[client_id]
                header = pb.TaskHeader(
                    envelope=serde.envelope(self.run_id, current.number, client_id, phase.phase.name),
                    deadline_s=max(0.0, phase.deadline - time.monotonic()),
                    stages=self.stages,
                    phase=phase.phase.name,
                    blobs=blobs,
                )
                if phase.phase.trains:
                    header.kind = pb.TaskHeader.TRAIN
                    header.manifest.CopyFrom(current.manifest)
                    header.plan.update(current.plan)
                    payload = current.payload
                else:
                    header.kind = pb.TaskHeader.PHASE
                    header.manifest.CopyFrom(manifest)
                    payload = own_payload
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
        if phase is not None:
            with self._cond:
                phase.bytes_down += sent

    def push_update(self, messages: Iterable[pb.UpdateChunk]) -> pb.PushReply:
        """Receive one client's answer to the open phase; validate it fully before it joins the round.

        The answer to the training phase is the client's (encoded) update; a v0.1 client that sends
        no phase name is taken to answer the training phase.
        """
        counted = CountingIterator(messages)
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
            own_spec = self._client_specs.get(client_id)
            current = self._check_round_open(header.envelope.round, client_id)
            phase = phase_for_answer(current, header.envelope.phase, client_id)
        trains = phase.phase.trains
        if header.encoding != self.stages["secure"]:
            raise Refused(f"{who} sent a {shown(header.encoding)} payload; this run uses secure mode {self.stages['secure']!r}")
        weight, metrics = self.admission.check_upload(
            header, trains=trains, declared=declared, weights_in_clear=self.weights_in_clear, who=who, phase=phase.phase.name
        )
        blobs = check_blobs(header.blobs, phase.phase.answer.blobs, who=who, phase=phase.phase.name)
        # a rule with per-client shapes gives each client its own upload spec for the training phase
        expected = dict(own_spec) if trains and own_spec is not None else dict(phase.phase.answer.tensors)
        # The manifest is checked against the expected answer before a byte of it is read, and
        # memory grows only with the data that actually arrives.
        where = f"{who} in phase {phase.phase.name!r}"
        serde.check_manifest(header.manifest, expected=expected, max_bytes=self.max_update_bytes, who=where)
        # The declared size is reserved from the server-wide budget before a chunk is read, and
        # given back however the upload ends (done, refused, cancelled by the idle timeout).
        with self.budget.reserve(header.manifest.total_bytes, where):
            chunks = self._capped(counted, header.manifest.total_bytes, where)
            _, payload = serde.read_update_stream(
                itertools.chain([first], chunks), max_bytes=self.max_update_bytes, who=where, expected=expected
            )
            tensors = serde.unpack_tensors(header.manifest, payload, expected=expected, who=where, verify_checksum=False)
            for name, value in tensors.items():
                if value.dtype.kind == "f" and not np.isfinite(value).all():
                    raise MalformedMessage(f"{where}: tensor {name!r} contains NaN or infinite values")
            if trains and self.validate_update is not None:
                try:
                    self.validate_update(tensors)
                except ValueError as exc:
                    raise MalformedMessage(f"{where}: {exc}") from None
        with self._cond:
            current = self._check_round_open(header.envelope.round, client_id)
            if phase_for_answer(current, header.envelope.phase, client_id) is not phase:
                raise StaleMessage(f"{who}: phase {phase.phase.name!r} closed while the answer was arriving")
            phase.received[client_id] = Answer(client_id, tensors, blobs, weight if trains else 0.0)
            phase.client_metrics[client_id] = metrics
            phase.bytes_up += counted.bytes
            self._cond.notify_all()
        if trains and self.on_update is not None:
            self.on_update(client_id, current.number)
        return pb.PushReply(
            envelope=serde.envelope(self.run_id, current.number, client_id, phase.phase.name),
            accepted=True,
            message="accepted",
            received_bytes=len(payload),
        )

    def _capped(self, messages: Iterator[pb.UpdateChunk], total_bytes: int, where: str) -> Iterator[pb.UpdateChunk]:
        """The chunks of an upload, refused (INVALID_ARGUMENT) past ``max(max_chunks, ceil(total / chunk_size))``.

        A client that chunks at ``transport.chunk_size`` needs ``ceil(total / chunk_size)``; a
        stream of 1-byte chunks is cut off after a bounded number of messages, not after
        ``total_bytes`` of them.
        """
        allowance = max(self.max_chunks, math.ceil(total_bytes / self.chunk_size))
        for count, message in enumerate(messages, start=1):
            if count > allowance:
                raise MalformedMessage(
                    f"{where}: upload stream carries more than {allowance} chunks for {total_bytes} bytes "
                    f"(transport.max_chunks={self.max_chunks}); send chunks of up to transport.chunk_size={self.chunk_size} bytes"
                )
            yield message

    def leave(self, request: pb.LeaveRequest) -> pb.LeaveReply:
        """Forget a client; if it owed an update for the open round, stop waiting for it."""
        client_id = self._check_client(request.envelope, "Leave")
        with self._cond:
            self._clients.pop(client_id, None)
            if self._round is not None and client_id in self._round.cohort:
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
            self._evict_silent_beyond_cap(now)
            responsive = sorted(
                c for c, r in self._clients.items() if r.virtual or now - r.last_seen <= self.liveness_timeout
            )
            return responsive, sorted(set(self._clients) - set(responsive))

    def vouch(self, clients: Iterable[str]) -> None:
        """Mark joined ``clients`` as simulated parties that stay selectable while silent.

        A simulation builds a party only when a cohort selects it, so between its rounds it never
        polls; without this, the liveness timeout would leave it out of every later cohort.
        """
        with self._cond:
            for client in clients:
                self._clients[client].virtual = True

    def open_cohort(self) -> tuple[int, tuple[str, ...]] | None:
        """``(round, cohort)`` of the round open now, or ``None`` between rounds and after the run."""
        with self._cond:
            current = self._round
            if current is None or current.closed or self._finished is not None:
                return None
            return current.number, current.cohort

    def drop(self, client_id: str, round_number: int, reason: str) -> bool:
        """Stop waiting for ``client_id`` in round ``round_number`` (its host saw it die); say ``reason``.

        The party stays joined (it may be selected again); the round goes on as with any
        dropout, and the reason reaches the round's metrics. False if that round is not open.
        """
        with self._cond:
            current = self._round
            if current is None or current.number != round_number or current.closed or client_id not in current.cohort:
                return False
            current.left.add(client_id)
            current.drop_reasons[client_id] = reason
            self._cond.notify_all()
            return True

    def awaiting_training(self) -> set[str]:
        """Clients owed an update in the open training phase that have not sent it (nor left).

        A simulation uses it to run white-box attackers only after the honest clients of the round.
        """
        with self._cond:
            current = self._round
            if current is None or current.closed or current.phase is None:
                return set()
            phase = current.phase
            if phase.closed or not phase.phase.trains:
                return set()
            return set(phase.phase.participants) - set(phase.received) - current.left

    def step_after(self, clients: set[str], step: Callable[[], T]) -> T | None:
        """Call ``step`` (a simulated attacker's poll) unless one of ``clients`` still owes the open
        training phase; ``None`` then. Check and call hold the coordinator's (re-entrant) lock, so no
        round can open in between."""
        with self._cond:
            if clients & self.awaiting_training():
                return None
            return step()

    def sample_rates(self, clients: Iterable[str]) -> dict[str, float]:
        """The DP-SGD sampling rate each of ``clients`` declared at Join (clients without one are left out)."""
        with self._cond:
            records = [self._clients.get(c) for c in clients]
            return {r.client_id: r.sample_rate for r in records if r is not None and r.sample_rate is not None}

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

    def begin_round(
        self, number: int, cohort: Iterable[str], manifest: pb.Manifest, payload: bytes, plan: Mapping[str, float]
    ) -> RoundState:
        """Start round ``number`` for ``cohort`` with the given global adapter; no phase is open yet."""
        with self._cond:
            self._round = RoundState(number, tuple(cohort), manifest, payload, dict(plan))
            if self._finished is not None:  # stopped between the engine's check and this call
                self._round.interrupted = self._finished
                self._round.closed = True
            self._cond.notify_all()
            return self._round

    def open_phase(self, phase: Phase, timeout: float) -> PhaseState:
        """Open ``phase`` of the current round for ``phase.timeout`` (default ``timeout``) seconds."""
        tasks = pack_phase_tasks(phase)
        with self._cond:
            current = self._round
            if current is None:
                raise RuntimeError("no round is open")
            unknown = set(phase.participants) - set(current.cohort)
            if unknown:
                raise ValueError(f"phase {phase.name!r} names clients outside the cohort: {sorted(unknown)}")
            if any(p.phase.name == phase.name for p in current.phases):
                raise ValueError(f"round {current.number} already had a phase {phase.name!r}")
            state = PhaseState(phase, time.monotonic() + (phase.timeout or timeout), tasks)
            state.closed = current.closed
            current.phase = state
            current.phases.append(state)
            self._cond.notify_all()
            return state

    def wait_phase(self) -> PhaseState:
        """Block until every participant answered or left, or the phase's deadline passed; close it."""
        with self._cond:
            current = self._round
            if current is None or current.phase is None:
                raise RuntimeError("no phase is open")
            phase = current.phase
            while not phase.complete(current.left) and self._finished is None and not phase.closed:
                remaining = phase.deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(timeout=min(remaining, 1.0))
            phase.closed = True
            current.phase = None
            return phase

    def end_round(self) -> RoundState:
        """Close the current round: every later message for it is refused."""
        with self._cond:
            current = self._round
            if current is None:
                raise RuntimeError("no round is open")
            current.closed = True
            if current.phase is not None:
                current.phase.closed = True
                current.phase = None
            self._closed_rounds.add(current.number)
            return current

    def open_round(
        self, number: int, cohort: Iterable[str], manifest: pb.Manifest, payload: bytes, plan: Mapping[str, float], timeout: float
    ) -> None:
        """Start a one-phase round: the cohort trains and uploads an update matching ``payload_spec``."""
        current = self.begin_round(number, cohort, manifest, payload, plan)
        upload = Phase(SecureAggregation.UPLOAD_PHASE, current.cohort, AnswerSpec(tensors=self.payload_spec), trains=True)
        self.open_phase(upload, timeout)

    def wait_round(self) -> RoundState:
        """Wait for the one phase of a round opened with `open_round`, then close the round."""
        self.wait_phase()
        return self.end_round()

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
                if self._round.phase is not None:
                    self._round.phase.closed = True
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
