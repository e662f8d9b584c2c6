"""``simulation.backend = "ray"`` on a local Ray instance: same results as in-process, dropouts on actor death.

The parties run in real Ray actors and talk real gRPC to the driver's server; the only fault
injected is `ray.kill` of one party runner in the middle of a SecAgg+ round.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from secure_fl.errors import ConfigError
from secure_fl.ray_backend import NAMESPACE
from secure_fl.server.results import SilentObserver
from secure_fl.simulation import simulate
from tests.conftest import smoke_config

ray = pytest.importorskip("ray")

#: Four runners of half a CPU each on the two-CPU instance: one party per runner in the smoke cohort.
RAY = ("simulation.backend='ray'", "simulation.client_resources.num_cpus=0.5")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    ray.init(num_cpus=2, include_dashboard=False, namespace=NAMESPACE)
    yield ray
    ray.shutdown()


def test_smoke_preset_gives_bit_identical_results_to_in_process(local_ray: Any, tmp_path: Path) -> None:
    on_ray = simulate(smoke_config(*RAY), tmp_path / "ray", progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each runner trains with its num_cpus (1 thread): the same kernels
    try:
        in_process = simulate(smoke_config(), tmp_path / "in-process", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert set(on_ray.global_state) == set(in_process.global_state)
    for name, value in in_process.global_state.items():
        np.testing.assert_array_equal(on_ray.global_state[name], value, err_msg=name)
    keys = ("round", "status", "clients", "accuracy", "loss", "train_loss", "selected")
    assert [{k: r[k] for k in keys} for r in on_ray.metrics] == [{k: r[k] for k in keys} for r in in_process.metrics]
    for ours, theirs in zip(on_ray.metrics, in_process.metrics):  # the same messages, over gRPC
        assert (ours["bytes_up"], ours["bytes_down"]) == (theirs["bytes_up"], theirs["bytes_down"])


class KillOneRunner(SilentObserver):
    """In round 2, once the first masked input arrives, kill the runner of another party."""

    def __init__(self) -> None:
        self.killed: str | None = None
        self.lock = threading.Lock()

    def on_update(self, client_id: str, round_number: int) -> None:
        with self.lock:
            if round_number != 2 or self.killed is not None:
                return
            # the cohort is every party, sorted by index and dealt round robin: party i on runner slot i
            victim = next(i for i in range(4) if f"client-{i}" != client_id)
            name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                        if a["name"].endswith(f"-{victim}-0") and a["name"].startswith("secure-fl-runner-"))
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            self.killed = f"client-{victim}"

    def on_round_start(self, round_number: int, cohort: Sequence[str]) -> None:
        return None


def test_secagg_plus_round_completes_when_a_party_runner_is_killed(local_ray: Any, tmp_path: Path) -> None:
    observer = KillOneRunner()
    config = smoke_config(*RAY, "secure.mode='secagg+'", "run.rounds=3", "run.min_updates=3")
    result = simulate(config, tmp_path / "run", progress=False, observer=observer)
    assert observer.killed is not None
    statuses = [(r["round"], r["status"]) for r in result.metrics]
    assert statuses == [(1, "ok"), (2, "ok"), (3, "ok")], result.metrics
    second = result.metrics[1]
    assert observer.killed in second["dropout_reasons"], second
    assert "Ray actor died" in second["dropout_reasons"][observer.killed]
    # the runner was replaced: every party is back in round 3
    assert result.metrics[2]["clients"] == 4 and "dropout_reasons" not in result.metrics[2]


def test_resources_that_do_not_fit_are_refused_naming_the_key(local_ray: Any, tmp_path: Path) -> None:
    config = smoke_config("simulation.backend='ray'", "simulation.client_resources.num_gpus=1")
    with pytest.raises(ConfigError, match=r"simulation.client_resources=.*does not fit the Ray cluster"):
        simulate(config, tmp_path / "run", progress=False)


def test_flora_with_mixed_ranks_merges_the_same_base_in_every_runner(local_ray: Any, tmp_path: Path) -> None:
    flora = ("peft.rule='flora'", "peft.r=16", "peft.alpha=32.0")  # stacked rank 2 + 4 + 6 + 4
    on_ray = simulate(smoke_config(*RAY, *flora), tmp_path / "ray", progress=False, client_ranks=[2, 4, 6, 4])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        in_process = simulate(smoke_config(*flora), tmp_path / "in-process", progress=False, client_ranks=[2, 4, 6, 4])
    finally:
        torch.set_num_threads(threads)
    for name, value in in_process.global_state.items():  # round 2 trained on the base with release 1 merged
        np.testing.assert_array_equal(on_ray.global_state[name], value, err_msg=name)
