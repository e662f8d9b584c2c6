"""Round-engine behaviour: cohort sampling, failed rounds, determinism."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from secure_fl.simulation import simulate
from secure_fl.transport.grpc_client import GrpcTransport
from tests.conftest import smoke_config
from tests.test_grpc_round import _pull_until_train, make_client


def test_partial_cohorts_are_sampled_each_round(tmp_path: Path) -> None:
    result = simulate(smoke_config("run.clients_per_round=2", "run.rounds=4"), tmp_path, progress=False)
    assert [(r["clients"], r["cohort"]) for r in result.metrics] == [(2, 2)] * 4
    assert all(r["bytes_up"] > 0 for r in result.metrics)


def test_simulation_is_deterministic(tmp_path: Path) -> None:
    first = simulate(smoke_config(), tmp_path / "a", progress=False)
    second = simulate(smoke_config(), tmp_path / "b", progress=False)
    assert [r["accuracy"] for r in first.metrics] == [r["accuracy"] for r in second.metrics]
    for key, value in first.global_state.items():
        np.testing.assert_array_equal(value, second.global_state[key])


def test_round_below_min_updates_fails_and_keeps_the_model(grpc_server) -> None:
    config = smoke_config(
        "run.num_clients=2", "run.clients_per_round=2", "run.min_updates=2", "run.rounds=1", "run.round_timeout=10.0"
    )
    running = grpc_server(config)
    ghost = make_client(config, 1, GrpcTransport(running.address))
    ghost.join()
    honest = make_client(config, 0, GrpcTransport(running.address))
    worker = threading.Thread(target=honest.run, kwargs={"connect_timeout": 30})
    worker.start()
    _pull_until_train(ghost)  # takes the task and never answers
    before = dict(running.server.global_state)
    started = time.monotonic()
    result = running.result()
    worker.join(30)
    record = result.metrics[0]
    assert record["status"] == "failed" and record["clients"] == 1 and record["dropped"] == ["client-1"]
    assert "min_updates=2" in record["reason"]
    assert time.monotonic() - started < 30  # closed at the deadline, not later
    for key, value in before.items():
        np.testing.assert_array_equal(result.global_state[key], value)  # nothing was applied
    assert not list((result.run_dir / "checkpoints").glob("*.safetensors"))
