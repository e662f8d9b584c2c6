"""flora, lora-fair and heterogeneous ranks for fedit: exactness, saved adapters, secure modes, refusals.

Each test fails if the rule were replaced by FedIT (the stack's product, the correction), if the
merged base were not what the saved adapter references, if a client did not zero-pad its own
upload (secagg+ would refuse it), or if a refused combination ran.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from secure_fl.client.client import ClientStages, FederatedClient
from secure_fl.client.trainer import LocalTrainer
from secure_fl.config import Config
from secure_fl.data.sources import client_dataset, load_eval_set
from secure_fl.errors import ConfigError, RunError, TransportError
from secure_fl.models import trainable_state
from secure_fl.peft_agg import create_rule
from secure_fl.peft_agg.flora import FLoRA, stack_factors
from secure_fl.peft_agg.hooks import zero_pad
from secure_fl.peft_agg.lora_fair import LoRAFAIR, misfit
from secure_fl.peft_agg.ranks import with_lora_rank
from secure_fl.server.engine import BackgroundRun, FederatedServer, RunResult
from secure_fl.server.rundir import RunDirectory
from secure_fl.simulation import simulate
from secure_fl.stages import Stages
from secure_fl.tasks import SequenceClassification
from secure_fl.tensors import Layout
from secure_fl.transport.inprocess import InProcessTransport
from secure_fl.workload import TextClassification
from tests.conftest import smoke_config
from tests.test_rule_hooks import Recording

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"
HEAD = "m.head.weight"


def random_adapters(ranks: Sequence[int], *, d_out: int = 6, d_in: int = 5, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{A: rng.normal(size=(r, d_in)), B: rng.normal(size=(d_out, r)), HEAD: rng.normal(size=(3,))} for r in ranks]


def rows_of(adapters: Sequence[dict[str, np.ndarray]], rank: int) -> tuple[np.ndarray, Layout]:
    """Zero-pad each adapter to ``rank`` and flatten (what flora's server sees after `align`)."""
    d_out, d_in = adapters[0][B].shape[0], adapters[0][A].shape[1]
    layout = Layout.of({A: np.zeros((rank, d_in)), B: np.zeros((d_out, rank)), HEAD: np.zeros(3)})
    return layout.stack([zero_pad(a, layout) for a in adapters]), layout


# ------------------------------------------------------------------------------ exactness


def test_algorithms_oracle_fedit_quarter_ones_flora_half_identity() -> None:
    e1, e2 = np.array([[1.0], [0.0]]), np.array([[0.0], [1.0]])
    adapters = [{A: e1.T, B: e1, HEAD: np.zeros(3)}, {A: e2.T, B: e2, HEAD: np.zeros(3)}]
    rows, layout = rows_of(adapters, 2)
    flora = layout.unflatten(FLoRA().aggregate(rows, np.ones(2), layout))
    np.testing.assert_array_equal(flora[B] @ flora[A], 0.5 * np.eye(2))
    fedit_rows, fedit_layout = rows_of(adapters, 1)
    fedit = fedit_layout.unflatten(create_rule("fedit").aggregate(fedit_rows, np.ones(2), fedit_layout))
    np.testing.assert_array_equal(fedit[B] @ fedit[A], 0.25 * np.ones((2, 2)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flora_stack_is_the_weighted_sum_of_products_for_any_ranks(seed: int) -> None:
    ranks, weights, scaling = [1, 3, 2], np.array([10.0, 30.0, 60.0]), 2.0
    adapters = random_adapters(ranks, seed=seed)
    rows, layout = rows_of(adapters, 6)
    out = layout.unflatten(FLoRA().aggregate(rows.astype(np.float32), weights, layout))
    p = weights / weights.sum()
    ideal = sum(pi * scaling * a[B] @ a[A] for pi, a in zip(p, adapters))
    np.testing.assert_allclose(scaling * out[B].astype(np.float64) @ out[A], ideal, atol=1e-5)
    np.testing.assert_allclose(out[HEAD], sum(pi * a[HEAD] for pi, a in zip(p, adapters)), atol=1e-6)
    # the stack is literal: B's first columns are client 0's B, A's first row p_0 A_0
    np.testing.assert_allclose(out[B][:, :1], adapters[0][B], atol=1e-6)
    np.testing.assert_allclose(out[A][:1], p[0] * adapters[0][A], atol=1e-6)


def test_flora_refactorises_a_wide_stack_exactly_and_refuses_one_that_does_not_fit() -> None:
    rng = np.random.default_rng(3)
    basis = rng.normal(size=(6, 2))  # every client's B in one 2-dim column space: the stack has rank 2
    b_rows = np.stack([basis @ rng.normal(size=(2, 2)) for _ in range(3)])
    a_rows = rng.normal(size=(3, 2, 5))
    p = np.array([0.2, 0.3, 0.5])
    b, a = stack_factors(b_rows, a_rows, p, rank=2)
    assert b.shape == (6, 2) and a.shape == (2, 5)
    np.testing.assert_allclose(b @ a, np.einsum("j,jor,jri->oi", p, b_rows, a_rows), atol=1e-10)
    with pytest.raises(ValueError, match=r"has rank 5, more than .* peft.r=2"):
        stack_factors(rng.normal(size=(3, 6, 2)), a_rows, p, rank=2)


@pytest.mark.parametrize("seed", [0, 1])
def test_fedit_error_is_the_cross_terms(seed: int) -> None:
    adapters = random_adapters([3, 3, 3], seed=seed)
    weights = np.array([1.0, 2.0, 5.0])
    p = weights / weights.sum()
    rows, layout = rows_of(adapters, 3)
    out = layout.unflatten(create_rule("fedit").aggregate(rows, weights, layout))
    error = out[B].astype(np.float64) @ out[A] - sum(pi * a[B] @ a[A] for pi, a in zip(p, adapters))
    cross = sum(p[i] * p[j] * adapters[i][B] @ adapters[j][A] for i in range(3) for j in range(3) if i != j)
    formula = cross - sum(p[i] * (1 - p[i]) * adapters[i][B] @ adapters[i][A] for i in range(3))
    assert np.abs(error).max() > 0.1
    np.testing.assert_allclose(error, formula, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lora_fair_correction_reduces_the_misfit_of_fedit(seed: int) -> None:
    adapters = random_adapters([4, 4, 4], d_out=8, d_in=7, seed=seed)
    weights = np.array([3.0, 1.0, 2.0])
    p = weights / weights.sum()
    rows, layout = rows_of(adapters, 4)
    fair = layout.unflatten(LoRAFAIR(lam=0.01, steps=50).aggregate(rows, weights, layout))
    fedit = layout.unflatten(create_rule("fedit").aggregate(rows, weights, layout))
    target = sum(pi * a[B] @ a[A] for pi, a in zip(p, adapters))[None]
    np.testing.assert_allclose(fair[A], fedit[A], atol=1e-6)  # Ā is FedIT's; only B moves
    before = misfit(target, fedit[B][None].astype(np.float64), fedit[A][None].astype(np.float64))[0]
    after = misfit(target, fair[B][None].astype(np.float64), fair[A][None].astype(np.float64))[0]
    assert after < 0.8 * before, (before, after)
    unchanged = layout.unflatten(LoRAFAIR(steps=0).aggregate(rows, weights, layout))
    np.testing.assert_allclose(unchanged[B], fedit[B], atol=1e-6)


# ------------------------------------------------------------------------------ simulated runs and saved adapters


def _evaluate_saved(result: RunResult, config: Config) -> dict[str, float]:
    """Reload ``adapter/`` with plain transformers + peft (its own base reference) and score the server's held-out set."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapter = result.run_dir / "adapter"
    base_path = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    assert base_path == "../base_model"
    base = AutoModelForSequenceClassification.from_pretrained(str(adapter / base_path), num_labels=4)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    _, eval_set = load_eval_set(config)
    assert eval_set is not None
    data = SequenceClassification().encode(AutoTokenizer.from_pretrained(str(adapter)), eval_set, max_length=config.model.max_length)
    return SequenceClassification().evaluate(model, data, batch_size=config.client.eval_batch_size)


FLORA = ("peft.rule='flora'", "peft.r=16", "peft.alpha=32.0")  # stacked rank 16 = 4 clients x rank 4


@pytest.mark.parametrize(
    ("overrides", "ranks"),
    [(FLORA, [4]), (FLORA, [2, 4, 6, 4]), (("peft.rule='lora-fair'",), None),
     (("peft.rule_params.max_rank=4",), [2, 4])],
    ids=["flora", "flora-mixed-ranks", "lora-fair", "fedit-heterogeneous"],
)
def test_simulated_run_saves_an_adapter_that_predicts_what_the_server_evaluated(
    tmp_path: Path, overrides: tuple[str, ...], ranks: list[int] | None
) -> None:
    config = smoke_config(*overrides)
    result = simulate(config, tmp_path / "run", progress=False, client_ranks=ranks)
    assert [r["clients"] for r in result.metrics] == [4, 4]
    scores = _evaluate_saved(result, config)
    assert scores["accuracy"] == result.metrics[-1]["accuracy"]
    assert abs(scores["loss"] - result.metrics[-1]["loss"]) < 1e-6


def test_flora_saved_base_is_the_clean_base_plus_the_first_release(tmp_path: Path) -> None:
    config = smoke_config(*FLORA)
    result = simulate(config, tmp_path / "run", progress=False, client_ranks=[4])
    info = json.loads((result.run_dir / "adapter" / "secure_fl.json").read_text(encoding="utf-8"))
    assert info["merged_releases"] == 1
    released = load_file(str(result.run_dir / "checkpoints" / "round-0001.safetensors"))
    saved = load_file(str(result.run_dir / "base_model" / "model.safetensors"))
    clean = TextClassification(config.model, config.peft, ("a", "b", "c", "d")).build(seed=config.run.seed).model
    merged = 0
    for name, module in clean.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        prefix = name + "."
        delta = 2.0 * released[prefix + "lora_B.default.weight"] @ released[prefix + "lora_A.default.weight"]
        assert np.abs(delta).max() > 0
        key = name.removeprefix("base_model.model.") + ".weight"
        np.testing.assert_allclose(saved[key], module.base_layer.weight.detach().numpy() + delta, atol=1e-6)
        merged += 1
    assert merged == 4
    # the released stack of round 1 holds four rank-4 blocks: all 16 ranks are used
    b = released[next(k for k in released if "lora_B" in k)]
    assert (np.abs(b).sum(axis=0) > 0).sum() == 16


def test_flora_resumed_from_a_checkpoint_rebuilds_the_merged_base(tmp_path: Path) -> None:
    config = smoke_config(*FLORA, "run.rounds=3", "run.keep_checkpoints=3")
    result = simulate(config, tmp_path / "run", progress=False, client_ranks=[4])
    checkpoint = RunDirectory(result.run_dir).load_checkpoint(2)
    assert checkpoint is not None and checkpoint.base is not None
    assert (checkpoint.base["releases"], checkpoint.base["merges_done"]) == (2, 1)
    fresh = FederatedServer(config, tmp_path / "fresh", run_id="fresh")
    unmerged = fresh.evaluate(checkpoint.state)
    fresh.restore_from_checkpoint(checkpoint)
    assert fresh.releases == 2 and fresh.adapted.merges_done == 1
    scores = fresh.evaluate(checkpoint.state)  # base with release 1 folded, plus release 2: the round-2 model
    assert scores["accuracy"] == result.metrics[1]["accuracy"]
    assert abs(scores["loss"] - result.metrics[1]["loss"]) < 1e-6
    assert abs(unmerged["loss"] - result.metrics[1]["loss"]) > 1e-4  # the clean base is another model
    start = fresh.start_state()  # round 3 folds release 2, as the uninterrupted run did
    assert fresh.adapted.merges_done == 2 and all(not start[k].any() for k in start if "lora_B" in k)
    checkpoint.base = None
    with pytest.raises(RunError, match="holds no merged base"):
        FederatedServer(config, tmp_path / "other", run_id="other").restore_from_checkpoint(checkpoint)


def test_flora_stack_that_exceeds_the_global_rank_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"more than the global adapter's rank peft.r=4"):
        simulate(smoke_config("peft.rule='flora'", "run.rounds=1"), tmp_path / "run", progress=False)


# ------------------------------------------------------------------------------ heterogeneous ranks (client-side padding)


def run_parties(server_config: Config, client_configs: Sequence[Config], out: Path) -> tuple[list[FederatedClient], RunResult]:
    """One server and clients that each build their own model (their own config), in process."""
    server = FederatedServer(server_config, out, transport="in-process")
    clients = []
    for index, config in enumerate(client_configs):
        trainer = LocalTrainer.from_config(config, client_dataset(config, index))
        transport = Recording(server.coordinator) if server_config.secure.mode == "plain" else InProcessTransport(server.coordinator)
        client = FederatedClient(f"client-{index}", transport, trainer, ClientStages.from_config(config), seed=config.run.seed)
        client.join()
        clients.append(client)
    rounds = BackgroundRun(server)
    while rounds.is_alive() and not all(c.finished for c in clients):
        if not any([c.step() in ("trained", "answered") for c in clients if not c.finished]):
            time.sleep(0.01)
    rounds.join(120)
    return clients, rounds.result()


HETERO = ("peft.rule_params.max_rank=4", "run.rounds=1")  # the smoke preset's 4 clients


@pytest.fixture(scope="module")
def plain_hetero(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[FederatedClient], RunResult]:
    """Ranks 2, 4, 2, 4 in the clear, every upload recorded."""
    config = smoke_config(*HETERO)
    return run_parties(config, [with_lora_rank(config, 2), config] * 2, tmp_path_factory.mktemp("plain"))


def test_heterogeneous_ranks_are_padded_by_the_client(plain_hetero: tuple[list[FederatedClient], RunResult]) -> None:
    clients, plain = plain_hetero
    uploads = [c.transport.uploads[1] for c in clients]  # type: ignore[attr-defined]
    a_key = next(k for k in plain.global_state if "lora_A" in k)
    b_key = next(k for k in plain.global_state if "lora_B" in k)
    small = uploads[0][1]
    assert small[a_key].shape == (4, 32) and small[b_key].shape == (32, 4)  # the rank-2 client sent the global shapes
    assert not small[a_key][2:].any() and not small[b_key][:, 2:].any() and small[a_key][:2].any()
    assert uploads[1][1][a_key][2:].any()  # the rank-4 client trained all four ranks
    assert all(v.shape[0] == 2 for n, v in clients[0].trainer.adapted.model.named_parameters() if "lora_A" in n)
    start = _start(smoke_config(*HETERO))
    total = sum(w for w, _ in uploads)
    for key, value in plain.global_state.items():
        expected = start[key] + sum(w * u[key].astype(np.float64) for w, u in uploads) / total
        np.testing.assert_allclose(value, expected, atol=1e-6)


#: How far a secure mode's sum may be from the plaintext one: secagg+ and bfv round every value to
#: their quantisation step (precision 2^-12, at most one step off); ckks is approximate arithmetic.
SECURE_TOLERANCE = {"secagg+": 2.0**-12, "bfv": 2.0**-12, "ckks": 1e-5}


@pytest.mark.parametrize("mode", sorted(SECURE_TOLERANCE))
def test_heterogeneous_ranks_sum_under_secure_modes(
    tmp_path: Path, mode: str, plain_hetero: tuple[list[FederatedClient], RunResult]
) -> None:
    """The same padded uploads, masked or encrypted: the server never sees one, and the mean is the plaintext one."""
    _, plain = plain_hetero
    config = smoke_config(*HETERO, f"secure.mode={mode!r}")
    _, secure = run_parties(config, [with_lora_rank(config, 2), config] * 2, tmp_path)
    assert [r["clients"] for r in secure.metrics] == [4]
    for key, value in plain.global_state.items():
        np.testing.assert_allclose(secure.global_state[key], value, atol=SECURE_TOLERANCE[mode])
    start = _start(config)
    assert max(np.abs(secure.global_state[k] - start[k]).max() for k in start) > 1e-3  # it did move


def _start(config: Config) -> dict[str, np.ndarray]:
    """The global adapter before round 1."""
    return trainable_state(TextClassification(config.model, config.peft, ("a", "b", "c", "d")).build(seed=config.run.seed).model)


def test_heterogeneous_ranks_refuse_another_scaling_or_a_rank_above_the_maximum(tmp_path: Path) -> None:
    config = smoke_config(*HETERO)
    server = FederatedServer(config, tmp_path, transport="in-process")
    own = config.with_overrides(["peft.r=2"])  # alpha stays 8: scaling 4, the server's is 2
    trainer = LocalTrainer.from_config(own, client_dataset(own, 0))
    client = FederatedClient("client-0", InProcessTransport(server.coordinator), trainer, ClientStages.from_config(own))
    with pytest.raises(TransportError, match=r"set peft.alpha=4"):
        client.join()
    server.coordinator.finish("test over")
    with pytest.raises(ConfigError, match=r"peft.r=8 is above peft.rule_params.max_rank=4") as info:
        Stages.from_config(config.with_overrides(["peft.r=8", "peft.alpha=16.0"]))
    assert info.value.key == "peft.r"


def test_a_server_whose_rank_is_not_max_rank_refuses_every_client(tmp_path: Path) -> None:
    config = smoke_config("peft.rule_params.max_rank=8")
    server = FederatedServer(config, tmp_path, transport="in-process")
    trainer = LocalTrainer.from_config(config, client_dataset(config, 0))
    client = FederatedClient("client-0", InProcessTransport(server.coordinator), trainer, ClientStages.from_config(config))
    with pytest.raises(TransportError, match=r"server's peft.r=4 differs from peft.rule_params.max_rank=8"):
        client.join()
    server.coordinator.finish("test over")


def test_without_the_setting_a_client_of_another_rank_is_refused(tmp_path: Path) -> None:
    config = smoke_config("run.num_clients=2", "run.clients_per_round=2")
    server = FederatedServer(config, tmp_path, transport="in-process")
    own = with_lora_rank(config, 2)
    trainer = LocalTrainer.from_config(own, client_dataset(own, 0))
    client = FederatedClient("client-0", InProcessTransport(server.coordinator), trainer, ClientStages.from_config(own))
    with pytest.raises(TransportError, match="model fingerprints differ"):
        client.join()
    server.coordinator.finish("test over")


def test_lora_rank_flag_keeps_the_scaling() -> None:
    from secure_fl.cli import client_main

    config = with_lora_rank(smoke_config(), 2)
    assert (config.peft.r, config.peft.alpha) == (2, 4.0)
    with pytest.raises(ConfigError, match="--lora-rank"):
        with_lora_rank(smoke_config(), 0)
    assert client_main(["--insecure", "--server", "127.0.0.1:1", "--client-id", "c", "--preset", "smoke", "--lora-rank", "0"]) == 2


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("rule", ["flora", "lora-fair"])
@pytest.mark.parametrize("mode", ["secagg+", "bfv", "ckks"])
def test_product_rules_are_refused_under_sum_only_modes(rule: str, mode: str) -> None:
    with pytest.raises(ConfigError) as info:
        Stages.from_config(smoke_config(f"peft.rule={rule!r}", f"secure.mode={mode!r}"))
    message = str(info.value)
    assert info.value.key == "peft.rule"
    assert f"peft.rule={rule!r}" in message and f"secure.mode={mode!r}" in message
    assert "needs every client's adapter" in message and "only reveals sums" in message


@pytest.mark.parametrize("rule", ["flora", "lora-fair"])
@pytest.mark.parametrize(
    ("override", "key"),
    [("privacy.mode='central'", "privacy.mode"), ("robustness.defense='median'", "robustness.defense"),
     ("secure.bucket_size=2", "secure.bucket_size"), ("robustness.reputation=true", "robustness.reputation")],
)
def test_product_rules_refuse_what_mixes_rows_or_noises_the_aggregate(rule: str, override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Stages.from_config(smoke_config(f"peft.rule={rule!r}", override))
    assert info.value.key == key and rule in str(info.value)


def test_product_rules_run_under_dp_sgd() -> None:
    for rule in ("flora", "lora-fair"):
        Stages.from_config(smoke_config(f"peft.rule={rule!r}", "privacy.mode='dp-sgd'"))


def test_fedit_heterogeneous_ranks_is_allowed_under_every_secure_mode() -> None:
    for mode in ("plain", "secagg+", "bfv", "ckks"):
        stages = Stages.from_config(smoke_config("peft.rule_params.max_rank=4", f"secure.mode={mode!r}"))
        assert stages.rule.aligns_on_client and not stages.rule.accepts_client_shapes


@pytest.mark.parametrize("kwargs", [{"lam": -1.0}, {"steps": -1}, {"steps": True}, {"lr": 0.0}])
def test_lora_fair_settings_are_validated(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LoRAFAIR(**kwargs)


def test_flora_restart_is_b_zero_and_the_same_fresh_a_on_every_party() -> None:
    config = smoke_config(*FLORA)
    workload = TextClassification(config.model, config.peft, ("a", "b", "c", "d"))
    server, client = workload.build(seed=0), TextClassification(
        config.model, with_lora_rank(config, 4).peft, ("a", "b", "c", "d")).build(seed=0)
    state = {k: v + np.float32(0.01) for k, v in trainable_state(server.model).items()}
    restart_server = FLoRA().merge_into_base(server.model, state)
    restart_client = FLoRA().merge_into_base(client.model, state)
    for key, value in restart_server.items():
        np.testing.assert_array_equal(value, restart_client[key])
        if "lora_B" in key:
            assert not value.any()
        elif "lora_A" in key:
            assert not np.allclose(value, state[key]) and np.abs(value).max() <= 1 / np.sqrt(value.shape[1])
    server_w = {n: p.detach().numpy() for n, p in server.model.named_parameters() if "base_layer" in n}
    client_w = {n: p.detach().numpy() for n, p in client.model.named_parameters() if "base_layer" in n}
    for name, weight in server_w.items():
        np.testing.assert_array_equal(weight, client_w[name])  # rank 16 and rank 4 models merged the same
