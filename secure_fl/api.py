"""Deployment entry points: `Server` / `serve` and `run_client`.

The command-line tools are thin wrappers around these; use them directly to embed a server or a
client in your own code, with your own model and data (a `Workload`).

Example (server and two clients on loopback, from Python)::

    from secure_fl import Server, load_preset, run_client

    config = load_preset("smoke").with_overrides(["run.num_clients=2", "run.clients_per_round=2"])
    with Server(config, address="127.0.0.1:0", out_dir="runs/demo") as server:
        threads = [threading.Thread(target=run_client, args=(config,),
                                    kwargs={"server": server.address, "client_id": f"client-{i}"})
                   for i in range(2)]
        ...
        result = server.wait()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secure_fl.callbacks import CallbackObserver, RoundCallback
from secure_fl.client.client import ClientStages, FederatedClient
from secure_fl.client.trainer import LocalTrainer
from secure_fl.config import Config
from secure_fl.errors import ConfigError, RunError
from secure_fl.progress import ProgressObserver
from secure_fl.server.engine import BackgroundRun, FederatedServer, RunResult
from secure_fl.server.resume import ResumePlan, recover
from secure_fl.transport.address import check_id, parse_address
from secure_fl.transport.grpc_client import GrpcTransport
from secure_fl.transport.credentials import ClientTLS, ServerTLS
from secure_fl.transport.grpc_server import GrpcServer
from secure_fl.workload import Workload

#: ``run.json`` ``transport_security`` values, weakest first.
_SECURITY_ORDER = ("insecure", "tls", "mtls")


class Server:
    """A federated server listening on ``address`` and running its rounds in a background thread.

    Parameters
    ----------
    config:
        The run configuration; its ``[client]`` section is the plan sent to every client.
    address:
        ``host:port`` to listen on (port 0 picks a free one; read `address` after start).
    out_dir:
        Run directory (config, metrics, checkpoints, adapter).
    workload:
        Your own model and data handling (default: the config's text-classification workload).
    eval_dataset:
        Held-out data the server evaluates every round's global adapter on: any indexable dataset
        your ``workload`` can prepare (default: the config dataset's evaluation split when ``workload``
        is not given; no evaluation otherwise).
    callbacks:
        Per-round hooks; one returning ``True`` stops the run after that round.
    progress:
        Show a progress bar and a metrics line per round.
    tls:
        `ServerTLS.load` of the server bundle from ``secure-fl provision`` (mutual TLS by default:
        every party needs its certificate, and its certificate's identity is who it is in the
        round); ``None``: plaintext gRPC, for loopback experiments only (the report warns).
    """

    def __init__(
        self,
        config: Config,
        *,
        address: str,
        out_dir: str | Path,
        workload: Workload | None = None,
        eval_dataset: Any | None = None,
        callbacks: Sequence[RoundCallback] = (),
        progress: bool = False,
        tls: ServerTLS | None = None,
        resume: ResumePlan | None = None,
    ) -> None:
        parse_address(address, what="server address", allow_port_zero=True)  # before anything is written
        self._tls = tls
        observer = CallbackObserver(ProgressObserver(config.run.rounds, enabled=progress), callbacks)
        self.federated = FederatedServer(config, out_dir, observer=observer, workload=workload, eval_dataset=eval_dataset,
                                         resume=resume)
        self._bind = address
        self._grpc: GrpcServer | None = None
        self._rounds: BackgroundRun | None = None

    @classmethod
    def resume(
        cls,
        run_dir: str | Path,
        *,
        address: str,
        workload: Workload | None = None,
        eval_dataset: Any | None = None,
        callbacks: Sequence[RoundCallback] = (),
        progress: bool = False,
        tls: ServerTLS | None = None,
    ) -> Server:
        """Continue the run in ``run_dir`` after its server was killed (``secure-fl-server --resume``).

        The run's own ``config.toml`` and run id are used; what the crash left half-done is
        repaired first (`secure_fl.server.resume.recover`: pending checkpoints promoted or
        deleted by whether their ledger line exists). The run continues after its last complete
        round with the global adapter, plug-in state and reputations of its last release, the
        accountants replayed from the ledger (nothing is spent twice), and an interrupted round
        run again with a new cohort; parties that reconnect rejoin.
        """
        parse_address(address, what="server address", allow_port_zero=True)
        plan = recover(run_dir)
        return cls(plan.config, address=address, out_dir=plan.run_dir, workload=workload, eval_dataset=eval_dataset,
                   callbacks=callbacks, progress=progress, tls=tls, resume=plan)

    @property
    def run_id(self) -> str:
        """The run id clients learn when they join."""
        return self.federated.run_id

    @property
    def address(self) -> str:
        """The address actually listened on (after `start`)."""
        if self._grpc is None:
            raise RunError("the server is not started")
        return self._grpc.address

    def start(self) -> Server:
        """Start listening and running rounds (returns at once)."""
        self._grpc = GrpcServer.from_config(
            self.federated.coordinator, self._bind, self.federated.config.transport, tls=self._tls
        ).start()
        info = self.federated.run_dir.read_run_info()  # the report says whether the wire was protected
        # a resumed run keeps the weakest protection any of its server processes used
        info["transport_security"] = min(
            [self._grpc.security, *([info["transport_security"]] if "transport_security" in info else [])],
            key=lambda mode: _SECURITY_ORDER.index(mode) if mode in _SECURITY_ORDER else 0,
        )
        self.federated.run_dir.write_run_info(info)
        self._rounds = BackgroundRun(self.federated)
        return self

    def wait(self, timeout: float | None = None, *, linger: float = 5.0) -> RunResult:
        """Block until the run ends, keep answering FINISHED for up to ``linger`` seconds, stop."""
        if self._rounds is None:
            raise RunError("the server is not started")
        self._rounds.join(timeout)
        if self._rounds.is_alive():
            raise RunError(f"the run did not finish within {timeout} s")
        deadline = time.monotonic() + linger
        while self.federated.coordinator.active_clients() and time.monotonic() < deadline:
            time.sleep(0.1)
        self.stop()
        return self._rounds.result()

    def stop(self) -> None:
        """Stop the run (if still going) and the gRPC server."""
        self.federated.coordinator.finish("server stopped")
        if self._grpc is not None:
            self._grpc.stop(grace=1.0)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(config: Config, *, address: str, out_dir: str | Path, linger: float = 15.0, **kwargs: Any) -> RunResult:
    """Run a server until its last round is done (blocking); keyword arguments go to `Server`."""
    server = Server(config, address=address, out_dir=out_dir, **kwargs).start()
    try:
        return server.wait(linger=linger)
    finally:
        server.stop()


@dataclass
class ClientSummary:
    """What a client did in a run."""

    client_id: str
    rounds_trained: list[int] = field(default_factory=list)
    message: str = ""


def run_client(
    config: Config,
    *,
    server: str,
    client_id: str,
    dataset: Any | None = None,
    workload: Workload | None = None,
    connect_timeout: float | None = None,
    stop: threading.Event | None = None,
    tls: ClientTLS | None = None,
) -> ClientSummary:
    """Join the server at ``server`` (``host:port``) and train until the run finishes.

    Parameters
    ----------
    config:
        Must match the server's ``[model]``, ``[peft]``, ``[secure]`` and ``[privacy]`` settings.
    dataset:
        This party's training data: a `TextDataset` for the config's
        workload (an `InstructionDataset` for ``model.task = "causal-lm"``), or any indexable dataset for a custom ``workload``. Default: partition ``N`` of
        the configured dataset, where ``client_id`` ends with ``N``.
    workload:
        Your own model/data handling (must equal the server's).
    tls:
        TLS credentials (`ClientTLS.load` of a party bundle from ``secure-fl provision``: mutual
        TLS, the certificate's party must be ``client_id``); ``None``: plaintext (loopback only).
    """
    from secure_fl.data.sources import client_dataset

    check_id(client_id, what="client id")
    parse_address(server, what="server address")
    if tls is not None and tls.party is not None and tls.party != client_id:
        raise ConfigError(f"the party bundle is for {tls.party!r} but the client id is {client_id!r}: a party may only "
                          "act as the identity in its certificate")
    if config.privacy.params.get("insecure_seed") is not None:
        raise ConfigError(
            "privacy.params.insecure_seed is accepted only in simulation (secure-fl simulate or secure_fl.simulate): "
            "a seeded noise generator gives no privacy; remove privacy.params.insecure_seed",
            key="privacy.params.insecure_seed",
        )
    if config.attack.kind != "none":
        raise ConfigError(
            f"attack.kind={config.attack.kind!r}: simulated attacks run only in simulation (secure-fl simulate); "
            "a gRPC client never builds one; set attack.kind = 'none'",
            key="attack.kind",
        )
    if dataset is None:
        if workload is not None:
            raise ConfigError("a custom workload needs this client's dataset: pass dataset=...")
        dataset = client_dataset(config, partition_index(client_id, config.run.num_clients))
    if workload is None:
        trainer = LocalTrainer.from_config(config, dataset)
    else:
        trainer = LocalTrainer.create(workload, dataset, config)
    client = FederatedClient(
        client_id,
        GrpcTransport(server, tls=tls),
        trainer,
        ClientStages.from_config(config),
        seed=config.run.seed,
        chunk_size=config.transport.chunk_size,
    )
    client.run(connect_timeout=connect_timeout or config.transport.connect_timeout, stop=stop)
    return ClientSummary(client_id, list(client.rounds_trained), client.finish_message)


def partition_index(client_id: str, num_clients: int) -> int:
    """The partition a client id names: the number it ends with, in ``0..num_clients-1``."""
    digits = len(client_id) - len(client_id.rstrip("0123456789"))
    if digits == 0 or int(client_id[-digits:]) >= num_clients:
        raise ConfigError(
            f"client id {client_id!r} does not name a partition: pass --data PATH, or use an id ending in an "
            f"index 0..{num_clients - 1} (run.num_clients={num_clients}), e.g. client-0"
        )
    return int(client_id[-digits:])
