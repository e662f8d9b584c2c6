"""The ``ffa-lora`` and ``fed-sb`` rules: what is frozen, trained and sent, exact aggregation, the
saved adapter reloading with plain peft, and runs under SecAgg+.

Each test fails if its property were broken: an A drawn from torch's global RNG or differing between
parties, an A that travels, a B or R whose mean is not applied, an adapter saved with R unfolded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from secure_fl.config import Config
from secure_fl.data.sources import load_splits
from secure_fl.models import load_trainable_state, trainable_state
from secure_fl.peft_agg import create_rule
from secure_fl.peft_agg.fed_sb import LATENT_SUFFIX, FedSB, LatentB, folded, svd_factors
from secure_fl.peft_agg.ffa_lora import FFALoRA, draw_a
from secure_fl.peft_agg.hooks import build_for_rule, lora_layers
from secure_fl.simulation import simulate
from secure_fl.tensors import Layout
from secure_fl.workload import TextClassification
from tests.conftest import smoke_config
from tests.test_rule_hooks import run_parties, two_clients

LABELS = ("a", "b", "c", "d")


def _workload(config: Config) -> TextClassification:
    return TextClassification(config.model, config.peft, LABELS)


def _lora_bytes(tensors: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for k, v in tensors.items() if ".lora_" in k)


def _frozen(model: torch.nn.Module, part: str) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters() if part in n}


# ------------------------------------------------------------------------------ ffa-lora


def test_ffa_lora_a_is_drawn_from_the_seed_alone() -> None:
    torch.manual_seed(1)
    first = draw_a("layer.lora_A.default.weight", (4, 32), seed=7)
    torch.manual_seed(2)  # torch's global RNG state plays no part
    np.testing.assert_array_equal(draw_a("layer.lora_A.default.weight", (4, 32), seed=7).numpy(), first.numpy())
    assert not torch.equal(draw_a("other.lora_A.default.weight", (4, 32), seed=7), first)  # keyed by the name
    assert not torch.equal(draw_a("layer.lora_A.default.weight", (4, 32), seed=8), first)  # and by the seed
    big = draw_a("x", (64, 4096), seed=0, scale=2.0)
    assert big.dtype == torch.float32 and float(big.var()) == pytest.approx(2.0 / 4096, rel=0.05)
    # prepare_model under any global RNG state writes exactly these A's, and zero B's
    config = smoke_config()
    for state in (3, 4):
        model = _workload(config).build(seed=0).model
        torch.manual_seed(state)
        FFALoRA(a_scale=0.5).prepare_model(model, seed=11)
        a = _frozen(model, ".lora_A.")
        assert len(a) == 4
        for name, value in a.items():
            np.testing.assert_array_equal(value, draw_a(name, value.shape, seed=11, scale=0.5).numpy())
        assert all(not v.any() for v in _frozen(model, ".lora_B.").values())
    with pytest.raises(ValueError, match="a_scale"):
        FFALoRA(a_scale=0.0)


def test_ffa_lora_shares_a_sends_only_b_and_the_mean_of_b_is_exact(tmp_path: Path) -> None:
    config = two_clients("ffa-lora", "run.rounds=1")
    server, clients, result = run_parties(config, [config, config], tmp_path)
    assert [r["clients"] for r in result.metrics] == [2]
    # A: bit-identical on every party, from the seed, and never trained
    server_a = _frozen(server.adapted.model, ".lora_A.")
    assert len(server_a) == 4
    for name, value in server_a.items():
        np.testing.assert_array_equal(value, draw_a(name, value.shape, seed=config.run.seed).numpy())
        for client in clients:
            np.testing.assert_array_equal(_frozen(client.trainer.adapted.model, ".lora_A.")[name], value)
    # what travels: B and the head, never A; the LoRA part is half of FedIT's (32 x 32 weights)
    uploads = [c.transport.uploads[1] for c in clients]  # type: ignore[attr-defined]
    fedit_state = trainable_state(_workload(config).build(seed=config.run.seed).model)
    for _, upload in uploads:
        assert not [k for k in upload if ".lora_A." in k]
        assert [k for k in upload if ".lora_B." in k] and [k for k in upload if "classifier" in k]
        assert _lora_bytes(upload) * 2 == _lora_bytes(fedit_state)
    assert set(result.global_state) == set(uploads[0][1])
    # exact: the global delta W is the weighted mean of the clients' B_i A (B started at zero)
    (w0, u0), (w1, u1) = uploads
    assert w0 > 0 and w1 > 0
    load_trainable_state(server.adapted.model, result.global_state)
    scaling = config.peft.alpha / config.peft.r
    for name, module in lora_layers(server.adapted.model):
        a = server_a[f"{name}.lora_A.default.weight"].astype(np.float64)
        key = f"{name}.lora_B.default.weight"
        expected = scaling * (w0 * u0[key].astype(np.float64) @ a + w1 * u1[key].astype(np.float64) @ a) / (w0 + w1)
        assert np.abs(expected).max() > 1e-4  # B trained
        np.testing.assert_allclose(module.get_delta_weight("default").detach().numpy(), expected, atol=1e-6)


# ------------------------------------------------------------------------------ fed-sb


def test_fed_sb_init_is_the_svd_of_the_base_weight_and_starts_at_the_base_model() -> None:
    config = smoke_config("peft.rule='fed-sb'")
    adapted = build_for_rule(_workload(config), FedSB(), seed=0)
    layers = lora_layers(adapted.model)
    assert len(layers) == 4
    for _, module in layers:
        latent = module.lora_B["default"]
        assert isinstance(latent, LatentB)
        assert not latent.latent.weight.any() and not module.get_delta_weight("default").any()  # R0 = 0
        w0 = module.get_base_layer().weight.detach().double()
        u, s, vh = torch.linalg.svd(w0)
        b, a = latent.basis.weight.detach().double(), module.lora_A["default"].weight.detach().double()
        np.testing.assert_allclose((b.T @ w0 @ a.T).numpy(), torch.diag(s[:4]).numpy(), atol=1e-5)  # top-4 pairs
        np.testing.assert_allclose((b.T @ b).numpy(), np.eye(4), atol=1e-6)
        pivot = b.abs().argmax(0)
        assert (b[pivot, torch.arange(4)] > 0).all()  # the sign rule
    assert adapted.trainable_names == tuple(
        n for n in adapted.trainable_names if n.endswith(LATENT_SUFFIX) or "classifier" in n
    )
    assert sum(n.endswith(LATENT_SUFFIX) for n in adapted.trainable_names) == 4
    # the same base weight gives the same factors, bit for bit; another party's build agrees
    other = build_for_rule(_workload(config), FedSB(), seed=0)
    for part in (".lora_A.", ".basis."):
        for name, value in _frozen(adapted.model, part).items():
            np.testing.assert_array_equal(_frozen(other.model, part)[name], value)
    with pytest.raises(Exception, match="r <= min"):
        svd_factors(torch.zeros(3, 5), 4)


def test_fed_sb_mean_of_r_is_the_mean_of_b_r_a() -> None:
    config = smoke_config("peft.rule='fed-sb'")
    rule = create_rule("fed-sb")
    adapted = build_for_rule(_workload(config), rule, seed=0)
    state = trainable_state(adapted.model)
    keys = [k for k in state if k.endswith(LATENT_SUFFIX)]
    layout = Layout.of({k: state[k] for k in keys})
    rng = np.random.default_rng(0)
    rs = [{k: rng.normal(size=(4, 4)).astype(np.float32) for k in keys} for _ in range(3)]
    weights = np.array([1.0, 2.0, 5.0])
    messages = [rule.client_message(r, {k: state[k] for k in keys}, keys) for r in rs]  # R0 = 0: delta = R_i
    delta = rule.aggregate(layout.stack(messages), weights, layout)
    load_trainable_state(adapted.model, rule.apply(state, layout.unflatten(delta)))
    scaling = config.peft.alpha / config.peft.r
    for name, module in lora_layers(adapted.model):
        b = module.lora_B["default"].basis.weight.detach().double().numpy()
        a = module.lora_A["default"].weight.detach().double().numpy()
        key = name + LATENT_SUFFIX
        expected = sum(w * scaling * b @ r[key].astype(np.float64) @ a for w, r in zip(weights, rs)) / weights.sum()
        np.testing.assert_allclose(module.get_delta_weight("default").detach().numpy(), expected, atol=1e-5)


def test_fed_sb_sends_only_r_and_the_head(tmp_path: Path) -> None:
    config = two_clients("fed-sb", "run.rounds=1")
    server, clients, result = run_parties(config, [config, config], tmp_path)
    assert [r["clients"] for r in result.metrics] == [2]
    spec = server.pipeline.payload_spec()
    for _, upload in (c.transport.uploads[1] for c in clients):  # type: ignore[attr-defined]
        assert set(upload) == set(spec) == set(result.global_state)
        lora = {k: v for k, v in upload.items() if ".lora_" in k}
        assert sorted(lora) == sorted(k for k in upload if k.endswith(LATENT_SUFFIX)) and len(lora) == 4
        assert all(v.shape == (4, 4) for v in lora.values())
        assert _lora_bytes(upload) == 4 * 4 * 4 * 4  # r^2 float32 per module, 4 modules
        assert [k for k in upload if "classifier" in k]
        assert any(np.abs(v).sum() > 0 for v in lora.values())
    # A and B are frozen, equal everywhere and never moved by training
    for part in (".lora_A.", ".basis."):
        mine = _frozen(server.adapted.model, part)
        assert len(mine) == 4
        for client in clients:
            theirs = _frozen(client.trainer.adapted.model, part)
            assert all(np.array_equal(theirs[k], v) for k, v in mine.items())
    # folded() gives a standard LoRA B' = B R, and puts LatentB back
    model = server.adapted.model
    load_trainable_state(model, result.global_state)
    with folded(model):
        plain = {n: m.lora_B["default"] for n, m in lora_layers(model)}
        assert all(type(m) is torch.nn.Linear and m.weight.shape == (32, 4) for m in plain.values())
    assert all(isinstance(m.lora_B["default"], LatentB) for _, m in lora_layers(model))


# ------------------------------------------------------------------------------ end to end


def _reload_and_compare(config: Config, run_dir: Path, global_state: dict[str, np.ndarray], accuracy: float) -> None:
    """The saved adapter, reloaded with plain peft, predicts what the server's model predicts."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter = run_dir / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert not [k for k in saved if "latent" in k or "basis" in k]  # a standard LoRA adapter
    assert all(v.shape == (32, 4) for k, v in saved.items() if "lora_B" in k)
    base = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "base_model"), num_labels=4)
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()

    workload = _workload(config)
    server = build_for_rule(workload, create_rule(config.peft.rule), seed=config.run.seed)
    load_trainable_state(server.model, global_state)
    test = workload.prepare(server, load_splits(config)[1])
    assert workload.evaluate(server.model, test, batch_size=config.client.eval_batch_size)["accuracy"] == accuracy
    assert workload.evaluate(reloaded, test, batch_size=64)["accuracy"] == accuracy
    server.model.eval()
    batch = test.batch(torch.arange(len(test)))
    with torch.inference_mode():
        mine = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = server.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    np.testing.assert_allclose(mine.numpy(), theirs.numpy(), atol=1e-6, rtol=0)
    # and it is not the untrained model: the adapter moved the logits
    fresh = build_for_rule(workload, create_rule(config.peft.rule), seed=config.run.seed).model.eval()
    with torch.inference_mode():
        start = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert np.abs(start.numpy() - mine.numpy()).max() > 1e-3


@pytest.mark.parametrize("rule", ["ffa-lora", "fed-sb"])
def test_simulated_run_saves_an_adapter_that_reloads_with_peft(rule: str, tmp_path: Path) -> None:
    config = smoke_config(f"peft.rule='{rule}'")
    result = simulate(config, tmp_path, progress=False)
    assert [r["clients"] for r in result.metrics] == [4, 4]
    assert all(r["stages"]["rule"] == rule for r in result.metrics)
    _reload_and_compare(config, result.run_dir, result.global_state, result.metrics[-1]["accuracy"])
    fedit = simulate(smoke_config(), tmp_path / "fedit", progress=False)
    ratio = result.metrics[0]["bytes_up"] / fedit.metrics[0]["bytes_up"]  # the head and framing go with both
    assert ratio < (0.65 if rule == "ffa-lora" else 0.35), ratio


@pytest.mark.parametrize("rule", ["ffa-lora", "fed-sb"])
def test_runs_under_secagg_plus(rule: str, tmp_path: Path) -> None:
    plain = simulate(smoke_config(f"peft.rule='{rule}'", "run.rounds=1"), tmp_path / "plain", progress=False)
    masked = simulate(smoke_config(f"peft.rule='{rule}'", "run.rounds=1", "secure.mode='secagg+'"), tmp_path / "masked", progress=False)
    assert [r["clients"] for r in masked.metrics] == [4] and masked.metrics[0]["stages"]["secure"] == "secagg+"
    assert set(masked.global_state) == set(plain.global_state)
    for name, value in plain.global_state.items():  # one round: only SecAgg+'s quantisation error
        np.testing.assert_allclose(masked.global_state[name], value, atol=1e-3)
    assert abs(masked.final_accuracy - plain.final_accuracy) <= 0.02


@pytest.mark.parametrize("rule", ["ffa-lora", "fed-sb"])
def test_dp_sgd_trains_only_what_is_sent(rule: str, tmp_path: Path) -> None:
    """opacus gets per-example gradients of B (ffa-lora) or R (fed-sb, an ordinary Linear) and the head."""
    config = smoke_config(f"peft.rule='{rule}'", "run.rounds=1", "privacy.mode=dp-sgd", "privacy.dp_sgd_params.noise_multiplier=1.1")
    result = simulate(config, tmp_path, progress=False)
    assert [r["clients"] for r in result.metrics] == [4] and result.metrics[0]["stages"]["privacy"] == "dp-sgd"
    lora = [k for k in result.global_state if ".lora_" in k]
    assert len(lora) == 4 and all((k.endswith(LATENT_SUFFIX) if rule == "fed-sb" else ".lora_B." in k) for k in lora)
    assert all(np.isfinite(v).all() for v in result.global_state.values())
