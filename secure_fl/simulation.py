"""Simulation: one server and N parties, in this process or on Ray.

The server and the parties are the same classes a deployment runs; only the transport differs.
The round engine runs in a background thread. A party exists only while a cohort holds it
(`secure_fl.parties`): it joins once, is built when a round selects it and dropped when the next
round opens, so memory follows the cohort, not the population. With ``simulation.backend =
"in-process"`` the cohort's parties step one after another in the calling thread over the
in-process transport; with ``"ray"`` they run in Ray actors over gRPC (`secure_fl.ray_backend`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from secure_fl.client.client import ClientStages, FederatedClient, HonestBoard
from secure_fl.callbacks import CallbackObserver, RoundCallback
from secure_fl.client.trainer import LocalTrainer
from secure_fl.config import Config
from secure_fl.data.sources import client_partition_indices, load_splits
from secure_fl.errors import ConfigError
from secure_fl.parties import PartyBuilder, Partitions, PartySource, party_id
from secure_fl.progress import ProgressObserver
from secure_fl.server.engine import BackgroundRun, FederatedServer, RoundObserver, RunResult, new_run_id
from secure_fl.transport.inprocess import InProcessTransport
from secure_fl.workload import Workload


class ExtraParties(Protocol):
    """Simulated parties that join next to the config's own (the empirical audit's canary clients).

    ``count`` of them are counted in the server config's ``run.num_clients``; the data is
    partitioned among the other parties only. `build` is called once the server and the honest
    trainers exist and returns one trainer per extra party (ids ``client-<n>`` onwards, after the
    honest ``client-0 .. client-<n-1>``), each run by a real `FederatedClient`.
    """

    count: int

    def build(self, server: FederatedServer, honest: Sequence[LocalTrainer]) -> Sequence[LocalTrainer]: ...


def attacker_indices(config: Config) -> set[int]:
    """Which simulated clients are malicious (``[attack] fraction`` of them, chosen by seed)."""
    count = int(round(config.attack.fraction * config.run.num_clients))
    if config.attack.kind == "none" or count == 0:
        return set()
    rng = np.random.default_rng([config.run.seed, 7])
    return {int(i) for i in rng.choice(config.run.num_clients, size=count, replace=False)}


def simulate(
    config: Config | None = None,
    out_dir: str | Path | None = None,
    *,
    workload: Workload | None = None,
    client_datasets: Sequence[Any] | None = None,
    eval_dataset: Any | None = None,
    callbacks: Sequence[RoundCallback] = (),
    progress: bool = True,
    observer: RoundObserver | None = None,
    extra_parties: ExtraParties | None = None,
    client_ranks: Sequence[int] | None = None,
) -> RunResult:
    """Run a whole federated fine-tune in this process and return its result.

    With only a config, the model and data come from it (``[model]``, ``[peft]``, ``[data]``). With
    your own pieces, pass a `CustomWorkload` (model factory + peft
    config + optional collate / loss / metric functions), one dataset per client and an
    evaluation dataset; ``run.num_clients`` then becomes ``len(client_datasets)`` and
    ``run.clients_per_round`` is capped at it.

    With ``privacy.audit = true`` the empirical audit (`secure_fl.empirical_audit.run_empirical_audit`)
    runs after the run, in ``<run dir>/empirical-audit``, and the report is rebuilt with its result;
    it re-runs the config, so it needs the config's model and data (no ``workload``).

    Parameters
    ----------
    config:
        The run configuration (default: `Config` defaults).
    out_dir:
        Run directory; default ``runs/<run-id>``.
    workload:
        Model and data handling; default: the config's text-classification workload.
    client_datasets:
        One indexable dataset per client (torch ``Dataset``, HF ``datasets.Dataset`` or list).
    eval_dataset:
        Held-out data the server evaluates every round's global adapter on.
    callbacks:
        Per-round hooks (`Callback` or ``fn(record) -> bool | None``).
    progress:
        Draw a progress bar per round and print a metrics line per round.
    observer:
        Replaces the progress display (advanced).
    extra_parties:
        Parties added to the config's (advanced; the empirical audit's canaries): ``config.run.num_clients``
        counts them, the data is split among the others. Not with ``client_datasets``.
    client_ranks:
        The LoRA rank of each simulated client (client ``i`` gets ``client_ranks[i % len]``), each at
        most ``peft.r``, with ``peft.alpha`` scaled to keep ``alpha / r``: for ``peft.rule = 'flora'``
        (``peft.r`` is then the stacked rank) or ``'fedit'`` with ``[peft.rule_params] max_rank = peft.r``.
        Default: every client has ``peft.r``. Not with ``workload``.
    """
    config = config or Config()
    if config.privacy.params.get("insecure_seed") is not None:
        warnings.warn(
            f"privacy.params.insecure_seed = {config.privacy.params['insecure_seed']} is set: the DP noise is "
            "reproducible by anyone who knows the seed, so this simulation has no privacy guarantee (testing only; "
            "a gRPC server refuses it, and the report flags it)",
            UserWarning, stacklevel=2,
        )
    if config.privacy.audit and (workload is not None or extra_parties is not None):
        raise ConfigError(
            "privacy.audit = true re-runs the config's model and data with canary clients; it cannot re-run a "
            "custom workload: run secure_fl.empirical_audit.run_empirical_audit on a config-driven run instead",
            key="privacy.audit",
        )
    if config.privacy.audit:
        from secure_fl.empirical_audit import check_auditable

        check_auditable(config)  # before the run, not after it
    if extra_parties is not None and client_datasets is not None:
        raise ConfigError("extra_parties needs the config's data (it is split among the other parties): drop client_datasets")
    honest_config = config
    if extra_parties is not None:
        honest = config.run.num_clients - extra_parties.count
        if honest < 1:
            raise ConfigError(f"run.num_clients={config.run.num_clients} leaves no party besides the {extra_parties.count} extra ones")
        honest_config = config.replace(run=replace(config.run, num_clients=honest, clients_per_round=min(config.run.clients_per_round, honest),
                                                   min_updates=min(config.run.min_updates, honest)))
    if (workload is None) != (client_datasets is None):
        raise ConfigError("pass workload and client_datasets together (or neither, to use the config's model and data)")
    if client_datasets is not None:
        if len(client_datasets) == 0:
            raise ConfigError("client_datasets is empty: give one dataset per client")
        n = len(client_datasets)
        run = replace(config.run, num_clients=n, clients_per_round=min(config.run.clients_per_round, n), min_updates=min(config.run.min_updates, n))
        config = config.replace(run=run)
    run_id = new_run_id()
    out = Path(out_dir) if out_dir is not None else Path("runs") / run_id
    display = observer or ProgressObserver(config.run.rounds, enabled=progress)
    server = FederatedServer(
        config,
        out,
        run_id=run_id,
        observer=CallbackObserver(display, callbacks),
        workload=workload,
        eval_dataset=eval_dataset,
        transport=config.simulation.backend,
    )
    if client_ranks is not None and workload is not None:
        raise ConfigError("client_ranks builds each client's model from the config: drop workload or client_ranks")
    if client_datasets is None:
        train, _ = load_splits(honest_config)
        partitions: Sequence[Any] = Partitions(train, client_partition_indices(honest_config, train))
    else:
        partitions = list(client_datasets)
    attackers = attacker_indices(honest_config)
    # white-box attackers read the round's honest updates and know the defense (FedAvg: server lr 1)
    board = HonestBoard(keep=bool(attackers), defense=config.robustness.defense,
                        defense_settings=server.stages.settings.get("defense", {}), server_lr=1.0)
    trigger = server.stages.attack.trigger_set(server.eval_dataset) if server.eval_dataset is not None else None
    if trigger is not None:  # a backdoor: its success on the held-out set, every round, next to accuracy
        server.attack_evaluations["backdoor_accuracy"] = server.workload.prepare(server.adapted, trigger)
    source = PartySource(
        config, server.workload, partitions, attackers=frozenset(attackers),
        client_ranks=tuple(int(r) for r in client_ranks) if client_ranks else None,
        label_names=tuple(getattr(server.workload, "label_names", ())),
    )
    if config.simulation.backend == "ray":
        if extra_parties is not None:
            raise ConfigError("extra parties (the empirical audit's canaries) run in-process only: set "
                              "simulation.backend = 'in-process' for the audit run", key="simulation.backend")
        from secure_fl.ray_backend import run_on_ray

        result = run_on_ray(server, source, board, progress=progress)
    else:
        result = _run_in_process(server, source, board, extra_parties, progress=progress)
    if config.privacy.audit:
        from secure_fl.empirical_audit import run_empirical_audit

        result.empirical_audit = run_empirical_audit(result.run_dir, progress=progress).path
    return result


def _run_in_process(
    server: FederatedServer, source: PartySource, board: HonestBoard, extra_parties: ExtraParties | None, *, progress: bool
) -> RunResult:
    """Run the rounds with every selected party's work in this thread (the default backend).

    Every party joins once; afterwards a party exists only while a cohort holds it: it is built
    when its round opens and dropped when the next one does. Honest parties step first in every
    pass, and an attacker only once every honest member of the cohort uploaded, so all attackers
    of a round see the same honest updates.
    """
    config = server.config
    coordinator = server.coordinator
    builder = PartyBuilder(source, board=board, keep=extra_parties is not None)
    transport = InProcessTransport(coordinator)
    replies = join_parties(builder, transport, progress=progress)
    extras: list[FederatedClient] = []
    if extra_parties is not None:
        trainers = [builder.client(index, transport).trainer for index in range(source.size)]
        for index, trainer in enumerate(extra_parties.build(server, trainers), start=source.size):
            client = FederatedClient(
                party_id(index), transport, trainer, ClientStages.from_config(config),
                seed=config.run.seed, chunk_size=config.transport.chunk_size, board=board,
            )
            client.join()
            extras.append(client)
    coordinator.vouch([party_id(index) for index in range(source.size)] + [c.client_id for c in extras])

    rounds = BackgroundRun(server, name="secure-fl-server")
    hosted_round: int | None = None
    parties: list[FederatedClient] = []
    honest_ids: set[str] = set()
    try:
        while rounds.is_alive():
            opened = coordinator.open_cohort()
            if opened is not None and opened[0] != hosted_round:  # a new round: build its cohort, drop the last
                hosted_round = opened[0]
                members = sorted(i for i in map(party_index, opened[1]) if i is not None and i < source.size)
                hosted = []
                for index in members:
                    client = builder.client(index, transport)
                    client.adopt(replies[index])
                    client.round_only = None if builder.keep else hosted_round
                    hosted.append(client)
                parties = sorted(hosted + extras, key=lambda c: c.stages.attack is not None)
                honest_ids = {c.client_id for c in parties if c.stages.attack is None}
            progressed = False
            for client in parties:
                if client.finished:
                    continue
                if client.stages.attack is None:
                    outcome: str | None = client.step()
                else:
                    outcome = coordinator.step_after(honest_ids, client.step)
                if outcome in ("trained", "answered"):
                    progressed = True
            if not progressed:
                time.sleep(0.01)
    except BaseException as exc:
        coordinator.finish("interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"simulation aborted: {exc}")
        rounds.join(timeout=30)
        raise
    rounds.join()
    return rounds.result()  # re-raises the server's exception in the caller's thread


def party_index(client_id: str) -> int | None:
    """The index of simulated party ``client-<index>``, or ``None`` for another id."""
    prefix, _, number = client_id.partition("-")
    return int(number) if prefix == "client" and number.isdigit() else None


def join_parties(builder: PartyBuilder, transport: Any, *, progress: bool) -> dict[int, Any]:
    """Join every party of ``builder``'s source once (built, joined, dropped unless kept); the replies by index."""
    from tqdm.auto import tqdm

    size = builder.source.size
    replies = {}
    for index in tqdm(range(size), desc="joining parties", unit="party", disable=not progress or size < 100, leave=False):
        replies[index] = builder.client(index, transport).join()
    return replies
