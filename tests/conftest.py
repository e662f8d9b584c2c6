"""Shared fixtures: small configs and a real gRPC server on 127.0.0.1 running the round engine."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from secure_fl.config import Config, load_preset
from secure_fl.server.engine import BackgroundRun, FederatedServer, RunResult
from secure_fl.transport.grpc_server import GrpcServer

warnings.filterwarnings("ignore", category=FutureWarning)


def smoke_config(*overrides: str) -> Config:
    """The smoke preset with test-friendly overrides applied."""
    return load_preset("smoke").with_overrides(overrides)


@dataclass
class RunningServer:
    """A FederatedServer whose rounds run in a thread, reachable over real gRPC."""

    server: FederatedServer
    grpc: GrpcServer
    rounds: BackgroundRun

    @property
    def address(self) -> str:
        return self.grpc.address

    def result(self, timeout: float = 120.0) -> RunResult:
        self.rounds.join(timeout)
        assert not self.rounds.is_alive(), "server did not finish in time"
        return self.rounds.result()


@pytest.fixture
def grpc_server(tmp_path: Path) -> Iterator[Any]:
    """Factory: start a server for a config on 127.0.0.1 (random port); stopped after the test."""
    started: list[RunningServer] = []

    def start(config: Config) -> RunningServer:
        server = FederatedServer(config, tmp_path / f"run{len(started)}")
        grpc = GrpcServer.from_config(server.coordinator, "127.0.0.1:0", config.transport).start()
        running = RunningServer(server, grpc, BackgroundRun(server))
        started.append(running)
        return running

    yield start
    for running in started:
        running.server.coordinator.finish("test over")
        running.grpc.stop(grace=0)
