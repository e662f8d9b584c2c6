"""A federated client: join, poll for tasks, train, encode, upload, until the run finishes.

The client pipeline for one task is: load the global adapter -> local training -> update =
adapter delta -> (simulated attack, evaluation only) -> privacy transform (clip / noise share)
-> secure encoding -> chunked upload. The stages are built from the client's own config and must
match the names the server announces in every task, so a client never silently runs weaker
protections than it was configured with.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from privacy.mechanisms import PrivacyMechanism
from protocols.secagg import SecureAggregation
from protocols.wire import serde
from protocols.wire.v1 import federation_pb2 as pb
from robustness.attacks import Attack
from secure_fl.client.trainer import LocalTrainer, derive_seed
from secure_fl.config import Config
from secure_fl.errors import RunError, TransportError
from secure_fl.models import model_fingerprint, model_info
from secure_fl.stages import INFO_PREFIX, Stages
from protocols.wire.limits import PROTOCOL_VERSION
from secure_fl.transport.base import ClientTransport

log = logging.getLogger(__name__)
T = TypeVar("T")

# Codes meaning "the server is not there (yet)" or "busy": retried until the connect timeout.
_RETRY_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
# Most times in a row a client rejoins after the server forgot it (NOT_FOUND) before giving up.
_MAX_REJOINS = 3


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
        self.finished = False
        self.finish_message = ""
        self.rounds_trained: list[int] = []
        self._fingerprint = model_fingerprint(trainer.adapted.model)
        self._rng = np.random.default_rng(derive_seed(seed, "attack", client_id))

    def _envelope(self, round_number: int = 0) -> pb.Envelope:
        return serde.envelope(self.run_id, round_number, self.client_id)

    def join(self) -> pb.JoinReply:
        """Join the run; the reply fixes the run id used in every later message."""
        reply = self.transport.join(
            pb.JoinRequest(
                envelope=self._envelope(),
                protocol_version=PROTOCOL_VERSION,
                model_fingerprint=self._fingerprint,
                num_examples=self.trainer.num_examples,
                info={**model_info(self.trainer.adapted.model), **self.stages.join_info()},
            )
        )
        self.run_id = reply.envelope.run_id
        self.retry_after = reply.poll_interval_ms / 1000
        return reply

    def step(self) -> str:
        """Poll once and act on the answer; returns ``"wait"``, ``"trained"`` or ``"finished"``."""
        header, payload = serde.read_task_stream(
            self.transport.pull_task(pb.PullTaskRequest(envelope=self._envelope())),
            max_bytes=self.max_download_bytes,
            who="server",
        )
        if header.kind == pb.TaskHeader.FINISHED:
            self.finished, self.finish_message = True, header.message
            return "finished"
        if header.kind != pb.TaskHeader.TRAIN:
            self.retry_after = max(header.retry_after_ms, 1) / 1000
            return "wait"
        self._check_stages(dict(header.stages))
        round_number = header.envelope.round
        global_state = serde.unpack_tensors(header.manifest, payload, who="server")
        seed = derive_seed(self.seed, round_number, self.client_id)
        delta, metrics = self.trainer.train(global_state, dict(header.plan), seed=seed)
        if self.stages.attack is not None:
            delta = self.stages.attack.perturb(delta, rng=self._rng)
        update = self.stages.privacy.client_transform(delta)
        weight = float(self.trainer.num_examples)
        encoded = self.stages.secure.encode(update, weight=weight)
        manifest, body = serde.pack_tensors(encoded)
        upload = pb.UpdateHeader(
            envelope=self._envelope(round_number),
            manifest=manifest,
            weight=weight,
            metrics={k: float(v) for k, v in metrics.items()},
            encoding=self.stages.secure.name,
        )
        try:
            self.transport.push_update(serde.update_stream(upload, body, self.chunk_size))
        except TransportError as exc:
            if exc.code not in ("FAILED_PRECONDITION", "ALREADY_EXISTS"):
                raise
            log.warning("client %s: update for round %d refused: %s", self.client_id, round_number, exc.details)
            return "wait"
        self.rounds_trained.append(round_number)
        return "trained"

    def leave(self, reason: str = "done") -> None:
        """Tell the server this client is gone (errors are ignored: the server may be gone too)."""
        try:
            self.transport.leave(pb.LeaveRequest(envelope=self._envelope(), reason=reason))
        except TransportError as exc:
            log.debug("client %s: leave failed: %s", self.client_id, exc)

    def run(self, *, connect_timeout: float = 120.0, stop: threading.Event | None = None) -> None:
        """Join unless already joined (retrying while the server is unreachable), then poll and train until finished."""
        stop = stop or threading.Event()
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
                stop.wait(1.0)

    def _check_stages(self, announced: dict[str, str]) -> None:
        for stage, mine in self.stages.names().items():
            theirs = announced.get(stage)
            if theirs != mine:
                raise RunError(
                    f"client {self.client_id}: the server runs {stage} = {theirs!r} but this client is configured "
                    f"for {mine!r}; use the same [secure] and [privacy] settings on both sides"
                )
