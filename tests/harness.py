"""Shared test harness for multi-phase protocols: in memory, and through the engine in process.

`drive` runs a protocol's two round halves against each other without any transport (optionally
dropping, altering or recording what clients do); `DroppingTransport`, `in_process_parties` and
`step_all` run the real engine and clients in one process with clients made to vanish in a phase.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from protocols.errors import ProtocolError
from protocols.secagg import Answer, ClientRound, Phase, PhaseData, PhaseResult, ServerRound
from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.config import Config
from secure_fl.server.engine import BackgroundRun, FederatedServer
from secure_fl.transport.base import ClientTransport
from secure_fl.transport.inprocess import InProcessTransport
from tests.test_grpc_round import make_client


def drive(
    server: ServerRound,
    clients: Mapping[str, ClientRound],
    updates: Mapping[str, Mapping[str, np.ndarray]],
    weights: Mapping[str, float],
    *,
    stop_at: str | None = None,
    drops: Mapping[str, Iterable[str]] | None = None,
    alter: Callable[[Phase, str, PhaseData], PhaseData] | None = None,
    quantised: dict[str, dict[str, np.ndarray]] | None = None,
    errors: dict[str, ProtocolError] | None = None,
) -> Phase | None:
    """Run the round's phases in memory until it ends (``None``) or phase ``stop_at`` opens (returned).

    ``drops`` names, per phase, clients that never answer it; ``alter`` may change a client's
    payload before it sees it (tampering); ``quantised`` records what each client quantised;
    with ``errors`` a client that refuses (a `ProtocolError`) is recorded and counts as a drop,
    without it the error propagates.
    """
    phase: Phase | None = server.first_phase()
    while phase is not None and phase.name != stop_at:
        answers = {}
        for c in phase.participants:
            if c in set((drops or {}).get(phase.name, ())):
                continue
            data = phase.payloads.get(c, PhaseData())
            if alter is not None:
                data = alter(phase, c, data)
            try:
                if phase.trains:
                    q = clients[c].quantise(updates[c])
                    if quantised is not None:
                        quantised[c] = q
                    out = clients[c].mask(q, weight=weights[c], data=data)
                else:
                    out = clients[c].on_phase(phase.name, data)
            except ProtocolError as exc:
                if errors is None:
                    raise
                errors[c] = exc
                continue
            answers[c] = Answer(c, out.tensors, out.blobs)
        phase = server.next_phase(PhaseResult(phase, answers))
    return phase


class Dropped(Exception):
    """Raised in a client that was made to vanish."""


class DroppingTransport(ClientTransport):
    """Injected fault: the client leaves when it receives the task of ``(round, phase)``."""

    def __init__(self, inner: ClientTransport, drop_at: tuple[int, str] | None) -> None:
        self.inner = inner
        self.drop_at = drop_at

    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        return self.inner.join(request)

    def pull_task(self, request: pb.PullTaskRequest) -> Iterator[pb.TaskChunk]:
        chunks = list(self.inner.pull_task(request))
        header = chunks[0].header
        if self.drop_at == (header.envelope.round, header.phase):
            self.inner.leave(pb.LeaveRequest(envelope=request.envelope, reason="dropped (injected)"))
            raise Dropped(f"dropped in {self.drop_at}")
        return iter(chunks)

    def push_update(self, messages: Iterable[pb.UpdateChunk]) -> pb.PushReply:
        return self.inner.push_update(messages)

    def leave(self, request: pb.LeaveRequest) -> pb.LeaveReply:
        return self.inner.leave(request)

    def close(self) -> None:
        self.inner.close()


def in_process_parties(
    config: Config, run_dir: Path, drops: Mapping[int, tuple[int, str]], *, count: int = 4
) -> tuple[FederatedServer, list[Any]]:
    """A server and ``count`` joined in-process clients; client i drops at ``drops[i]`` = (round, phase)."""
    server = FederatedServer(config, run_dir, transport="in-process")
    clients = [
        make_client(config, i, DroppingTransport(InProcessTransport(server.coordinator), drops.get(i)))
        for i in range(count)
    ]
    for client in clients:
        client.join()
    return server, clients


def step_all(server: FederatedServer, clients: list) -> BackgroundRun:
    rounds = BackgroundRun(server)
    alive = list(clients)
    while rounds.is_alive() and alive:
        for client in list(alive):
            try:
                if client.step() == "finished":
                    alive.remove(client)
            except Dropped:
                alive.remove(client)
    rounds.join(60)
    return rounds
