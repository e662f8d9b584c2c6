"""Sample-level DP-SGD (opacus) on the clients: ``privacy.mode = "dp-sgd"`` or ``privacy.dp_sgd = true``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from privacy.audit.sample_level import sample_level_report
from privacy.dpsgd import DPSGD, sample_rate
from privacy.ledger import LedgerError, PrivacyLedger, chain_lines
from protocols.errors import MalformedMessage, Refused
from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.client.trainer import LocalTrainer
from secure_fl.data.sources import client_partitions, load_splits
from secure_fl.errors import ConfigError
from secure_fl.server.admission import Admission
from secure_fl.simulation import simulate
from secure_fl.stages import SAMPLE_RATE_INFO_KEY, Stages
from secure_fl.workload import TextClassification
from tests.conftest import smoke_config

DELTA = 1e-5
#: A small, quick run: 2 rounds of 3 DP-SGD steps, 4 clients of 30 training examples each.
QUICK = ["run.rounds=2", "client.local_steps=3", 'privacy.accountants=["rdp"]', "data.synthetic_examples=160"]


def opacus_rdp(events: list[tuple[float, float, int]]) -> float:
    """Epsilon of the composition with opacus's own RDP accountant (an independent computation)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for z, q, steps in events:
        for _ in range(steps):
            accountant.step(noise_multiplier=z, sample_rate=q)
    return float(accountant.get_epsilon(DELTA))


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ end to end


def test_dp_sgd_run_records_each_clients_steps_and_the_report_shows_them(tmp_path: Path) -> None:
    config = smoke_config(*QUICK, "privacy.mode=dp-sgd", "privacy.dp_sgd_params.noise_multiplier=1.1")
    result = simulate(config, tmp_path / "run", progress=False)
    lines = _lines(result.run_dir)
    assert [line["round"] for line in lines] == [1, 2]
    train, _ = load_splits(config)
    sizes = [len(p) for p in client_partitions(config, train)]
    for line in lines:
        assert line["noise_multiplier"] == 0.0 and line["epsilon"] == {"rdp": None}  # no client-level guarantee
        assert sorted(line["sample_level"]) == line["contributors"] == [f"client-{i}" for i in range(4)]
        for i, size in enumerate(sizes):
            assert line["sample_level"][f"client-{i}"] == {
                "noise_multiplier": 1.1, "sample_rate": sample_rate(16, size), "steps": 3,
            }
    report = json.loads(result.report_json.read_text())
    for row, size in zip(report["clients"], sizes):
        assert row["sample_level"]["steps"] == 6 and row["sample_level"]["rounds"] == 2
        expected = opacus_rdp([(1.1, sample_rate(16, size), 6)])
        assert row["sample_level"]["epsilon"]["rdp"] == pytest.approx(expected, rel=1e-3)
    worst = max(row["sample_level"]["epsilon"]["rdp"] for row in report["clients"])
    assert report["sample_level"]["max_epsilon"]["rdp"] == worst
    assert "no-client-level-dp" in {w["code"] for w in report["warnings"]}
    assert "dp-off" not in {w["code"] for w in report["warnings"]}
    page = result.report_html.read_text()
    assert "Sample-level DP (DP-SGD)" in page and "No client-level guarantee" in page
    assert f"{worst:.4f}" in page
    assert all(m["train_loss"] is None for m in result.metrics)  # DP-SGD clients send no loss in the clear


def test_central_with_dp_sgd_shows_both_guarantees(tmp_path: Path) -> None:
    config = smoke_config(*QUICK, "run.rounds=1", "privacy.mode=central", "privacy.dp_sgd=true",
                          "privacy.params.noise_multiplier=1.0")
    result = simulate(config, tmp_path / "run", progress=False)
    (line,) = _lines(result.run_dir)
    assert line["mechanism"] == "central" and line["noise_multiplier"] == 1.0
    assert line["epsilon"]["rdp"] == pytest.approx(4.7285, abs=1e-3)  # one client-level release at z = 1
    assert len(line["sample_level"]) == 4
    report = json.loads(result.report_json.read_text())
    assert report["epsilon"]["final"]["rdp"] == pytest.approx(4.7285, abs=1e-3)
    assert math.isfinite(report["sample_level"]["max_epsilon"]["rdp"])
    assert "sample_level" in report["mechanism"] and "sample_level" in report["stages"]
    page = result.report_html.read_text()
    assert "Final client-level ε" in page and "Sample-level ε (DP-SGD, largest over clients)" in page


# ------------------------------------------------------------------------------ accounting


def test_per_client_sample_level_epsilon_is_opacus_rdp_of_its_own_steps() -> None:
    """Two clients with their own q and participation; rounds the server saw but did not release count too."""
    ledger = [
        {"round": 1, "sample_level": {"a": {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 400},
                                      "b": {"noise_multiplier": 1.0, "sample_rate": 0.2, "steps": 400}}},
        {"round": 3, "sample_level": {"a": {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 400}}},
    ]
    metrics = [{"round": 2, "status": "failed",
                "sample_level": {"a": {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 200}}}]
    clients = [{"client_id": "a"}, {"client_id": "b"}, {"client_id": "c"}]
    section = sample_level_report(stages={}, ledger=ledger, metrics=metrics, clients=clients,
                                  accountants=["rdp"], delta=DELTA)
    assert section is not None and section["unreleased_rounds"] == [2]
    a, b, c = (row["sample_level"] for row in clients)
    assert a["steps"] == 1000 and b["steps"] == 400 and c["steps"] == 0 and c["epsilon"] == {}
    assert a["epsilon"]["rdp"] == pytest.approx(2.1014, rel=1e-3)  # the issue's known answer (z=1, q=0.01, 1000)
    assert a["epsilon"]["rdp"] == pytest.approx(opacus_rdp([(1.0, 0.01, 1000)]), rel=1e-3)
    assert b["epsilon"]["rdp"] == pytest.approx(opacus_rdp([(1.0, 0.2, 400)]), rel=1e-3)
    assert section["max_epsilon"]["rdp"] == b["epsilon"]["rdp"]


def test_the_ledger_checks_sample_level_events_and_reads_lines_without_them(tmp_path: Path) -> None:
    base = {"mechanism": "dp-sgd", "noise_multiplier": 0.0, "sample_rate": 1.0, "steps": 1, "delta": DELTA,
            "epsilon": {"rdp": None}}
    path = tmp_path / "ledger.jsonl"
    path.write_text(chain_lines([{**base, "round": 1}, {**base, "round": 2, "sample_level": {
        "a": {"noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 3}}}]))
    assert len(PrivacyLedger(path).entries()) == 2
    path.write_text(chain_lines([{**base, "round": 1, "sample_level": {
        "a": {"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 3}}}]))
    with pytest.raises(LedgerError, match="line 1.*sample_rate"):
        PrivacyLedger(path).entries()


# ------------------------------------------------------------------------------ clipping and noise


def _tiny(*overrides: str) -> tuple[torch.nn.Module, TextClassification, object]:
    config = smoke_config(*overrides)
    train, _ = load_splits(config)
    workload = TextClassification(config.model, config.peft, train.label_names)
    adapted = workload.build(seed=0)
    for module in adapted.model.modules():  # deterministic forward passes: per-example runs must match the batch
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return adapted.model, workload, workload.prepare(adapted, train)


def _flat_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params]).double()


def test_each_examples_gradient_reaches_the_optimizer_clipped_to_max_grad_norm() -> None:
    model, workload, data = _tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    index = torch.arange(4)
    clip = 1e-3
    per_example = []
    for i in index:  # every example's own gradient, computed without opacus
        model.zero_grad(set_to_none=True)
        model.train()
        workload.loss(model, data.batch(i.reshape(1))).backward()
        per_example.append(_flat_grads(params))
    norms = torch.stack([g.norm() for g in per_example])
    assert (norms > clip).all()  # every example is clipped
    expected = sum(g * min(1.0, clip / (float(n) + 1e-6)) for g, n in zip(per_example, norms))

    seen: list[torch.Tensor] = []
    subset = _Subset(data, index)
    DPSGD(noise_multiplier=0.0, max_grad_norm=clip).train(
        model, workload.loss, subset.batch, len(subset), steps=1, batch_size=4, lr=0.0,  # q = 1: all four
        on_step=lambda ps: seen.append(_flat_grads(list(ps)) * 4),  # the optimizer's grad is the sum / (q n)
    )
    (summed,) = seen
    torch.testing.assert_close(summed, expected, rtol=1e-4, atol=1e-9)
    assert float(summed.norm()) <= 4 * clip * (1 + 1e-6)
    for g, n in zip(per_example, norms):  # and each clipped example is within the bound
        assert float((g * min(1.0, clip / (float(n) + 1e-6))).norm()) <= clip * (1 + 1e-6)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in params)  # hooks removed


def test_the_noise_on_each_step_has_std_noise_multiplier_times_max_grad_norm() -> None:
    model, workload, data = _tiny()
    subset = _Subset(data, torch.arange(4))
    params = [p for p in model.parameters() if p.requires_grad]
    clean: list[torch.Tensor] = []
    DPSGD(noise_multiplier=0.0, max_grad_norm=0.5).train(
        model, workload.loss, subset.batch, 4, steps=1, batch_size=4, lr=0.0,
        on_step=lambda ps: clean.append(_flat_grads(list(ps)) * 4))
    noisy: list[torch.Tensor] = []
    DPSGD(noise_multiplier=2.0, max_grad_norm=0.5).train(
        model, workload.loss, subset.batch, 4, steps=3, batch_size=4, lr=0.0,
        on_step=lambda ps: noisy.append(_flat_grads(list(ps)) * 4 - clean[0]))
    noise = torch.cat(noisy).numpy()
    assert noise.size > 3000
    assert abs(noise.mean()) < 4 * 1.0 / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(2.0 * 0.5, rel=0.06)
    assert len({float(n[0]) for n in noisy}) == 3  # fresh noise every step
    assert params


class _Subset:
    """The first examples of prepared data, as batches (DP-SGD samples from these only)."""

    def __init__(self, data: object, index: torch.Tensor) -> None:
        self.data, self.index = data, index

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, index: torch.Tensor) -> object:
        return self.data.batch(self.index[index])  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ refusals


def test_lora_on_an_embedding_is_refused_at_start_naming_the_keys(tmp_path: Path) -> None:
    """peft keeps an Embedding's LoRA factors in a ParameterDict, which opacus never sees in a forward pass."""
    from secure_fl.server.engine import FederatedServer

    config = smoke_config("privacy.mode=dp-sgd", "peft.target_modules=['word_embeddings']")
    train, _ = load_splits(config)
    with pytest.raises(ConfigError, match=r"peft\.target_modules.*peft\.modules_to_save") as caught:
        LocalTrainer.from_config(config, client_partitions(config, train)[0])
    assert "lora_embedding_A" in str(caught.value) and "privacy" in str(caught.value)
    with pytest.raises(ConfigError, match=r"peft\.target_modules"):  # the server refuses it before round 1 too
        FederatedServer(config, tmp_path / "run", transport="in-process")
    # the same model trains without DP-SGD
    plain = smoke_config("peft.target_modules=['word_embeddings']")
    assert LocalTrainer.from_config(plain, client_partitions(plain, train)[0]).sample_rate is None


@pytest.mark.parametrize(("overrides", "key"), [
    (["privacy.dp_sgd=true"], "privacy.dp_sgd"),  # with mode none: use mode dp-sgd
    (["privacy.dp_sgd_params.noise_multiplier=1.0"], "privacy.dp_sgd_params"),  # settings while off
    (["privacy.mode=dp-sgd", "privacy.dp_sgd_params.noise_multiplier=-1"], "privacy.dp_sgd_params.noise_multiplier"),
    (["privacy.mode=dp-sgd", "privacy.dp_sgd_params.max_grad_norm=0"], "privacy.dp_sgd_params.max_grad_norm"),
    (["privacy.mode=dp-sgd", "privacy.dp_sgd_params.clip=1"], "privacy.dp_sgd_params.clip"),
])
def test_bad_dp_sgd_settings_are_refused_naming_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        smoke_config(*overrides)
    assert caught.value.key == key


def test_mode_dp_sgd_turns_dp_sgd_on_in_the_resolved_config() -> None:
    config = smoke_config("privacy.mode=dp-sgd")
    assert config.privacy.dp_sgd is True and config.to_dict()["privacy"]["dp_sgd"] is True


def test_dp_sgd_settings_are_part_of_the_privacy_fingerprint() -> None:
    base = Stages.from_config(smoke_config("privacy.mode=central")).fingerprint()
    assert base == Stages.from_config(smoke_config("privacy.mode=central")).fingerprint()
    on = Stages.from_config(smoke_config("privacy.mode=central", "privacy.dp_sgd=true")).fingerprint()
    other_z = Stages.from_config(smoke_config("privacy.mode=central", "privacy.dp_sgd=true",
                                              "privacy.dp_sgd_params.noise_multiplier=2.0")).fingerprint()
    other_steps = Stages.from_config(smoke_config("privacy.mode=central", "privacy.dp_sgd=true",
                                                  "client.local_steps=4")).fingerprint()
    assert len({base["privacy"], on["privacy"], other_z["privacy"], other_steps["privacy"]}) == 4
    assert base["secure"] == on["secure"] and base["rule"] == on["rule"]


def test_join_requires_a_valid_sampling_rate_under_dp_sgd() -> None:
    admission = Admission(run_id="r", model_fingerprint="m", model_info={}, stage_fingerprints={}, max_weight=1e9,
                          sample_level=True)

    def join(info: dict[str, str]) -> pb.JoinRequest:
        return pb.JoinRequest(envelope=pb.Envelope(client_id="c1"), info=info)

    assert admission.sample_rate(join({SAMPLE_RATE_INFO_KEY: "0.25"})) == 0.25
    with pytest.raises(Refused, match=SAMPLE_RATE_INFO_KEY):
        admission.sample_rate(join({}))
    for bad in ("0", "1.5", "nan", "x"):
        with pytest.raises(MalformedMessage, match=SAMPLE_RATE_INFO_KEY):
            admission.sample_rate(join({SAMPLE_RATE_INFO_KEY: bad}))
    assert Admission(run_id="r", model_fingerprint="m", model_info={}, stage_fingerprints={},
                     max_weight=1e9).sample_rate(join({})) is None


def test_sample_rate_is_batch_size_over_examples_capped_at_one() -> None:
    assert sample_rate(16, 64) == 0.25 and sample_rate(16, 4) == 1.0
    with pytest.raises(ValueError):
        sample_rate(16, 0)
    assert np.isclose(sample_rate(3, 7), 3 / 7)


def test_join_refuses_a_client_with_other_dp_sgd_settings_naming_the_table() -> None:
    from protocols.wire.limits import PROTOCOL_VERSION
    from secure_fl.client.client import ClientStages

    server = Stages.from_config(smoke_config("privacy.mode=dp-sgd")).fingerprint()
    admission = Admission(run_id="r", model_fingerprint="m", model_info={}, stage_fingerprints=server, max_weight=1e9,
                          sample_level=True)
    client = ClientStages.from_config(smoke_config("privacy.mode=dp-sgd", "privacy.dp_sgd_params.max_grad_norm=2.0"))
    request = pb.JoinRequest(envelope=pb.Envelope(client_id="c1"), protocol_version=PROTOCOL_VERSION,
                             model_fingerprint="m", num_examples=5,
                             info={**client.join_info(), SAMPLE_RATE_INFO_KEY: "0.5"})
    with pytest.raises(Refused, match=r"privacy with other settings.*\[privacy\.dp_sgd_params\], client\.local_steps"):
        admission.check(request)


def test_a_failed_round_still_counts_the_dp_sgd_outputs_the_server_saw(tmp_path: Path) -> None:
    """plain mode, min_updates = 4 and one client gone before its upload: the round fails and
    releases nothing, but the server saw three DP-SGD updates, which count at sample level."""
    from secure_fl.audit import audit
    from tests.harness import in_process_parties, step_all

    config = smoke_config("privacy.mode=dp-sgd", "run.rounds=1", "run.min_updates=4", "client.local_steps=2",
                          'privacy.accountants=["rdp"]', "data.synthetic_examples=160")
    server, clients = in_process_parties(config, tmp_path / "run", {3: (1, "update")})
    result = step_all(server, clients).result()
    (record,) = result.metrics
    assert record["status"] == "failed" and not (result.run_dir / "ledger.jsonl").exists()
    assert sorted(record["sample_level"]) == ["client-0", "client-1", "client-2"]
    assert {e["steps"] for e in record["sample_level"].values()} == {2}
    report = audit(result.run_dir).data
    assert report["sample_level"]["unreleased_rounds"] == [1]
    rows = {row["client_id"]: row["sample_level"] for row in report["clients"]}
    assert rows["client-0"]["steps"] == 2 and rows["client-3"]["steps"] == 0
    assert "sample-level-unreleased" in {w["code"] for w in report["warnings"]}


def test_a_dp_sgd_client_refuses_a_plan_with_other_steps_than_it_declared() -> None:
    from secure_fl.errors import RunError
    from secure_fl.models import trainable_state

    config = smoke_config("privacy.mode=dp-sgd", "client.local_steps=2")
    train, _ = load_splits(config)
    trainer = LocalTrainer.from_config(config, client_partitions(config, train)[0])
    assert trainer.join_info()[SAMPLE_RATE_INFO_KEY] == repr(sample_rate(16, trainer.num_examples))
    state = trainable_state(trainer.adapted.model)
    with pytest.raises(RunError, match="client.local_steps=2"):
        trainer.train(state, {"local_steps": 5, "batch_size": 16, "lr": 0.01}, seed=1)
    message, metrics = trainer.train(state, {"local_steps": 2, "batch_size": 16, "lr": 0.01}, seed=1)
    assert metrics == {} and any(np.abs(v).max() > 0 for v in message.values())  # it trained, and reports no loss
