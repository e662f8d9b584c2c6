"""Who may join a run: the checks on a Join request that need no round state.

The coordinator calls `Admission.check` before taking its lock; the checks that need the current
membership (an id already taken, a full run, evicting a silent party) stay in the coordinator.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from protocols.errors import MalformedMessage, Refused, StaleMessage
from protocols.wire import serde
from protocols.wire.limits import PROTOCOL_VERSION, check_client_id, check_metrics, shown
from protocols.wire.v1 import federation_pb2 as pb
from privacy.dpsgd import parse_sample_rate
from secure_fl.stages import CONFIG_TABLES, DP_SGD_TABLES, SAMPLE_RATE_INFO_KEY

__all__ = ["Admission", "ClientRecord"]


@dataclass
class ClientRecord:
    """A joined client: what it declared at Join and when it was last heard from."""

    client_id: str
    num_examples: int
    joined_at: float
    last_seen: float = field(default_factory=time.monotonic)
    #: The Poisson sampling rate of its DP-SGD steps, declared at Join (``None`` without DP-SGD).
    sample_rate: float | None = None
    #: A simulated party the simulation vouches for: it only polls once selected, so silence
    #: does not make it unresponsive (`Coordinator.vouch`).
    virtual: bool = False


@dataclass
class Admission:
    """The run-wide facts a joining client must match, and the bounds on what it may declare."""

    run_id: str
    model_fingerprint: str
    model_info: Mapping[str, str]
    stage_fingerprints: Mapping[str, str]
    max_weight: float
    spec_for: Callable[[str, Mapping[str, str]], Mapping[str, serde.TensorSpec] | None] | None = None
    #: Whether clients train with DP-SGD and must declare their sampling rate at Join.
    sample_level: bool = False

    def check(self, request: pb.JoinRequest) -> tuple[str, int, dict[str, serde.TensorSpec] | None]:
        """Return ``(client id, declared examples, own upload spec)``; raise naming what does not match.

        Refused: an id outside the safe character set, another run, another protocol version,
        another model or adapter layout (the label count named when that is the difference, the
        fingerprint never shown), other stage settings, a declared example count outside
        ``[1, max_weight]``, or an adapter a per-client-shape rule cannot fit.
        """
        client_id = check_client_id(request.envelope.client_id, field="Join: envelope.client_id")
        if request.envelope.run_id and request.envelope.run_id != self.run_id:
            raise StaleMessage(f"client {client_id!r} asked to join run {shown(request.envelope.run_id)}; this server runs {self.run_id!r}")
        if request.protocol_version != PROTOCOL_VERSION:
            raise Refused(
                f"client {client_id!r} speaks protocol version {request.protocol_version}; this server speaks {PROTOCOL_VERSION}"
            )
        info = dict(request.info)
        if request.model_fingerprint != self.model_fingerprint:
            raise Refused(f"client {client_id!r} {self._layout_mismatch(info)}")
        stage_problem = self._stage_mismatch(client_id, info)
        if stage_problem is not None:
            raise Refused(stage_problem)
        declared = int(request.num_examples)
        if not 1 <= declared <= self.max_weight:
            raise MalformedMessage(
                f"client {client_id!r} declared {declared} training examples; a party needs between 1 and "
                f"run.max_weight={self.max_weight:g}"
            )
        return client_id, declared, self._own_spec(client_id, info)

    def sample_rate(self, request: pb.JoinRequest) -> float | None:
        """The DP-SGD sampling rate a joining client declares (``None`` when the run has no DP-SGD).

        Under DP-SGD it is required: the ledger records each client's sample-level spend with it.
        """
        if not self.sample_level:
            return None
        who = f"client {request.envelope.client_id!r}"
        text = dict(request.info).get(SAMPLE_RATE_INFO_KEY)
        if text is None:
            raise Refused(f"{who} declared no {SAMPLE_RATE_INFO_KEY} at Join; this run trains with DP-SGD "
                          "(privacy.dp_sgd) and records every client's sampling rate: run a secure-fl client that sends it")
        try:
            return parse_sample_rate(text)
        except ValueError as exc:
            raise MalformedMessage(f"{who}: Join info {SAMPLE_RATE_INFO_KEY}: {shown(str(exc), 100)}") from None

    def _own_spec(self, client_id: str, info: Mapping[str, str]) -> dict[str, serde.TensorSpec] | None:
        """The joining client's upload specs from ``spec_for``; ``None`` without it. Refuses what it cannot fit."""
        if self.spec_for is None:
            return None
        try:
            spec = self.spec_for(client_id, dict(info))  # None: the global specs (a client that pads its own upload)
            return None if spec is None else dict(spec)
        except (ValueError, KeyError) as exc:
            raise Refused(f"client {client_id!r}: its adapter does not fit this run: {shown(str(exc), 200)}") from None

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
                tables = CONFIG_TABLES.get(stage, f"[{stage}] and [{stage}.params]")
                if stage == "privacy" and (self.sample_level or SAMPLE_RATE_INFO_KEY in info):
                    tables = tables.replace(" and ", ", ") + f", {DP_SGD_TABLES}"
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

    def check_upload(
        self, header: pb.UpdateHeader, *, trains: bool, declared: int, weights_in_clear: bool, who: str, phase: str
    ) -> tuple[float, dict[str, float]]:
        """The weight and metrics of an answer's header, bounded; ``(0.0, {})`` where none may travel.

        In the training phase of a mode that shows weights, the weight must be finite, positive and
        at most the examples declared at Join and ``max_weight``, and the metrics must pass
        `check_metrics`. Anywhere else (phases that do not train, modes that hide updates) a
        weight or metrics in the clear are refused.
        """
        weight = float(header.weight)
        if trains and weights_in_clear:
            if not (math.isfinite(weight) and weight > 0):
                raise MalformedMessage(f"{who}: update weight must be a finite number > 0, got {header.weight}")
            if weight > declared or weight > self.max_weight:
                raise MalformedMessage(
                    f"{who}: update weight {weight:g} exceeds the {declared} training examples it declared at Join"
                    + (f" or run.max_weight={self.max_weight:g}" if weight > self.max_weight else "")
                )
            return weight, check_metrics(dict(header.metrics), who=who)
        if weight != 0 or header.metrics:
            hidden = "this secure mode hides every client's update" if trains else f"phase {phase!r} does not train"
            raise MalformedMessage(f"{who}: {hidden}, so the answer must carry no weight and no metrics in the clear")
        return 0.0, {}
