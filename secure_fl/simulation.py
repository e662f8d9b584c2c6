"""Simulation: one server and N clients in one process, over the in-process transport.

The server and the clients are the same classes a deployment runs; only the transport differs
(no sockets). The round engine runs in a background thread while the clients, which share one
model instance to save memory, poll and train one after another in the calling thread.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from privacy.mechanisms import create_privacy_mechanism
from protocols.secagg import create_secure_aggregation
from robustness.attacks import create_attack
from secure_fl.client.client import ClientStages, FederatedClient
from secure_fl.client.trainer import LocalTrainer
from secure_fl.config import Config
from secure_fl.data.sources import client_partitions, load_splits
from secure_fl.models import build_model
from secure_fl.progress import ProgressObserver
from secure_fl.server.engine import FederatedServer, RoundObserver, RunResult, new_run_id
from secure_fl.transport.inprocess import InProcessTransport


def attacker_indices(config: Config) -> set[int]:
    """Which simulated clients are malicious (``[attack] fraction`` of them, chosen by seed)."""
    count = int(round(config.attack.fraction * config.run.num_clients))
    if config.attack.kind == "none" or count == 0:
        return set()
    rng = np.random.default_rng([config.run.seed, 7])
    return {int(i) for i in rng.choice(config.run.num_clients, size=count, replace=False)}


def simulate(
    config: Config,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    observer: RoundObserver | None = None,
) -> RunResult:
    """Run a whole federated fine-tune in this process and return its result.

    Parameters
    ----------
    config:
        The run configuration.
    out_dir:
        Run directory; default ``runs/<run-id>``.
    progress:
        Draw a progress bar per round and print a metrics line per round.
    observer:
        Custom round hooks (replaces the progress display).
    """
    run_id = new_run_id()
    out = Path(out_dir) if out_dir is not None else Path("runs") / run_id
    server = FederatedServer(
        config, out, run_id=run_id, observer=observer or ProgressObserver(config.run.rounds, enabled=progress)
    )
    train, _ = load_splits(config)
    shared = build_model(config.model, config.peft, num_labels=len(server.label_names), seed=config.run.seed)
    update_keys = server.stages.rule.update_keys(shared.trainable_names)
    attackers = attacker_indices(config)
    clients = []
    for index, part in enumerate(client_partitions(config, train)):
        stages = ClientStages(
            secure=create_secure_aggregation(config.secure.mode),
            privacy=create_privacy_mechanism(config.privacy.mode),
            attack=create_attack(config.attack.kind) if index in attackers else None,
        )
        trainer = LocalTrainer.from_config(config, part, update_keys=update_keys, adapted=shared)
        client = FederatedClient(
            f"client-{index}",
            InProcessTransport(server.coordinator),
            trainer,
            stages,
            seed=config.run.seed,
            chunk_size=config.transport.chunk_size,
        )
        client.join()
        clients.append(client)

    outcome: dict[str, object] = {}

    def serve() -> None:
        try:
            outcome["result"] = server.run()
        except BaseException as exc:  # re-raised in the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=serve, name="secure-fl-server", daemon=True)
    thread.start()
    try:
        while thread.is_alive() and not all(c.finished for c in clients):
            trained = False
            for client in clients:
                if not client.finished and client.step() == "trained":
                    trained = True
            if not trained:
                time.sleep(0.01)
    except BaseException:
        server.coordinator.finish("simulation aborted")
        thread.join(timeout=30)
        raise
    thread.join()
    for client in clients:
        client.leave()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]
