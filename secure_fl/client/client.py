"""A federated client: join, poll for tasks, train, encode, upload, until the run finishes.

The client pipeline for one task is: load the global adapter -> local training -> update =
adapter delta -> (simulated attack, evaluation only) -> privacy transform (clip / noise share)
-> secure encoding -> chunked upload. The stages are built from the client's own config and must
match the names the server announces in every task, so a client never silently runs weaker
protections than it was configured with.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from privacy.mechanisms import PrivacyMechanism
from privacy.mechanisms.base import CLIP_NORM_PLAN_KEY
from protocols.secagg import ClientContext, ClientRound, PhaseData, SecureAggregation
from protocols.wire import serde
from protocols.wire.v1 import federation_pb2 as pb
from robustness.attacks import Attack, AttackContext
from secure_fl.client.mods import mechanism_context, prepare_upload
from secure_fl.client.trainer import LocalTrainer, derive_seed
from secure_fl.config import Config
from secure_fl.errors import RunError, TransportError
from secure_fl.models import trainable_state
from secure_fl.stages import INFO_PREFIX, Stages
from protocols.wire.limits import PROTOCOL_VERSION
from secure_fl.transport.base import ClientTransport

log = logging.getLogger(__name__)
T = TypeVar("T")

# Codes meaning "the server is not there (yet)" or "busy": a call is retried until the connect
# timeout, an upload sent again, the same bytes, until the phase's deadline (fetching and answering
# the task again would replay a phase the SecAgg+ session already left).
_RETRY_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
# Most times in a row a client rejoins after the server forgot it (NOT_FOUND) before giving up.
_MAX_REJOINS = 3
# Back-off after RESOURCE_EXHAUSTED (a rate limit, the stream caps, the in-flight byte budget):
# doubles from the first to the last value, with jitter, and resets after a call goes through.
_BUSY_BACKOFF = (0.25, 5.0)


@dataclass
class ClientStages:
    """The client halves of the pipeline: a view of `Stages` built from the same config.

    ``fingerprints`` (per stage: a hash of name plus settings, see `Stages.fingerprint`) travel in
    the Join request, so a server whose stage settings differ refuses this client before any round.
    """

    secure: SecureAggregation
    privacy: PrivacyMechanism
    attack: Attack | None = None
    fingerprints: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config, *, malicious: bool = False) -> ClientStages:
        """The client stages ``[secure]`` and ``[privacy]`` name (plus ``[attack]`` if ``malicious``)."""
        return cls.from_stages(Stages.from_config(config), malicious=malicious)

    @classmethod
    def from_stages(cls, stages: Stages, *, malicious: bool = False) -> ClientStages:
        """The client halves of ``stages`` (the attack only for a ``malicious`` simulated client)."""
        return cls(
            secure=stages.secure,
            privacy=stages.privacy,
            attack=stages.attack if malicious else None,
            fingerprints=stages.fingerprint(),
        )

    def names(self) -> dict[str, str]:
        """Names to compare with the server's announced stages."""
        return {"secure": self.secure.name, "privacy": self.privacy.name}

    def join_info(self) -> dict[str, str]:
        """The ``JoinRequest.info`` entries carrying the stage fingerprints (``stage.privacy``, ...)."""
        return {f"{INFO_PREFIX}{kind}": value for kind, value in self.fingerprints.items()}


class HonestBoard:
    """The honest clipped updates of each round, shared by simulated clients (white-box attacks).

    Only a simulation with attackers shares a keeping board among its clients; every other client
    has a board that keeps nothing. The board also tells white-box attackers what the server does
    with the updates: its ``defense`` (name and effective settings) and its learning rate.
    """

    def __init__(
        self, *, keep: bool = False, defense: str = "none", defense_settings: Mapping[str, Any] | None = None,
        server_lr: float = 1.0,
    ) -> None:
        self.keep = keep
        self.defense = defense
        self.defense_settings = dict(defense_settings or {})
        self.server_lr = server_lr
        self._updates: dict[int, list[dict[str, np.ndarray]]] = {}
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the settings only: a board sent to another process (a Ray runner) starts empty."""
        return (_board, (self.keep, self.defense, self.defense_settings, self.server_lr))

    def post(self, round_number: int, update: dict[str, np.ndarray]) -> None:
        """Record an honest client's clipped update of ``round_number`` (older rounds are dropped)."""
        if not self.keep:
            return
        with self._lock:
            for old in [r for r in self._updates if r < round_number]:
                del self._updates[old]
            self._updates.setdefault(round_number, []).append(update)

    def honest(self, round_number: int) -> list[dict[str, np.ndarray]]:
        """The honest updates of ``round_number`` posted so far."""
        with self._lock:
            return list(self._updates.get(round_number, []))

    def context(self, round_number: int, client_id: str, *, cohort_size: int, bucket_size: int) -> AttackContext:
        """What attacker ``client_id`` knows in ``round_number``: the honest updates posted, and f = n - their count."""
        honest = tuple(self.honest(round_number))
        return AttackContext(
            round_number, client_id, honest, num_attackers=max(1, cohort_size - len(honest)), cohort_size=cohort_size,
            defense=self.defense, defense_settings=dict(self.defense_settings), bucket_size=bucket_size,
            server_lr=self.server_lr,
        )


def _board(keep: bool, defense: str, defense_settings: Mapping[str, Any], server_lr: float) -> HonestBoard:
    return HonestBoard(keep=keep, defense=defense, defense_settings=defense_settings, server_lr=server_lr)


class FederatedClient:
    """One party in a federated run, over any `ClientTransport`."""

    def __init__(
        self,
        client_id: str,
        transport: ClientTransport,
        trainer: LocalTrainer,
        stages: ClientStages,
        *,
        seed: int = 0,
        chunk_size: int = serde.DEFAULT_CHUNK_SIZE,
        max_download_bytes: int = 1 << 30,
        board: HonestBoard | None = None,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.client_id = client_id
        self.transport = transport
        self.trainer = trainer
        self.stages = stages
        self.seed = seed
        self.chunk_size = chunk_size
        self.max_download_bytes = max_download_bytes
        self.run_id = ""
        self.retry_after = 0.5
        #: Seconds between two attempts of a call refused as busy or unreachable.
        self.retry_wait = 1.0
        self.finished = False
        self.finish_message = ""
        self.rounds_trained: list[int] = []
        self._fingerprint = trainer.fingerprint()
        #: A simulated attacker's randomness; a simulation that rebuilds the party each round passes
        #: the same generator in again, so its draws continue across rounds.
        self._rng = rng if rng is not None else np.random.default_rng(derive_seed(seed, "attack", client_id))
        state = trainable_state(trainer.adapted.model)
        # what this client uploads: its own tensors, or the global shapes when its rule pads them
        tensors = {k: state[k] for k in trainer.update_keys}
        template = getattr(trainer, "upload_template", None)
        self._update_spec = serde.spec_of(template(tensors) if callable(template) else tensors)
        self._round_session: tuple[int, ClientRound] | None = None
        #: Set on a simulated party that exists for one round only: tasks of any other round are
        #: left for the party built for that round (see `secure_fl.parties`).
        self.round_only: int | None = None
        #: Where honest clients of a simulation leave their clipped updates for white-box attackers.
        self.board = board if board is not None else HonestBoard()
        self._backoff = 0.0
        self._stop = threading.Event()  # set by `run`'s caller: ends a back-off wait early

    def _envelope(self, round_number: int = 0) -> pb.Envelope:
        return serde.envelope(self.run_id, round_number, self.client_id)

    def join(self) -> pb.JoinReply:
        """Join the run; the reply fixes the run id used in every later message.

        A (re)join closes any open protocol session: after a server restart the round it was in
        runs again from scratch, and its secrets (key pairs, mask seeds) are never reused for it.
        """
        self._close_session()
        reply = self.transport.join(self.join_request())
        self.adopt(reply)
        return reply

    def join_request(self) -> pb.JoinRequest:
        """What this party declares at Join: protocol, model fingerprint, example count, layout facts."""
        return pb.JoinRequest(
            envelope=self._envelope(),
            protocol_version=PROTOCOL_VERSION,
            model_fingerprint=self._fingerprint,
            # under a secure mode that hides updates the example count is not revealed either
            num_examples=self.trainer.num_examples if self.stages.secure.reveals_individual_updates else 1,
            info={**self.trainer.join_info(), **self.stages.join_info()},
        )

    def adopt(self, reply: pb.JoinReply) -> None:
        """Take on a Join this party made earlier (a simulated party rebuilt when selected again)."""
        self.run_id = reply.envelope.run_id
        self.retry_after = reply.poll_interval_ms / 1000

    def step(self) -> str:
        """Poll once and act on the answer: ``"wait"``, ``"trained"``, ``"answered"`` or ``"finished"``.

        A TRAIN task runs the fixed client-side order (`secure_fl.client.mods`) inside the round's
        protocol session; a PHASE task is answered by the session (key agreement, unmasking). The
        session of a round keeps its secrets between phases and is closed, secrets forgotten, when
        a later round or the end of the run arrives.

        RESOURCE_EXHAUSTED (a rate limit, the stream caps, the in-flight byte budget) means "retry
        later": a refused poll is a ``"wait"`` with a growing back-off in `retry_after`. A refused
        upload (also UNAVAILABLE or DEADLINE_EXCEEDED) is sent again, the same answer, with back-off
        until the phase's deadline: the task is not fetched and answered a second time, which a
        multi-phase session (SecAgg+) could not do and training would waste.
        """
        try:
            header, payload = serde.read_task_stream(
                self.transport.pull_task(pb.PullTaskRequest(envelope=self._envelope(self.round_only or 0))),
                max_bytes=self.max_download_bytes,
                who="server",
            )
        except TransportError as exc:
            if exc.code != "RESOURCE_EXHAUSTED":
                raise
            self.retry_after = self._busy(exc, "PullTask")  # over a server limit: poll again later
            return "wait"
        self._backoff = 0.0
        arrived = time.monotonic()
        if header.kind == pb.TaskHeader.FINISHED:
            self._close_session()
            self.finished, self.finish_message = True, header.message
            return "finished"
        if header.kind not in (pb.TaskHeader.TRAIN, pb.TaskHeader.PHASE):
            if self._round_session is not None and header.envelope.round > self._round_session[0]:
                self._close_session()  # a later round began without this client: forget the old secrets
            self.retry_after = max(header.retry_after_ms, 1) / 1000
            return "wait"
        round_number = header.envelope.round
        if self.round_only is not None and round_number != self.round_only:
            # a simulated party built for another round: its successor (rebuilt for this round) answers
            self.retry_after = max(header.retry_after_ms, 1) / 1000
            return "wait"
        self._check_stages(dict(header.stages))
        phase = header.phase or self.stages.secure.UPLOAD_PHASE
        session = self._session(round_number)
        if header.kind == pb.TaskHeader.TRAIN:
            body, weight, metrics = self._train(header, payload, session, round_number)
        else:
            tensors = serde.unpack_tensors(header.manifest, payload, who="server")
            body, weight, metrics = session.on_phase(phase, PhaseData(tensors, dict(header.blobs))), 0.0, {}
        manifest, raw = serde.pack_tensors(body.tensors)
        upload = pb.UpdateHeader(
            envelope=serde.envelope(self.run_id, round_number, self.client_id, phase),
            manifest=manifest,
            weight=weight,
            metrics=metrics,
            encoding=self.stages.secure.name,
            blobs=dict(body.blobs),
        )
        if not self._push(upload, raw, arrived + (header.deadline_s if header.deadline_s > 0 else 60.0)):
            return "wait"
        if header.kind == pb.TaskHeader.TRAIN:
            self.rounds_trained.append(round_number)
            return "trained"
        return "answered"

    def _push(self, upload: pb.UpdateHeader, raw: bytes, deadline: float) -> bool:
        """Upload an answer; back off and send it again while the server is busy or unreachable.

        Retries until the phase's ``deadline`` (``time.monotonic()``, from the task). False if
        the answer was refused as stale or duplicate, or never got through before the deadline.
        """
        phase, round_number = upload.envelope.phase, upload.envelope.round
        while True:
            try:
                self.transport.push_update(serde.update_stream(upload, raw, self.chunk_size))
                self._backoff = 0.0
                return True
            except TransportError as exc:
                if exc.code in _RETRY_CODES:  # the same answer again: the session has moved past this phase
                    wait = self._busy(exc, "PushUpdate")
                    if time.monotonic() + wait < deadline and not self._stop.is_set():
                        self._stop.wait(wait)
                        continue
                elif exc.code not in ("FAILED_PRECONDITION", "ALREADY_EXISTS"):
                    raise
                log.warning(
                    "client %s: answer to phase %r of round %d refused: %s", self.client_id, phase, round_number, exc.details
                )
                return False

    def _busy(self, exc: TransportError, method: str) -> float:
        """The next back-off (seconds) after a RESOURCE_EXHAUSTED answer to ``method``."""
        low, high = _BUSY_BACKOFF
        first = self._backoff == 0.0
        self._backoff = min(high, max(low, 2 * self._backoff))
        if first:
            log.info("client %s: %s refused for now (%s); backing off", self.client_id, method, exc.details)
        return self._backoff * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret

    def _train(
        self, header: pb.TaskHeader, payload: bytes, session: ClientRound, round_number: int
    ) -> tuple[PhaseData, float, dict[str, float]]:
        """Train on the global adapter and run the client-side order; return the answer, weight, metrics."""
        global_state = serde.unpack_tensors(header.manifest, payload, who="server")
        plan = dict(header.plan)
        seed = derive_seed(self.seed, round_number, self.client_id)
        delta, metrics = self.trainer.train(global_state, plan, seed=seed)
        weight = float(self.trainer.num_examples)
        cohort = int(plan.get("cohort_size", 1))
        reveals = self.stages.secure.reveals_individual_updates
        announced = plan.get(CLIP_NORM_PLAN_KEY)
        context = mechanism_context(
            session, round_number=round_number, cohort_size=cohort, client_id=self.client_id,
            bucket_size=1 if reveals else int(plan.get("bucket_size", cohort)),
            num_values=sum(math.prod(spec.shape) for spec in self._update_spec.values()),
            clip_norm=None if announced is None else float(announced),
        )
        report = self.stages.privacy.client_report(delta, context)  # adaptive clipping: was the update clipped?
        if report and not reveals:
            raise RunError(
                f"client {self.client_id}: privacy {self.stages.privacy.name!r} reports {sorted(report)} with the "
                f"metrics, but secure.mode={self.stages.secure.name!r} sends no metrics in the clear"
            )
        clipped, answer = prepare_upload(
            delta,
            # uniform weights (client-level DP): the protocol gets weight 1, so one client's influence is its clip norm
            weight=1.0 if self.stages.privacy.uniform_weights else weight,
            privacy=self.stages.privacy,
            session=session,
            mechanism_context=context,
            phase_data=PhaseData(blobs=dict(header.blobs)),
            attack=self.stages.attack,
            attack_context=self.board.context(round_number, self.client_id, cohort_size=cohort, bucket_size=context.bucket_size)
            if self.stages.attack is not None else None,
            rng=self._rng,
        )
        if self.stages.attack is None:
            self.board.post(round_number, clipped)
        if not reveals:  # per-client loss and example counts would reveal something of the update
            return answer, 0.0, {}
        return answer, weight, {**{k: float(v) for k, v in metrics.items()}, **report}

    def _session(self, round_number: int) -> ClientRound:
        """The protocol session of ``round_number`` (a new round closes the previous session)."""
        if self._round_session is not None and self._round_session[0] == round_number:
            return self._round_session[1]
        self._close_session()
        context = ClientContext(self.run_id, round_number, self.client_id, self._update_spec)
        session = self.stages.secure.client_round(context)
        self._round_session = (round_number, session)
        return session

    def _close_session(self) -> None:
        if self._round_session is not None:
            self._round_session[1].close()
            self._round_session = None

    def leave(self, reason: str = "done") -> None:
        """Tell the server this client is gone (errors are ignored: the server may be gone too)."""
        try:
            self.transport.leave(pb.LeaveRequest(envelope=self._envelope(), reason=reason))
        except TransportError as exc:
            log.debug("client %s: leave failed: %s", self.client_id, exc)

    def run(self, *, connect_timeout: float = 120.0, stop: threading.Event | None = None) -> None:
        """Join unless already joined (retrying while the server is unreachable), then poll and train until finished."""
        stop = stop or threading.Event()
        self._stop = stop
        if not self.run_id:  # a client that already joined keeps its place
            self._retrying(self.join, connect_timeout, stop)
        rejoins = 0
        try:
            while not stop.is_set():
                try:
                    outcome = self._retrying(self.step, connect_timeout, stop)
                except TransportError as exc:
                    if exc.code != "NOT_FOUND" or rejoins >= _MAX_REJOINS:
                        raise
                    rejoins += 1
                    log.warning(
                        "client %s: the server no longer knows this client (%s); joining again (%d of %d)",
                        self.client_id, exc.details, rejoins, _MAX_REJOINS,
                    )
                    self._retrying(self.join, connect_timeout, stop)
                    continue
                rejoins = 0
                if outcome == "finished":
                    break
                if outcome == "wait":
                    stop.wait(self.retry_after)
        finally:
            self.leave("finished" if self.finished else "stopped")
            self.transport.close()

    def _retrying(self, fn: Callable[[], T], timeout: float, stop: threading.Event) -> T:
        """Call ``fn``, retrying while the server is unreachable, for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        announced = ""
        where = getattr(self.transport, "address", "the server")
        while True:
            try:
                return fn()
            except TransportError as exc:
                taken = exc.code == "ALREADY_EXISTS" and fn == self.join
                if not (exc.code in _RETRY_CODES or taken) or time.monotonic() > deadline or stop.is_set():
                    if taken:
                        raise RunError(f"client {self.client_id}: {exc.details}") from exc
                    if exc.code in _RETRY_CODES:
                        raise RunError(
                            f"client {self.client_id}: server at {where} unreachable or busy for {timeout:.0f}s ({exc.code}: {exc.details})"
                        ) from exc
                    raise
                if exc.code != announced:  # say at once what we wait for, and until when
                    announced = exc.code
                    until = time.strftime("%H:%M:%S", time.localtime(time.time() + deadline - time.monotonic()))
                    reason = "its id is taken" if taken else f"{exc.code}: {exc.details}"
                    log.warning(
                        "client %s: waiting for the server at %s (%s); retrying until %s (transport.connect_timeout=%gs)",
                        self.client_id, where, reason, until, timeout,
                    )
                stop.wait(self.retry_wait)

    def _check_stages(self, announced: dict[str, str]) -> None:
        for stage, mine in self.stages.names().items():
            theirs = announced.get(stage)
            if theirs != mine:
                raise RunError(
                    f"client {self.client_id}: the server runs {stage} = {theirs!r} but this client is configured "
                    f"for {mine!r}; use the same [secure] and [privacy] settings on both sides"
                )
