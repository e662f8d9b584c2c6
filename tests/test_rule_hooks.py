"""Rules that shape the model and the message: each hook runs on the server and on the clients.

Every test fails if its hook were ignored: a frozen A that is not drawn or not frozen, a client
message that is a delta, a merge that one side skips, per-client ranks that are not accepted,
sliced or padded.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import secure_fl.peft_agg.registry as rule_registry
from protocols.wire import serde
from protocols.wire.serde import TensorSpec
from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.client.client import ClientStages, FederatedClient
from secure_fl.client.trainer import LocalTrainer
from secure_fl.config import Config
from secure_fl.data.sources import client_dataset
from secure_fl.errors import RunError, TransportError
from secure_fl.models import load_trainable_state, trainable_state
from secure_fl.peft_agg import register_rule
from secure_fl.peft_agg.fedit import FedIT
from secure_fl.peft_agg.hooks import fold_lora_into_base, leading_block, lora_layers, sync_base, zero_pad
from secure_fl.server.engine import BackgroundRun, FederatedServer, RunResult
from secure_fl.simulation import simulate
from secure_fl.tensors import Layout
from secure_fl.transport.inprocess import InProcessTransport
from secure_fl.workload import TextClassification
from tests.conftest import smoke_config


@pytest.fixture(autouse=True)
def _restore_rules() -> Iterator[None]:
    saved = dict(rule_registry._RULES._entries)
    yield
    rule_registry._RULES._entries.clear()
    rule_registry._RULES._entries.update(saved)


# ------------------------------------------------------------------------------ test rules


def drawn_a(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The frozen A every party must hold: drawn from the seed and the tensor's name only."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)))
    return torch.randn(shape, generator=generator) / shape[-1] ** 0.5


class FreezeA(FedIT):
    name = "test-freeze-a"

    def prepare_model(self, model: Any, *, seed: int) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.copy_(drawn_a(name, tuple(param.shape), seed))

    def trained_keys(self, trainable: Sequence[str]) -> list[str]:
        return [n for n in trainable if "lora_A" not in n]


class SendLocal(FedIT):
    """Clients send their trained adapter itself; the server's new adapter is the weighted mean."""

    name = "test-send-local"

    def client_message(self, local: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], keys: Sequence[str]) -> dict[str, np.ndarray]:
        return {k: np.array(local[k], dtype=np.float32) for k in keys}

    def apply(self, global_state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.array(delta.get(k, v), dtype=np.float32) for k, v in global_state.items()}


class MergeEachRound(FedIT):
    """FLoRA-style: fold each released adapter into the base, restart with B = 0."""

    name = "test-merge"
    merges_into_base = True

    def merge_into_base(self, model: Any, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        load_trainable_state(model, state)
        fold_lora_into_base(model)
        return {k: np.zeros_like(v) if "lora_B" in k else np.array(v) for k, v in state.items()}


class ZeroPadRanks(FedIT):
    """Heterogeneous ranks: clients declare their rank, train the leading block, the server zero-pads."""

    name = "test-zero-pad"
    accepts_client_shapes = True
    needs_individual_updates = True

    def join_info(self, model: Any) -> dict[str, str]:
        return {"lora_rank": str(model.peft_config["default"].r)}

    def client_spec(self, info: Mapping[str, str], specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        rank = int(info["lora_rank"])
        out = {}
        for name, spec in specs.items():
            shape = spec.shape
            if "lora_A" in name or "lora_B" in name:
                axis = 0 if "lora_A" in name else 1
                if not 1 <= rank <= shape[axis]:
                    raise ValueError(f"lora_rank {rank} is not within 1..{shape[axis]}")
                shape = tuple(rank if i == axis else s for i, s in enumerate(shape))
            out[name] = TensorSpec(name, spec.dtype, shape)
        return out

    def to_client(self, global_state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        return leading_block(global_state, shapes)

    def align(self, update: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
        return zero_pad(update, layout)


# ------------------------------------------------------------------------------ harness


class Recording(InProcessTransport):
    """The in-process transport, keeping every decoded upload by round."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.uploads: dict[int, tuple[float, dict[str, np.ndarray]]] = {}

    def push_update(self, messages: Iterable[pb.UpdateChunk]) -> pb.PushReply:
        messages = list(messages)
        header, payload = serde.read_update_stream(messages, max_bytes=1 << 30)
        reply = super().push_update(messages)
        self.uploads[header.envelope.round] = (header.weight, serde.unpack_tensors(header.manifest, payload))
        return reply


def run_parties(server_config: Config, client_configs: Sequence[Config], out: Path) -> tuple[FederatedServer, list[FederatedClient], RunResult]:
    """One server and clients that each build their own model (their own config), in process."""
    server = FederatedServer(server_config, out, transport="in-process")
    clients = []
    for index, config in enumerate(client_configs):
        trainer = LocalTrainer.from_config(config, client_dataset(config, index))
        client = FederatedClient(
            f"client-{index}", Recording(server.coordinator), trainer, ClientStages.from_config(config), seed=config.run.seed
        )
        client.join()
        clients.append(client)
    rounds = BackgroundRun(server)
    while rounds.is_alive() and not all(c.finished for c in clients):
        if not any([c.step() == "trained" for c in clients if not c.finished]):
            time.sleep(0.01)
    rounds.join(60)
    return server, clients, rounds.result()


def two_clients(rule: str, *extra: str) -> Config:
    return smoke_config(f"peft.rule={rule}", "run.num_clients=2", "run.clients_per_round=2", *extra)


def params(model: torch.nn.Module, part: str) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters() if part in n}


# ------------------------------------------------------------------------------ tests


def test_frozen_a_is_drawn_from_the_seed_never_trained_never_sent(tmp_path: Path) -> None:
    register_rule("test-freeze-a", FreezeA)
    config = two_clients("test-freeze-a")
    server, clients, result = run_parties(config, [config, config], tmp_path)
    assert [r["clients"] for r in result.metrics] == [2, 2]
    spec = server.pipeline.payload_spec()
    assert not [k for k in spec if "lora_A" in k]
    assert [k for k in spec if "lora_B" in k] and [k for k in spec if "classifier" in k]
    for _, (_, upload) in clients[0].transport.uploads.items():  # type: ignore[attr-defined]
        assert set(upload) == set(spec)
    assert set(result.global_state) == set(spec)
    default_a = params(TextClassification(config.model, config.peft, ("a", "b", "c", "d")).build(seed=0).model, "lora_A")
    server_a = params(server.adapted.model, "lora_A")
    assert len(server_a) == 4
    for name, value in server_a.items():
        np.testing.assert_array_equal(value, drawn_a(name, value.shape, config.run.seed).numpy())  # prepare_model ran
        assert not np.array_equal(value, default_a[name])
        for client in clients:  # ... on every party, and training never moved it
            np.testing.assert_array_equal(params(client.trainer.adapted.model, "lora_A")[name], value)
    assert any(np.abs(v).sum() > 0 for k, v in result.global_state.items() if "lora_B" in k)  # B trained


def test_client_message_and_apply_define_what_travels(tmp_path: Path) -> None:
    register_rule("test-send-local", SendLocal)
    fedit = simulate(smoke_config(), tmp_path / "fedit", progress=False)
    local = simulate(smoke_config("peft.rule=test-send-local"), tmp_path / "local", progress=False)
    # mean of the local adapters == global + mean of the deltas, up to float32 rounding
    for key, value in fedit.global_state.items():
        np.testing.assert_allclose(local.global_state[key], value, atol=2e-5)
    # what went up was the adapter itself, not a delta: the head's upload is not near zero
    config = two_clients("test-send-local", "run.rounds=1")
    server, clients, _ = run_parties(config, [config, config], tmp_path / "parties")
    _, upload = clients[0].transport.uploads[1]  # type: ignore[attr-defined]
    trained = trainable_state(clients[0].trainer.adapted.model)
    for key, value in upload.items():
        np.testing.assert_array_equal(value, trained[key])


def test_merge_into_base_keeps_every_base_equal(tmp_path: Path) -> None:
    register_rule("test-merge", MergeEachRound)
    config = two_clients("test-merge")
    server, clients, result = run_parties(config, [config, config], tmp_path)
    assert [r["clients"] for r in result.metrics] == [2, 2]
    fresh = TextClassification(config.model, config.peft, ("a", "b", "c", "d")).build(seed=0).model
    released = load_file(str(tmp_path / "checkpoints" / "round-0001.safetensors"))
    assert server.adapted.merges_done == 1 and all(c.trainer.adapted.merges_done == 1 for c in clients)
    server_layers = dict(lora_layers(server.adapted.model))
    for name, module in lora_layers(fresh):
        base = server_layers[name].base_layer.weight.detach().numpy()
        prefix = name + "."
        b = released[prefix + "lora_B.default.weight"]
        a = released[prefix + "lora_A.default.weight"]
        scaling = module.scaling["default"]
        np.testing.assert_allclose(base, module.base_layer.weight.detach().numpy() + scaling * b @ a, atol=1e-5)
        assert np.abs(b).sum() > 0  # the merge moved the base
        for client in clients:
            np.testing.assert_array_equal(dict(lora_layers(client.trainer.adapted.model))[name].base_layer.weight.detach().numpy(), base)
    # round 2's uploads were deltas from the restart state (B = 0), and the server applied them to it
    _, upload = clients[0].transport.uploads[2]  # type: ignore[attr-defined]
    trained = trainable_state(clients[0].trainer.adapted.model)
    key = next(k for k in upload if "lora_B" in k)
    np.testing.assert_allclose(upload[key], trained[key], atol=1e-7)
    (w0, u0), (w1, u1) = (c.transport.uploads[2] for c in clients)  # type: ignore[attr-defined]
    for key, value in result.global_state.items():
        restart = np.zeros_like(released[key]) if "lora_B" in key else released[key]
        np.testing.assert_allclose(value, restart + (w0 * u0[key].astype(np.float64) + w1 * u1[key]) / (w0 + w1), atol=1e-6)
    # simulated clients share one model: it is merged once per release, and the run is the same
    simulated = simulate(config, tmp_path / "simulated", progress=False)
    for key, value in result.global_state.items():
        np.testing.assert_array_equal(simulated.global_state[key], value)


def test_a_party_that_missed_a_release_stops(tmp_path: Path) -> None:
    config = two_clients("fedit")
    adapted = TextClassification(config.model, config.peft, ("a", "b", "c", "d")).build(seed=0)
    state = trainable_state(adapted.model)
    assert sync_base(MergeEachRound(), adapted, state, merges=0) == state
    with pytest.raises(RunError, match="missed a release"):
        sync_base(MergeEachRound(), adapted, state, merges=2)
    assert sync_base(FedIT(), adapted, state, merges=5) is state  # rules that do not merge ignore it


def test_heterogeneous_ranks_are_sliced_sent_and_zero_padded(tmp_path: Path) -> None:
    register_rule("test-zero-pad", ZeroPadRanks)
    config = two_clients("test-zero-pad", "run.rounds=2")
    small = config.with_overrides(["peft.r=2", "peft.alpha=4.0"])
    server, clients, result = run_parties(config, [config, small], tmp_path)
    assert [r["clients"] for r in result.metrics] == [2, 2]
    uploads = [c.transport.uploads for c in clients]  # type: ignore[attr-defined]
    a_key = next(k for k in server.global_state if "lora_A" in k)
    b_key = next(k for k in server.global_state if "lora_B" in k)
    assert uploads[0][1][1][a_key].shape == (4, 32) and uploads[1][1][1][a_key].shape == (2, 32)
    assert uploads[1][1][1][b_key].shape == (32, 2)
    # round 1: the global adapter moved by the weighted mean of the zero-padded updates
    round1 = load_file(str(tmp_path / "checkpoints" / "round-0001.safetensors"))
    layout = Layout.of({k: round1[k] for k in round1})
    (w0, u0), (w1, u1) = uploads[0][1], uploads[1][1]
    padded = zero_pad(u1, layout)
    start = _initial_state(config)
    for key in round1:
        expected = start[key] + (w0 * u0[key].astype(np.float64) + w1 * padded[key]) / (w0 + w1)
        np.testing.assert_allclose(round1[key], expected, atol=1e-6)
    # the rank-2 client trained the leading block of the rank-4 global adapter
    a_small = params(clients[1].trainer.adapted.model, "lora_A")
    assert all(v.shape[0] == 2 for v in a_small.values())


def test_a_rank_above_the_servers_is_refused_at_join(tmp_path: Path) -> None:
    register_rule("test-zero-pad", ZeroPadRanks)
    config = two_clients("test-zero-pad")
    server = FederatedServer(config, tmp_path, transport="in-process")
    big = config.with_overrides(["peft.r=8"])
    trainer = LocalTrainer.from_config(big, client_dataset(big, 0))
    client = FederatedClient("client-0", InProcessTransport(server.coordinator), trainer, ClientStages.from_config(big))
    with pytest.raises(TransportError, match="lora_rank 8 is not within 1..4"):
        client.join()
    server.coordinator.finish("test over")


def _initial_state(config: Config) -> dict[str, np.ndarray]:
    """The global adapter before round 1 (the run seed fixes it)."""
    workload = TextClassification(config.model, config.peft, ("a", "b", "c", "d"))
    return trainable_state(workload.build(seed=config.run.seed).model)
