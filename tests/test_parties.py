"""Virtual parties: built when selected, released after their round, memory bounded by the cohort."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from secure_fl.errors import ConfigError
from secure_fl.parties import PartyBuilder
from secure_fl.simulation import simulate
from tests.conftest import smoke_config

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_cohort_is_built_each_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[int] = []
    original = PartyBuilder.client

    def counting(self: PartyBuilder, index: int, transport: object) -> object:
        built.append(index)
        return original(self, index, transport)  # type: ignore[arg-type]

    monkeypatch.setattr(PartyBuilder, "client", counting)
    config = smoke_config("run.num_clients=40", "run.clients_per_round=5", "run.min_updates=5",
                          "data.synthetic_examples=800", "run.rounds=2")
    result = simulate(config, tmp_path / "run", progress=False)
    assert sorted(built[:40]) == list(range(40))  # every party joins once
    rounds = built[40:]
    assert len(rounds) == 10  # then only the 5 selected a round
    for record, start in zip(result.metrics, (0, 5)):
        assert sorted(f"client-{i}" for i in rounds[start:start + 5]) == sorted(record["selected"])
        assert record["clients"] == 5


def test_silent_virtual_parties_stay_selectable(tmp_path: Path) -> None:
    # a liveness timeout far below a round: without `Coordinator.vouch` the unselected parties
    # would be "unresponsive" by round 2 and cohorts would shrink
    config = smoke_config("run.num_clients=12", "run.clients_per_round=4", "transport.liveness_timeout=0.05",
                          "run.rounds=3")
    result = simulate(config, tmp_path / "run", progress=False)
    assert [r["cohort"] for r in result.metrics] == [4, 4, 4]
    assert all(not r["unresponsive"] for r in result.metrics)


def test_ray_backend_without_ray_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'secure-fl\[ray\]'") as info:
        simulate(smoke_config("simulation.backend='ray'"), tmp_path / "run", progress=False)
    assert info.value.key == "simulation.backend"


def _scale(parties: int) -> dict[str, float]:
    """One `benchmarks/simulation_scale.py` child run (its own process, so its peak RSS is its own)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "simulation_scale.py"), "--child", str(parties),
         "--cohort", "10", "--rounds", "2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_thousand_parties_fit_in_the_memory_of_ten() -> None:
    small, large = _scale(10), _scale(1000)
    assert large["clients_per_round"] == [10, 10] and large["rounds"] == 2
    # measured: about 500 MB for both; 1.5x is the bound at 10,000 parties
    assert large["peak_rss_mb"] <= 1.2 * small["peak_rss_mb"], (small, large)
    assert large["peak_rss_mb"] - small["peak_rss_mb"] < 100, (small, large)
