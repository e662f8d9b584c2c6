"""The interface every secure-aggregation protocol implements.

A protocol leads each round as a sequence of phases (`protocols.secagg.phases`): its server half
(`ServerRound`, from `SecureAggregation.server_round`) declares the phases and turns the answers
into per-bucket sums; its client half (`ClientRound`, from `SecureAggregation.client_round`) is a
per-round session that answers them and keeps its secrets until the round ends. A one-shot
protocol (one upload, no key agreement) only implements `SecureAggregation.encode`,
`SecureAggregation.payload_spec` and `SecureAggregation.aggregate`: the base class runs it as a
one-phase round (that is how ``plain`` works, and how v0.1 plug-ins keep working). The server's later stages (defenses, PEFT rules) only ever see
`BucketSum` objects, so the same round runs whatever the protocol: in ``plain`` mode every
client is a bucket of one; a masked or encrypted protocol hands on one sum per bucket.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from protocols.errors import StageTransitionError
from protocols.secagg.phases import (
    Answer, AnswerSpec, ClientContext, Phase, PhaseData, PhaseResult, RoundContext,
)
from protocols.wire.serde import TensorSpec


@dataclass(frozen=True)
class Contribution:
    """What one client delivered for a round, after the wire layer validated it.

    Attributes
    ----------
    client_id:
        The sender.
    tensors:
        The decoded payload, exactly as the protocol's client half produced it.
    weight:
        The client's aggregation weight (number of training examples).
    """

    client_id: str
    tensors: Mapping[str, np.ndarray]
    weight: float


@dataclass(frozen=True)
class BucketSum:
    """The weighted sum of the updates of one bucket of clients.

    ``total`` holds ``sum_i w_i * update_i`` per tensor and ``weight`` holds ``sum_i w_i``, so
    ``mean()`` is the bucket's weighted mean update. In ``plain`` mode every bucket has a single
    member and the mean is that client's update.
    """

    total: Mapping[str, np.ndarray]
    weight: float
    members: tuple[str, ...]

    def mean(self) -> dict[str, np.ndarray]:
        """Return the weighted mean update of the bucket (``total / weight``)."""
        if self.weight <= 0:
            raise ValueError(f"bucket {self.members} has non-positive total weight {self.weight}")
        return {name: (value / self.weight).astype(np.float32) for name, value in self.total.items()}


class ServerRound(ABC):
    """The server half of one round: a state machine over phases.

    The engine calls `first_phase`, then `next_phase` with each phase's result until it returns
    ``None``, then `result`. Raising `protocols.errors.ProtocolAbort` from `next_phase` aborts
    the round: the reason goes to ``metrics.jsonl`` and nothing of the round is released.
    """

    @abstractmethod
    def first_phase(self) -> Phase:
        """The round's first phase."""

    @abstractmethod
    def next_phase(self, result: PhaseResult) -> Phase | None:
        """Consume a finished phase; return the next one, or ``None`` when the sums are ready."""

    @abstractmethod
    def result(self) -> list[BucketSum]:
        """The bucket sums of the round (call after `next_phase` returned ``None``)."""

    @property
    def refused(self) -> dict[str, str]:
        """Clients whose answer the protocol refused this round, with the reason (default: none).

        Their inputs are in no sum; the engine writes them to ``metrics.jsonl`` and the log.
        """
        return {}


class ClientRound(ABC):
    """The client half of one round: a session that keeps its secrets between phases.

    The client creates it when the first task of a round arrives and calls `close` when the round
    is over (a task for a later round, or the run's end); its secrets are gone after that.
    """

    def on_phase(self, phase: str, data: PhaseData) -> PhaseData:
        """Answer a phase that does not train (key agreement, unmasking)."""
        raise StageTransitionError(f"this protocol has no phase {phase!r} that a client answers")

    def quantise(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Training phase, step 1: map the clipped float update to what is masked (default: float32)."""
        return {key: np.ascontiguousarray(value, dtype=np.float32) for key, value in update.items()}

    @abstractmethod
    def mask(self, quantised: Mapping[str, np.ndarray], *, weight: float, data: PhaseData) -> PhaseData:
        """Training phase, step 2: mask or encrypt the (noised) quantised update into the answer.

        ``weight`` is the client's aggregation weight; a protocol that hides updates carries it
        inside the answer (the upload's header then holds no weight). ``data`` is the phase payload.
        """

    def close(self) -> None:
        """Forget every secret of the round (default: nothing to forget)."""

    # What a client-side noise mechanism needs to know (distributed DP); the defaults say "no
    # integer quantisation, no buckets announced".
    @property
    def quantisation_step(self) -> float | None:
        """Input units of one integer step of `quantise` (None: the protocol does not quantise to integers)."""
        return None

    @property
    def bucket_size(self) -> int | None:
        """Clients whose inputs are summed with this client's, once known (None: not announced)."""
        return None

    @property
    def worst_case_dropouts(self) -> int:
        """Most clients of this client's bucket that may drop while its sum is still revealed."""
        return 0


class SecureAggregation(ABC):
    """A secure-aggregation protocol: one subclass per mode, registered under `name`.

    Implement either the one-shot trio (`encode`, `payload_spec`, `aggregate`) or the two round
    halves (`server_round`, `client_round`) for a multi-phase protocol.

    Attributes
    ----------
    name:
        The value of ``[secure] mode`` that selects the protocol.
    reveals_individual_updates:
        True when the server sees each client's update (plain mode). Defenses that need individual
        updates, and the privacy report, read this. When False, clients send no per-client metrics
        (loss, example counts) in the clear and the weight travels inside the protocol.
    """

    name: ClassVar[str]
    reveals_individual_updates: ClassVar[bool] = False
    #: Name of the one phase of a one-shot protocol.
    UPLOAD_PHASE: ClassVar[str] = "update"

    # ------------------------------------------------------------------ one-shot protocols
    def encode(self, update: Mapping[str, np.ndarray], *, weight: float) -> dict[str, np.ndarray]:
        """One-shot client half: turn a float update into the tensors that are uploaded."""
        raise NotImplementedError(
            f"{type(self).__name__}: implement encode/payload_spec/aggregate (one-shot) or server_round/client_round"
        )

    def payload_spec(self, update_spec: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """One-shot: the specs of the upload for an update with the given tensor specs.

        The server validates every arriving payload against it before the protocol sees it.
        """
        raise NotImplementedError(f"{type(self).__name__}: a one-shot protocol implements payload_spec")

    def aggregate(self, contributions: Sequence[Contribution]) -> list[BucketSum]:
        """One-shot server half: combine the round's contributions into bucket sums."""
        raise NotImplementedError(f"{type(self).__name__}: a one-shot protocol implements aggregate")

    # ------------------------------------------------------------------ rounds
    def assign_buckets(self, cohort: Sequence[str], rng: np.random.Generator) -> tuple[tuple[str, ...], ...]:
        """Split the cohort into buckets when the round opens (default: one per client if updates
        are revealed anyway, else one bucket holding the whole cohort)."""
        if self.reveals_individual_updates:
            return tuple((c,) for c in cohort)
        return (tuple(cohort),)

    def check_cohort(self, size: int) -> None:
        """Refuse, when the server starts, a planned cohort of ``size`` this protocol cannot protect.

        Raises `ValueError` with the reason (the server turns it into a configuration error).
        Default: every size is fine.
        """

    def server_round(self, context: RoundContext) -> ServerRound:
        """The server half of one round (default: the one-shot protocol as a one-phase round)."""
        return _OneShotServerRound(self, context)

    def client_round(self, context: ClientContext) -> ClientRound:
        """The client half of one round (default: the one-shot protocol's `encode`)."""
        return _OneShotClientRound(self)

    def describe(self) -> dict[str, object]:
        """Return what the server can see under this protocol, for the audit report's threat model.

        Keys read by the report: ``server_sees_individual_updates``, ``bucket_size`` (clients per
        sum the server learns; 1 means individual updates) and ``key_custody`` (who holds the keys).
        """
        return {
            "mode": self.name,
            "server_sees_individual_updates": self.reveals_individual_updates,
            "bucket_size": 1 if self.reveals_individual_updates else None,
            "key_custody": None,
        }

    def state_dict(self) -> dict[str, Any]:
        """State kept across rounds, saved with every round's checkpoint (default: none).

        Values may be JSON-able scalars, lists and dicts, or numpy arrays. Settings (the
        ``__init__`` arguments) are not state: they come from the config.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (default: only the empty state is accepted)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given {sorted(state)}")

class _OneShotServerRound(ServerRound):
    """One phase in which the whole cohort trains and uploads; then `SecureAggregation.aggregate`."""

    def __init__(self, protocol: SecureAggregation, context: RoundContext) -> None:
        self.protocol = protocol
        self.context = context
        self._answers: Mapping[str, Answer] | None = None

    def first_phase(self) -> Phase:
        spec = self.protocol.payload_spec(self.context.update_spec)
        return Phase(self.protocol.UPLOAD_PHASE, self.context.cohort, AnswerSpec(tensors=spec), trains=True)

    def next_phase(self, result: PhaseResult) -> Phase | None:
        if result.phase.name != self.protocol.UPLOAD_PHASE or self._answers is not None:
            raise StageTransitionError(f"one-shot protocol {self.protocol.name!r} got phase {result.phase.name!r}")
        self._answers = result.answers
        return None

    def result(self) -> list[BucketSum]:
        if self._answers is None:
            raise StageTransitionError("the upload phase has not ended")
        contributions = [Contribution(c, a.tensors, a.weight) for c, a in sorted(self._answers.items())]
        return self.protocol.aggregate(contributions)


class _OneShotClientRound(ClientRound):
    def __init__(self, protocol: SecureAggregation) -> None:
        self.protocol = protocol

    def quantise(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(update)

    def mask(self, quantised: Mapping[str, np.ndarray], *, weight: float, data: PhaseData) -> PhaseData:
        return PhaseData(tensors=self.protocol.encode(quantised, weight=weight))
