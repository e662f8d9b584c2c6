"""What the coordinator holds about the open round and its phases, and the checks that read it.

A `RoundState` lives from the moment the engine opens a round until it ends it; within it one
`PhaseState` at a time is open. Nothing here locks: the coordinator guards both with its
condition variable and calls `phase_owed` (which task a poll gets) and `phase_for_answer` (which
phase an upload answers, or why it is refused) under it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from protocols.errors import MalformedMessage, Refused, StaleMessage
from protocols.secagg import Answer, BlobSpec, Contribution, Phase
from protocols.wire import serde
from protocols.wire.limits import shown
from protocols.wire.v1 import federation_pb2 as pb

_BLOB_NAME = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")


@dataclass
class PhaseState:
    """One open (or finished) phase: its declaration, per-client tasks and the answers so far."""

    phase: Phase
    deadline: float
    tasks: dict[str, tuple[pb.Manifest, bytes, dict[str, bytes]]]
    received: dict[str, Answer] = field(default_factory=dict)
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    sent: set[str] = field(default_factory=set)
    bytes_up: int = 0
    bytes_down: int = 0
    closed: bool = False

    def complete(self, left: set[str]) -> bool:
        """True once every participant answered or left."""
        return all(c in self.received or c in left for c in self.phase.participants)

    def summary(self) -> dict[str, Any]:
        """The phase's line in the round's metrics record (who dropped in which phase, bytes)."""
        dropped = sorted(set(self.phase.participants) - set(self.received))
        return {
            "phase": self.phase.name,
            "participants": len(self.phase.participants),
            "answered": len(self.received),
            "dropped": dropped,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        }


@dataclass
class RoundState:
    """Everything the server holds about one round: the global adapter, its phases, who left."""

    number: int
    cohort: tuple[str, ...]
    manifest: pb.Manifest
    payload: bytes
    plan: dict[str, float]
    phase: PhaseState | None = None
    phases: list[PhaseState] = field(default_factory=list)
    left: set[str] = field(default_factory=set)
    #: Why a party was dropped from the round by its host (a simulated party's runner died), by id.
    drop_reasons: dict[str, str] = field(default_factory=dict)
    closed: bool = False
    #: Set when the run was stopped (Ctrl-C, an error) while this round was open: nothing derived
    #: from it may be released.
    interrupted: str | None = None

    def training_phase(self) -> PhaseState | None:
        """The phase in which clients trained and uploaded (once it opened)."""
        return next((p for p in self.phases if p.phase.trains), None)

    @property
    def received(self) -> dict[str, Contribution]:
        """The uploads of the training phase, as one-shot contributions."""
        phase = self.training_phase()
        if phase is None:
            return {}
        return {c: Contribution(c, a.tensors, a.weight) for c, a in phase.received.items()}

    @property
    def client_metrics(self) -> dict[str, dict[str, float]]:
        """Metrics the clients reported with their uploads (empty when the secure mode hides them)."""
        phase = self.training_phase()
        return dict(phase.client_metrics) if phase is not None else {}

    @property
    def bytes_up(self) -> int:
        """Bytes received over all phases."""
        return sum(p.bytes_up for p in self.phases)

    @property
    def bytes_down(self) -> int:
        """Bytes sent over all phases."""
        return sum(p.bytes_down for p in self.phases)

    def closed_phase(self, name: str) -> bool:
        """Whether a phase of this name already ran and closed in this round."""
        return any(p.phase.name == name and p.closed for p in self.phases)


def pack_phase_tasks(phase: Phase) -> dict[str, tuple[pb.Manifest, bytes, dict[str, bytes]]]:
    """Serialise each participant's payload once, when the phase opens."""
    tasks: dict[str, tuple[pb.Manifest, bytes, dict[str, bytes]]] = {}
    for client in phase.participants:
        data = phase.payloads.get(client)
        tensors = dict(data.tensors) if data is not None else {}
        blobs = dict(data.blobs) if data is not None else {}
        manifest, payload = serde.pack_tensors(tensors)
        tasks[client] = (manifest, payload, blobs)
    return tasks


def check_blobs(blobs: Mapping[str, bytes], specs: tuple[BlobSpec, ...], *, who: str, phase: str) -> dict[str, bytes]:
    """Validate an answer's byte strings against the phase's `BlobSpec` list; return them as a dict."""
    counts = [0] * len(specs)
    out: dict[str, bytes] = {}
    for name, value in blobs.items():
        if not _BLOB_NAME.fullmatch(name):
            raise MalformedMessage(f"{who}: phase {phase!r}: blob name {shown(name)} is not allowed")
        index = next((i for i, spec in enumerate(specs) if spec.matches(name)), None)
        if index is None:
            allowed = ", ".join(repr(s.name) for s in specs) or "none"
            raise MalformedMessage(f"{who}: phase {phase!r} does not take blob {name!r} (allowed: {allowed})")
        spec = specs[index]
        counts[index] += 1
        if counts[index] > spec.max_count:
            raise MalformedMessage(f"{who}: phase {phase!r}: more than {spec.max_count} blob(s) {spec.name!r}")
        if len(value) > spec.max_bytes:
            raise MalformedMessage(
                f"{who}: phase {phase!r}: blob {name!r} has {len(value)} bytes (at most {spec.max_bytes})"
            )
        out[name] = bytes(value)
    return out


class CountingIterator:
    """Counts the serialized bytes of the messages it passes through."""

    def __init__(self, messages: Iterable[pb.UpdateChunk]) -> None:
        self._it = iter(messages)
        self.bytes = 0

    def __iter__(self) -> CountingIterator:
        return self

    def __next__(self) -> pb.UpdateChunk:
        message = next(self._it)
        self.bytes += message.ByteSize()
        return message


def phase_owed(current: RoundState, client_id: str) -> PhaseState | None:
    """The open phase if ``client_id`` still owes it an answer."""
    phase = current.phase
    if current.closed or phase is None or phase.closed:
        return None
    if client_id not in phase.phase.participants or client_id in phase.received or client_id in current.left:
        return None
    return phase


def phase_for_answer(current: RoundState, name: str, client_id: str) -> PhaseState:
    """The open phase an answer is for; a message for a phase that is not open is refused."""
    phase = current.phase
    who = f"client {client_id!r}"
    wanted = name or (phase.phase.name if phase is not None and phase.phase.trains else "")
    if phase is None or phase.closed or phase.phase.name != wanted:
        if name and current.closed_phase(name):
            raise StaleMessage(f"answer from {who} is for phase {shown(name)} of round {current.number}, which is closed")
        open_name = phase.phase.name if phase is not None and not phase.closed else "none"
        raise StaleMessage(
            f"answer from {who} is for phase {shown(name or '(training)')} of round {current.number}, "
            f"which is not open (open phase: {open_name})"
        )
    if client_id not in phase.phase.participants:
        raise Refused(f"{who} is not a participant of phase {phase.phase.name!r} of round {current.number}")
    if client_id in phase.received:
        raise Refused(
            f"{who} already answered phase {phase.phase.name!r} of round {current.number}",
            code=grpc.StatusCode.ALREADY_EXISTS,
        )
    return phase
