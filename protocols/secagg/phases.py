"""Rounds as sequences of phases: the data types a secure-aggregation protocol and the engine share.

A round is a short conversation the protocol leads. Its server half (`ServerRound`, in
`protocols.secagg.base`) declares one
`Phase` at a time: who takes part, what each participant receives (`PhaseData`: tensors and byte
blobs, per client) and what an answer must look like (`AnswerSpec`). The engine opens the phase,
the clients' halves (`ClientRound`, one session per client and round) answer, and the engine hands
the `PhaseResult` (answers plus who dropped) back to the server half, which declares the next
phase, finishes with bucket sums, or raises `ProtocolAbort` with the reason.

Exactly one phase of a round ``trains``: its task carries the global adapter, and the client
trains, clips, quantises (`ClientRound.quantise`), lets the privacy mechanism add its integer noise
share, and masks or encrypts (`ClientRound.mask`) before answering. Phases before it can agree on
keys; phases after it can unmask.

Nothing here touches the network: the engine and the transports turn phases into wire messages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from protocols.errors import ProtocolAbort
from protocols.wire.serde import TensorSpec

__all__ = [
    "Answer", "AnswerSpec", "BlobSpec", "ClientContext", "Phase", "PhaseData", "PhaseResult", "RoundContext",
    "require_participants",
]  # fmt: skip

_PHASE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class PhaseData:
    """What one party sends or receives in a phase: named tensors and named byte strings."""

    tensors: Mapping[str, np.ndarray] = field(default_factory=dict)
    blobs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class BlobSpec:
    """Byte strings an answer may carry: ``name`` exactly, or any name starting with ``name`` if it
    ends with ``/`` (e.g. ``share/`` for one share per neighbour), each at most ``max_bytes``, at
    most ``max_count`` of them."""

    name: str
    max_bytes: int
    max_count: int = 1

    def matches(self, blob_name: str) -> bool:
        """Whether ``blob_name`` is covered by this spec."""
        return blob_name.startswith(self.name) if self.name.endswith("/") else blob_name == self.name


@dataclass(frozen=True)
class AnswerSpec:
    """What a participant's answer to a phase must contain.

    ``tensors`` are checked like every upload (name, dtype, shape; a spec with ``variable=True``
    admits any shape up to the one given, for ciphertexts); ``blobs`` bound the byte strings.
    """

    tensors: Mapping[str, TensorSpec] = field(default_factory=dict)
    blobs: tuple[BlobSpec, ...] = ()


@dataclass(frozen=True)
class Phase:
    """One exchange of a round, declared by the protocol's server half.

    Attributes
    ----------
    name:
        Short lower-case name (``advertise``, ``masked-input``, ``unmask``); unique within a round.
    participants:
        The clients asked to answer; everybody else gets WAIT.
    answer:
        What each answer must contain (validated before the protocol sees it).
    payloads:
        Per-client data sent with the task (a client missing here gets an empty `PhaseData`).
    trains:
        The phase in which clients train and send their masked or encrypted update; its task
        carries the global adapter (payload tensors are not allowed in it, blobs are).
    timeout:
        Seconds the phase stays open (default: ``run.round_timeout``).
    """

    name: str
    participants: tuple[str, ...]
    answer: AnswerSpec = field(default_factory=AnswerSpec)
    payloads: Mapping[str, PhaseData] = field(default_factory=dict)
    trains: bool = False
    timeout: float | None = None

    def __post_init__(self) -> None:
        if not _PHASE_NAME.fullmatch(self.name):
            raise ValueError(f"phase name {self.name!r} must match [a-z][a-z0-9_-]{{0,31}}")
        unknown = set(self.payloads) - set(self.participants)
        if unknown:
            raise ValueError(f"phase {self.name!r} has payloads for non-participants {sorted(unknown)}")
        if self.trains and any(data.tensors for data in self.payloads.values()):
            raise ValueError(f"phase {self.name!r} trains, so its task carries the global adapter: send blobs, not tensors")


@dataclass(frozen=True)
class Answer:
    """One participant's validated answer to a phase (``weight`` only in the training phase)."""

    client_id: str
    tensors: Mapping[str, np.ndarray]
    blobs: Mapping[str, bytes]
    weight: float = 0.0


@dataclass(frozen=True)
class PhaseResult:
    """How a phase ended: the answers that arrived before its deadline, and who did not answer."""

    phase: Phase
    answers: Mapping[str, Answer]

    @property
    def dropped(self) -> tuple[str, ...]:
        """Participants that did not answer (left, crashed, too slow), sorted."""
        return tuple(sorted(set(self.phase.participants) - set(self.answers)))

    @property
    def survivors(self) -> tuple[str, ...]:
        """Participants that answered, sorted."""
        return tuple(sorted(self.answers))


@dataclass(frozen=True)
class RoundContext:
    """What the server half of a protocol knows when a round opens.

    ``buckets`` are fixed here, before any phase: each is an independent instance of the protocol
    whose sum the server learns (one client per bucket in ``plain`` mode).
    """

    run_id: str
    round: int
    cohort: tuple[str, ...]
    buckets: tuple[tuple[str, ...], ...]
    update_spec: Mapping[str, TensorSpec]
    timeout: float


@dataclass(frozen=True)
class ClientContext:
    """What the client half of a protocol knows when its session for a round starts."""

    run_id: str
    round: int
    client_id: str
    update_spec: Mapping[str, TensorSpec]


def require_participants(result: PhaseResult, needed: Sequence[str], why: str) -> None:
    """Raise `ProtocolAbort` naming the missing clients when any of ``needed`` did not answer."""
    missing = sorted(set(needed) - set(result.answers))
    if missing:
        raise ProtocolAbort(f"phase {result.phase.name!r}: {', '.join(missing)} did not answer; {why}")
