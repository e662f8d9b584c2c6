"""``simulation.backend = "ray"``: the selected parties' work runs in Ray actors.

The server (round engine, secure aggregation, defenses, ledger) stays in the driver and serves
the real gRPC protocol on an ephemeral port of the driver's node. A pool of `PartyRunner` actors,
each created with ``[simulation] client_resources``, hosts a round's cohort: every party is a
`secure_fl.parties.PartyBuilder` party (the same `FederatedClient` as in-process and in
``secure-fl-client``) talking gRPC to the driver, built when its round opens and released when
the next one does. Local training, encoding and every protocol phase run in the actor; a party's
round secrets never leave its actor.

This is the design of Flower's Ray simulation engine (a resource-sized actor pool that runs the
parties a round needs), with the wire protocol of a deployment in between: whatever runs over
``secure-fl-server`` runs here, secure modes included.

Failure: an actor that dies (killed, out of memory, its node lost) is a dropout of every party it
hosted in that round, with the reason in the round's metrics (``dropout_reasons``); the round
goes on without them and the actor is replaced for the next round. An exception raised by party
code is a bug or a configuration error, and ends the run as it does in-process.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.client.client import FederatedClient, HonestBoard
from secure_fl.errors import ConfigError, RunError
from secure_fl.parties import PartyBuilder, PartySource, party_id
from secure_fl.server.engine import BackgroundRun, FederatedServer, RunResult
from secure_fl.transport.inprocess import InProcessTransport

log = logging.getLogger(__name__)

#: Ray namespace of a run's actors (so a test or an operator can find a runner by name).
NAMESPACE = "secure-fl"
#: Seconds a runner's `PartyRunner.step` call works before it returns to the driver.
STEP_BUDGET = 0.2
#: Shortest time between two polls of one hosted party (one sweep over them): at most 50 a second,
#: half of ``transport.max_requests_per_second``'s default, so a runner never meets the rate limit.
SWEEP_SECONDS = 0.02


def import_ray() -> Any:
    """The ``ray`` module, or a `ConfigError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            f"simulation.backend = 'ray' needs Ray, which is not installed ({exc}): pip install 'secure-fl[ray]'",
            key="simulation.backend",
        ) from None
    return ray


def runner_name(run_id: str, slot: int, generation: int) -> str:
    """The Ray actor name of runner ``slot`` of run ``run_id`` (``generation`` counts replacements)."""
    return f"secure-fl-runner-{run_id}-{slot}-{generation}"


class PartyRunner:
    """Hosts some parties of one round in a Ray actor (this class is wrapped by ``ray.remote``).

    Parameters
    ----------
    source:
        The population (`PartySource`): every party this runner may be asked to host.
    board:
        Where white-box attackers read the honest updates (one runner hosts such a cohort whole).
    address:
        The driver's gRPC server.
    threads:
        Torch intra-op threads (the actor's ``num_cpus``). The GPU, if any, is the one Ray put in
        the actor's ``CUDA_VISIBLE_DEVICES``, which ``run.device = "auto"`` picks up.
    """

    def __init__(self, source: PartySource, board: HonestBoard, address: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.address = address
        self.builder = PartyBuilder(source, board=board)
        self.parties: list[FederatedClient] = []
        self.round = 0

    def ready(self) -> bool:
        """True once the actor is up (the driver waits on it before the first round)."""
        return True

    def host(self, round_number: int, parties: Sequence[tuple[int, bytes]]) -> int:
        """Build ``(index, serialized JoinReply)`` parties for ``round_number``; drop the previous round's."""
        from secure_fl.transport.grpc_client import GrpcTransport

        self.release()
        self.round = round_number
        for index, raw in parties:
            client = self.builder.client(index, GrpcTransport(self.address))
            client.adopt(pb.JoinReply.FromString(raw))
            client.round_only = round_number
            self.parties.append(client)
        # honest parties step first, attackers once the honest ones of the cohort uploaded
        self.parties.sort(key=lambda c: c.stages.attack is not None)
        return len(self.parties)

    def step(self, budget: float = STEP_BUDGET) -> dict[str, Any]:
        """Poll and act for every hosted party, for up to ``budget`` seconds without progress.

        Returns ``{"round", "trained", "answered", "finished"}``: the ids that trained or answered
        a phase in this call and whether every hosted party saw the run finish.
        """
        trained: list[str] = []
        answered: list[str] = []
        deadline = time.monotonic() + budget
        while True:
            progressed = False
            swept = time.monotonic()
            for client in self.parties:
                if client.finished:
                    continue
                if client.stages.attack is not None and not self._honest_done():
                    continue
                outcome = client.step()
                if outcome == "trained":
                    trained.append(client.client_id)
                elif outcome == "answered":
                    answered.append(client.client_id)
                progressed = progressed or outcome in ("trained", "answered")
            done = all(c.finished for c in self.parties)
            if progressed or done or time.monotonic() >= deadline:
                return {"round": self.round, "trained": trained, "answered": answered, "finished": done}
            time.sleep(max(0.01, SWEEP_SECONDS - (time.monotonic() - swept)))

    def _honest_done(self) -> bool:
        """Whether every hosted honest party trained this round (white-box attackers wait for them)."""
        return all(self.round in c.rounds_trained or c.finished for c in self.parties if c.stages.attack is None)

    def release(self) -> None:
        """Drop the hosted parties (their round is over): data, session secrets, channels."""
        for client in self.parties:
            client.transport.close()
        self.parties = []


class RunnerPool:
    """The driver's side of the actors: create, host a cohort, step, replace the dead."""

    def __init__(self, ray: Any, server: FederatedServer, source: PartySource, board: HonestBoard, address: str) -> None:
        self.ray = ray
        self.server = server
        sim = server.config.simulation
        self.resources = {k: float(v) for k, v in sim.client_resources.items()}
        self.size = self._pool_size(source)
        self.remote_cls = ray.remote(PartyRunner)
        self.source_ref = ray.put(source)
        self.board = board
        self.address = address
        self.generation = [0] * self.size
        self.runners = [self._start(slot) for slot in range(self.size)]
        ray.get([runner.ready.remote() for runner in self.runners])

    def _pool_size(self, source: PartySource) -> int:
        """Runners to start: one per cohort member, within the cluster's resources and ``max_runners``."""
        config = self.server.config
        cohort = min(config.run.clients_per_round, source.size) if config.run.sampling == "fixed" else source.size
        if source.attackers:  # white-box attackers read the honest updates of their own runner's board
            return 1
        total = self.ray.cluster_resources()
        fits = [math.floor(total.get("CPU" if key == "num_cpus" else "GPU", 0.0) / need + 1e-9)
                for key, need in self.resources.items() if need > 0]
        capacity = min(fits) if fits else cohort
        if capacity < 1:
            raise ConfigError(
                f"simulation.client_resources={dict(self.resources)} does not fit the Ray cluster "
                f"(CPU {total.get('CPU', 0):g}, GPU {total.get('GPU', 0):g}); ask for less",
                key="simulation.client_resources",
            )
        size = min(capacity, max(1, cohort))
        if config.simulation.max_runners:
            size = min(size, config.simulation.max_runners)
        return size

    def _start(self, slot: int) -> Any:
        threads = max(1, int(self.resources.get("num_cpus", 1)))
        options: dict[str, Any] = {
            "num_cpus": self.resources.get("num_cpus", 0.0), "num_gpus": self.resources.get("num_gpus", 0.0),
            "name": runner_name(self.server.run_id, slot, self.generation[slot]), "namespace": NAMESPACE,
            "max_restarts": 0, "max_task_retries": 0,
        }
        return self.remote_cls.options(**options).remote(self.source_ref, self.board, self.address, threads)

    def replace(self, slot: int) -> None:
        """Start a fresh runner in ``slot`` (its predecessor died)."""
        try:
            self.ray.kill(self.runners[slot])
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.generation[slot] += 1
        self.runners[slot] = self._start(slot)

    def shutdown(self) -> None:
        """Kill every runner."""
        for runner in self.runners:
            try:
                self.ray.kill(runner)
            except Exception:  # noqa: BLE001 - already gone
                pass


def run_on_ray(server: FederatedServer, source: PartySource, board: HonestBoard, *, progress: bool) -> RunResult:
    """Run the simulation's rounds with the parties' work on Ray (see the module docstring)."""
    from secure_fl.simulation import join_parties, party_index
    from secure_fl.transport.grpc_server import GrpcServer

    ray = import_ray()
    sim = server.config.simulation
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=sim.ray_address or None, include_dashboard=False, log_to_driver=True,
                 namespace=NAMESPACE, configure_logging=False)
    # actors on other nodes must reach the driver's port: loopback only on a one-node instance
    alive = [node for node in ray.nodes() if node.get("Alive")]
    host = "127.0.0.1" if not sim.ray_address and len(alive) <= 1 else ray.util.get_node_ip_address()
    transport_cfg = server.config.transport
    # every runner is one peer address holding many parties: only the overall stream cap applies
    grpc_server = GrpcServer.from_config(
        server.coordinator, f"{host}:0", transport_cfg, max_streams_per_peer=transport_cfg.max_streams
    ).start()
    pool: RunnerPool | None = None
    rounds: BackgroundRun | None = None
    coordinator = server.coordinator
    try:
        # every party joins once, from the driver (built, joined, dropped), then is vouched for
        replies = join_parties(PartyBuilder(source, board=board), InProcessTransport(coordinator), progress=progress)
        coordinator.vouch([party_id(index) for index in range(source.size)])
        pool = RunnerPool(ray, server, source, board, grpc_server.address)
        rounds = BackgroundRun(server, name="secure-fl-server")
        _drive(ray, pool, coordinator, rounds, replies, party_index)
    except BaseException as exc:
        coordinator.finish("interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else f"simulation aborted: {exc}")
        if rounds is not None:
            rounds.join(timeout=30)
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        grpc_server.stop(grace=0.5)
        if started_ray:
            ray.shutdown()
    rounds.join()
    return rounds.result()


def _drive(ray: Any, pool: RunnerPool, coordinator: Any, rounds: BackgroundRun, replies: dict[int, Any], index_of: Any) -> None:
    """Host each round's cohort on the pool and keep every runner stepping until the run ends."""
    hosted_round: int | None = None
    hosted: dict[int, list[str]] = {}  # runner slot -> the party ids it hosts this round
    pending: dict[Any, int] = {}  # in-flight step call -> runner slot
    finished: set[int] = set()  # slots whose parties all saw the run end
    while rounds.is_alive():
        opened = coordinator.open_cohort()
        if opened is not None and opened[0] != hosted_round:
            if pending:  # the last round's step calls return within their budget
                ray.wait(list(pending), num_returns=len(pending), timeout=30)
                for ref, slot in list(pending.items()):
                    _collect(ray, pool, coordinator, hosted_round, hosted, ref, slot)
                pending.clear()
            hosted_round = opened[0]
            finished.clear()
            hosted = _host(ray, pool, coordinator, hosted_round, opened[1], replies, index_of)
        for slot in hosted:
            if slot not in pending.values() and slot not in finished:
                pending[pool.runners[slot].step.remote()] = slot
        if not pending:
            time.sleep(0.05)
            continue
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        for ref in ready:
            slot = pending.pop(ref)
            outcome = _collect(ray, pool, coordinator, hosted_round, hosted, ref, slot)
            if outcome is None:
                hosted.pop(slot, None)
            elif outcome["finished"]:
                finished.add(slot)
    for ref, slot in pending.items():  # the run is over: let the last calls end
        try:
            ray.get(ref, timeout=30)
        except Exception:  # noqa: BLE001 - a runner dying after the run changes nothing
            pass


def _host(ray: Any, pool: RunnerPool, coordinator: Any, number: int, cohort: Sequence[str],
          replies: dict[int, Any], index_of: Any) -> dict[int, list[str]]:
    """Spread ``cohort`` over the runners (by index, round robin); a runner that cannot host drops its parties."""
    members = sorted(i for i in map(index_of, cohort) if i is not None and i in replies)
    plan: dict[int, list[int]] = {}
    for position, index in enumerate(members):
        plan.setdefault(position % pool.size, []).append(index)
    calls = {slot: pool.runners[slot].host.remote(number, [(i, replies[i].SerializeToString()) for i in indices])
             for slot, indices in plan.items()}
    hosted: dict[int, list[str]] = {}
    for slot, call in calls.items():
        ids = [party_id(i) for i in plan[slot]]
        try:
            ray.get(call)
            hosted[slot] = ids
        except ray.exceptions.RayActorError as exc:
            _dropped(coordinator, number, ids, exc)
            pool.replace(slot)
        except ray.exceptions.RayTaskError as exc:
            raise RunError(f"Ray runner {slot} could not build parties {ids}: {exc}") from exc
    return hosted


def _collect(ray: Any, pool: RunnerPool, coordinator: Any, number: int | None, hosted: dict[int, list[str]],
             ref: Any, slot: int) -> dict[str, Any] | None:
    """Read one finished step call; a dead runner's parties become dropouts (``None``: the runner is gone)."""
    try:
        return dict(ray.get(ref))
    except ray.exceptions.RayActorError as exc:
        if number is not None:
            _dropped(coordinator, number, hosted.get(slot, []), exc)
        pool.replace(slot)
        return None
    except ray.exceptions.RayTaskError as exc:
        cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
        raise cause from None


def _dropped(coordinator: Any, number: int, ids: Sequence[str], exc: BaseException) -> None:
    """Tell the coordinator that ``ids`` died in round ``number`` (their Ray actor did)."""
    reason = f"its Ray actor died ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else 'no message'})"
    for client in ids:
        if coordinator.drop(client, number, reason):
            log.warning("round %d: party %s %s", number, client, reason)
