"""Plug-in settings from the config, stage fingerprints at Join, and plug-in state through checkpoints."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

import privacy.mechanisms.registry as mechanism_registry
import robustness.defenses.registry as defense_registry
import secure_fl
from privacy.accounting import GaussianEvent
from privacy.mechanisms import PrivacyMechanism
from protocols.errors import Refused
from protocols.wire import serde
from protocols.wire.limits import PROTOCOL_VERSION
from protocols.wire.v1 import federation_pb2 as pb
from robustness.defenses import Defense, DefenseResult
from secure_fl.client.client import ClientStages, FederatedClient
from secure_fl.config import Config, load_preset, plugin_settings
from secure_fl.errors import ConfigError
from secure_fl.server.coordinator import Coordinator
from secure_fl.server.engine import FederatedServer
from secure_fl.server.rundir import RunDirectory
from secure_fl.stages import Stages
from tests.conftest import smoke_config


class ScaledClip(PrivacyMechanism):
    """Clip each update to ``clip_norm`` (no noise: a test mechanism with a setting).

    Parameters
    ----------
    clip_norm:
        Largest L2 norm of an update.
    """

    name = "scaled-clip"

    def __init__(self, *, clip_norm: float = 1.0) -> None:
        if not clip_norm > 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        self.clip_norm = clip_norm

    def client_transform(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(update)

    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: int) -> dict[str, np.ndarray]:
        return dict(delta)

    def privacy_event(self, *, cohort_size: int, population: int, contributions: int) -> GaussianEvent:
        return GaussianEvent(noise_multiplier=0.0, sample_rate=1.0)


class RunningMean(Defense):
    """Keep everything; remember the running mean row and how many rounds ran (array + scalar state).

    Parameters
    ----------
    decay:
        Weight of the past in the running mean.
    """

    name = "running-mean"
    instances: list[RunningMean] = []

    def __init__(self, *, decay: float = 0.5, label: str = "x") -> None:
        self.decay, self.label = decay, label
        self.mean: np.ndarray | None = None
        self.rounds = 0
        RunningMean.instances.append(self)

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        row = updates.mean(axis=0)
        self.mean = row if self.mean is None else self.decay * self.mean + (1 - self.decay) * row
        self.rounds += 1
        return DefenseResult(updates, weights, info={"defense_rounds": float(self.rounds)})

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "rounds": self.rounds, "history": {"label": self.label}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.mean, self.rounds = state["mean"], int(state["rounds"])


@pytest.fixture(autouse=True)
def _plugins() -> Iterator[None]:
    mechanism_registry.register_privacy_mechanism("scaled-clip", ScaledClip, force=True)
    defense_registry.register_defense("running-mean", RunningMean, force=True)
    RunningMean.instances.clear()
    try:
        yield
    finally:
        mechanism_registry._MECHANISMS._entries.pop("scaled-clip", None)
        defense_registry._DEFENSES._entries.pop("running-mean", None)


# ------------------------------------------------------------------------------ settings in the config


def test_settings_are_typed_validated_and_reach_the_plugin() -> None:
    cfg = load_preset("smoke").with_overrides(["robustness.defense=running-mean", "robustness.params.decay=1"])
    assert cfg.robustness.params == {"decay": 1.0} and isinstance(cfg.robustness.params["decay"], float)
    stages = Stages.from_config(cfg)
    assert isinstance(stages.defense, RunningMean) and stages.defense.decay == 1.0
    assert stages.settings["defense"] == {"decay": 1.0, "label": "x"}
    assert plugin_settings(RunningMean)["decay"].help == "Weight of the past in the running mean."


def test_unknown_setting_is_refused_with_did_you_mean_and_the_list() -> None:
    with pytest.raises(ConfigError) as info:
        load_preset("smoke").with_overrides(["robustness.defense=running-mean", "robustness.params.decy=0.3"])
    assert info.value.key == "robustness.params.decy"
    assert "did you mean 'decay'" in str(info.value) and "takes: decay, label" in str(info.value)
    with pytest.raises(ConfigError, match="takes no settings"):
        load_preset("smoke").with_overrides(["robustness.params.factor=3"])  # defense 'none'


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_preset("smoke").with_overrides(["privacy.mode=scaled-clip", "privacy.params.clip_norm='big'"])
    assert info.value.key == "privacy.params.clip_norm" and "must be a number" in str(info.value)


def test_plugin_refusal_becomes_a_config_error_naming_the_key() -> None:
    cfg = load_preset("smoke").with_overrides(["privacy.mode=scaled-clip", "privacy.params.clip_norm=-1"])
    with pytest.raises(ConfigError) as info:
        Stages.from_config(cfg)
    assert info.value.key == "privacy.params.clip_norm" and "clip_norm must be > 0" in str(info.value)


def test_params_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = load_preset("smoke").with_overrides(["privacy.mode=scaled-clip", "privacy.params.clip_norm=0.25"])
    text = cfg.to_toml()
    assert "[privacy.params]\nclip_norm = 0.25" in text
    path = tmp_path / "config.toml"
    path.write_text(text)
    again = Config.from_toml(path)
    assert again == cfg and hash(again) == hash(cfg) and again.to_toml() == text


def test_a_non_default_setting_shows_in_run_json_and_the_report(tmp_path: Path) -> None:
    cfg = smoke_config("run.rounds=1", "privacy.mode=scaled-clip", "privacy.params.clip_norm=0.25",
                       "robustness.defense=running-mean", "robustness.params.decay=0.9")
    result = secure_fl.simulate(cfg, tmp_path, progress=False)
    run_stages = json.loads((tmp_path / "run.json").read_text())["stages"]
    assert run_stages["privacy"]["params"]["clip_norm"] == 0.25
    assert run_stages["defense"]["params"] == {"decay": 0.9, "label": "x"}  # settings, never the state
    report = result.report
    assert report is not None and report["stages"]["defense"]["params"]["decay"] == 0.9
    assert report["mechanism"]["clip_norm"] == 0.25


# ------------------------------------------------------------------------------ fingerprints at Join


def test_fingerprint_covers_name_and_settings() -> None:
    base = load_preset("smoke").with_overrides(["privacy.mode=scaled-clip"])
    same = Stages.from_config(base.with_overrides(["privacy.params.clip_norm=1"])).fingerprint()  # = the default
    assert Stages.from_config(base).fingerprint() == same
    other = Stages.from_config(base.with_overrides(["privacy.params.clip_norm=2"])).fingerprint()
    assert other["privacy"] != same["privacy"] and other["secure"] == same["secure"] and other["rule"] == same["rule"]
    server_only = Stages.from_config(base.with_overrides(["robustness.defense=running-mean"])).fingerprint()
    assert server_only == same  # the defense is the server's business


def _join(coordinator: Coordinator, info: Mapping[str, str], client_id: str = "c1") -> pb.JoinReply:
    return coordinator.join(pb.JoinRequest(
        envelope=serde.envelope("", 0, client_id), protocol_version=PROTOCOL_VERSION, model_fingerprint="f",
        num_examples=5, info=dict(info),
    ))


def _coordinator(config: Config) -> Coordinator:
    return Coordinator(
        run_id="r", model_fingerprint="f", payload_spec={}, stages={"secure": "plain", "privacy": "scaled-clip"},
        max_update_bytes=1 << 20, chunk_size=1 << 16, poll_interval=0.1,
        stage_fingerprints=Stages.from_config(config).fingerprint(),
    )


def test_join_refuses_other_stage_settings() -> None:
    server = load_preset("smoke").with_overrides(["privacy.mode=scaled-clip", "privacy.params.clip_norm=1.0"])
    client = server.with_overrides(["privacy.params.clip_norm=2.0"])
    coordinator = _coordinator(server)
    with pytest.raises(Refused) as info:
        _join(coordinator, ClientStages.from_config(client).join_info())
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert str(info.value) == (
        "client 'c1' runs privacy with other settings than the server: use the same [privacy] and [privacy.params] on both sides"
    )
    rule = server.with_overrides(["peft.rule_params={}"])  # same rule: accepted; no stage keys at all: refused
    assert _join(coordinator, ClientStages.from_config(rule).join_info()).envelope.run_id == "r"
    with pytest.raises(Refused, match="sent no fingerprint of its secure settings"):
        _join(coordinator, {}, client_id="c2")


def test_a_client_with_other_settings_is_refused_over_grpc(grpc_server) -> None:
    from secure_fl.client.trainer import LocalTrainer
    from secure_fl.data.sources import client_dataset
    from secure_fl.errors import TransportError
    from secure_fl.transport.grpc_client import GrpcTransport

    server_config = smoke_config("privacy.mode=scaled-clip", "privacy.params.clip_norm=1.0", "run.join_timeout=30")
    running = grpc_server(server_config)
    client_config = server_config.with_overrides(["privacy.params.clip_norm=0.5"])
    trainer = LocalTrainer.from_config(client_config, client_dataset(client_config, 0))
    client = FederatedClient("client-0", GrpcTransport(running.address), trainer, ClientStages.from_config(client_config))
    with pytest.raises(TransportError) as info:
        client.join()
    assert info.value.code == "FAILED_PRECONDITION" and "runs privacy with other settings" in info.value.details
    good = FederatedClient("client-1", GrpcTransport(running.address), trainer, ClientStages.from_config(server_config))
    assert good.join().envelope.run_id == running.server.run_id
    # end the server's rounds inside this test: a thread left waiting would touch torch's global RNG later
    running.server.coordinator.finish("test over")
    running.rounds.join(60)
    assert not running.rounds.is_alive()


# ------------------------------------------------------------------------------ state through a checkpoint


def test_state_and_cohort_rng_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    cfg = smoke_config("run.rounds=4", "run.num_clients=6", "run.clients_per_round=3", "run.keep_checkpoints=4",
                       "robustness.defense=running-mean", "robustness.params.decay=0.25")
    result = secure_fl.simulate(cfg, tmp_path / "run", progress=False)
    live = next(d for d in RunningMean.instances if d.rounds == 4)  # the server's defense (clients' never run)
    rundir = RunDirectory(result.run_dir)
    last = rundir.load_checkpoint()
    assert last is not None and last.round == 4
    assert last.plugin_state["defense"]["rounds"] == 4
    np.testing.assert_array_equal(last.plugin_state["defense"]["mean"], live.mean)
    assert rundir.latest_checkpoint() is not None and set(rundir.latest_checkpoint()[1]) == set(result.global_state)

    second = rundir.load_checkpoint(2)
    assert second is not None
    fresh = FederatedServer(cfg, tmp_path / "fresh", run_id="fresh")
    fresh.restore_from_checkpoint(second)
    restored = fresh.stages.defense
    assert isinstance(restored, RunningMean) and restored.rounds == 2 and restored.decay == 0.25
    state = fresh.stages.state_dict()
    assert set(state) == {"secure", "defense", "rule", "privacy"} and state["secure"] == state["rule"] == state["privacy"] == {}
    assert state["defense"]["rounds"] == second.plugin_state["defense"]["rounds"]
    np.testing.assert_array_equal(state["defense"]["mean"], second.plugin_state["defense"]["mean"])
    for key, value in second.state.items():
        np.testing.assert_array_equal(fresh.global_state[key], value)
    # the restored generator draws the cohorts the original drew in rounds 3 and 4
    clients = sorted(f"client-{i}" for i in range(6))
    for record in result.metrics[2:]:
        drawn = sorted(str(c) for c in fresh.rng.choice(clients, size=3, replace=False))
        assert drawn == record["selected"], record["round"]


def test_stateless_plugins_refuse_foreign_state() -> None:
    stages = Stages.from_config(load_preset("smoke"))
    stages.load_state_dict({"defense": {}, "rule": {}, "secure": {}, "privacy": {}})
    with pytest.raises(ValueError, match="keeps no state"):
        stages.load_state_dict({"defense": {"mean": 1}})
    with pytest.raises(ValueError, match="keeps no state"):
        stages.load_state_dict({"privacy": {"clip_norm": 1.0}})
    with pytest.raises(ValueError, match="no stateful stage"):
        stages.load_state_dict({"attack": {}})
