"""The public Python API: user workloads and datasets, callbacks, the getting-started page."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import LoraConfig

import secure_fl
from tests.conftest import smoke_config

ROOT = Path(__file__).resolve().parent.parent


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 16)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(x)))


def _pairs(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = (rng.normal(size=(n, 4)) + 2.0 * y[:, None]).astype(np.float32)
    return [(torch.from_numpy(x[i]), torch.tensor(int(y[i]))) for i in range(n)]


def _workload(**kwargs: Any) -> secure_fl.CustomWorkload:
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"], modules_to_save=["head"])
    return secure_fl.CustomWorkload(TinyNet, peft_config=lora, **kwargs)


def _config(rounds: int = 2) -> secure_fl.Config:
    return secure_fl.Config(
        run=secure_fl.RunConfig(rounds=rounds, num_clients=3, clients_per_round=3),
        client=secure_fl.ClientConfig(local_steps=5, batch_size=8, lr=0.05),
    )


def test_custom_model_with_lists_of_examples_learns(tmp_path: Path) -> None:
    result = secure_fl.simulate(
        _config(3), tmp_path, workload=_workload(), client_datasets=[_pairs(40, s) for s in range(3)],
        eval_dataset=_pairs(100, 9), progress=False,
    )
    assert [r["clients"] for r in result.metrics] == [3, 3, 3]
    assert result.final_accuracy is not None and result.final_accuracy > 0.8
    assert (result.adapter_dir / "adapter_config.json").exists()


def test_client_count_follows_the_datasets(tmp_path: Path) -> None:
    result = secure_fl.simulate(
        _config(1), tmp_path, workload=_workload(), client_datasets=[_pairs(20, s) for s in range(2)], progress=False
    )
    assert result.metrics[0]["clients"] == 2 and result.metrics[0]["accuracy"] is None  # no eval set given


def test_hf_datasets_with_collate_and_metric(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")

    def to_hf(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        return datasets.Dataset.from_dict({"x": [p[0].tolist() for p in pairs], "label": [int(p[1]) for p in pairs]})

    def collate(rows: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([r["x"] for r in rows]), torch.tensor([r["label"] for r in rows])

    def recall_of_one(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"recall_1": float(((logits.argmax(-1) == 1) & (labels == 1)).sum() / max((labels == 1).sum(), 1))}

    result = secure_fl.simulate(
        _config(2), tmp_path, workload=_workload(collate_fn=collate, metric_fn=recall_of_one),
        client_datasets=[to_hf(_pairs(30, s)) for s in range(3)], eval_dataset=to_hf(_pairs(60, 9)), progress=False,
    )
    assert "recall_1" in result.metrics[-1] and 0.0 <= result.metrics[-1]["recall_1"] <= 1.0


def test_custom_loss_fn_is_used(tmp_path: Path) -> None:
    calls = {"n": 0}

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    secure_fl.simulate(_config(1), tmp_path, workload=_workload(loss_fn=loss_fn),
                       client_datasets=[_pairs(20, s) for s in range(3)], progress=False)
    assert calls["n"] == 3 * 5  # three clients, five local steps each


def test_callbacks_see_every_round_and_early_stopping_stops(tmp_path: Path) -> None:
    seen: list[int] = []

    class Recorder(secure_fl.Callback):
        def __init__(self) -> None:
            self.cohorts: list[int] = []

        def on_round_start(self, round_number: int, cohort: Any) -> None:
            self.cohorts.append(len(cohort))

    recorder = Recorder()
    never_improves = secure_fl.EarlyStopping("accuracy", patience=1, min_delta=10.0)  # nothing beats +10
    result = secure_fl.simulate(
        smoke_config("run.rounds=5"), tmp_path, progress=False,
        callbacks=[lambda record: seen.append(record["round"]), recorder, never_improves],
    )
    # round 1 sets the baseline, round 2 is stale -> stop after 2 of 5 rounds
    assert [r["round"] for r in result.metrics] == [1, 2] == seen
    assert recorder.cohorts == [4, 4]


def test_early_stopping_validates_arguments() -> None:
    with pytest.raises(secure_fl.ConfigError, match="mode"):
        secure_fl.EarlyStopping(mode="up")
    with pytest.raises(secure_fl.ConfigError, match="patience"):
        secure_fl.EarlyStopping(patience=0)


def test_misuse_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(secure_fl.ConfigError, match="together"):
        secure_fl.simulate(_config(), tmp_path, workload=_workload())
    with pytest.raises(secure_fl.ConfigError, match="empty"):
        secure_fl.simulate(_config(), tmp_path, workload=_workload(), client_datasets=[])
    with pytest.raises(secure_fl.ModelError, match="no trainable parameters"):
        frozen = secure_fl.CustomWorkload(lambda: TinyNet().requires_grad_(False))
        secure_fl.simulate(_config(), tmp_path, workload=frozen, client_datasets=[_pairs(5, 0)] * 3)


def test_getting_started_page_runs_as_written(tmp_path: Path) -> None:
    """The first Python block of docs/index.md, verbatim, in a fresh interpreter, run twice in the
    same directory (a second run must not trip over the first one's run directory); the second
    time followed by the page's reload block, whose model must score what the server scored."""
    text = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]
    reload = re.search(r"## Reloading the adapter.*?```python\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]
    check = (
        "held_out = party(300, 99)\n"
        "with torch.no_grad():\n"
        "    reloaded = (model(held_out.tensors[0]).argmax(-1) == held_out.tensors[1]).float().mean().item()\n"
        "print('reloaded', reloaded, result.final_accuracy)\n"
    )
    for script in (code, code + reload + check):
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    accuracy = float(done.stdout.strip().splitlines()[-2].split()[0])  # the example prints it last
    assert accuracy > 0.8
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if (p / "adapter").is_dir())
    assert len(runs) == 2, runs
    _, reloaded, final = done.stdout.strip().splitlines()[-1].split()
    assert float(reloaded) == pytest.approx(float(final), abs=1e-6)


def test_public_names_resolve() -> None:
    for name in secure_fl.__all__:
        assert getattr(secure_fl, name) is not None, name


def test_federated_evaluation_without_server_data(tmp_path: Path) -> None:
    """Clients score the received adapter on held-out local data; the server only sees means."""
    config = _config(3).with_overrides(["client.eval_fraction=0.25"])
    result = secure_fl.simulate(
        config, tmp_path, workload=_workload(), client_datasets=[_pairs(40, s) for s in range(3)], progress=False
    )
    for record in result.metrics:
        assert record["accuracy"] is None  # the server holds no data
        assert record["fed_eval_examples"] == 3 * 10  # 25% of 40 per client
        assert 0.0 <= record["fed_eval_accuracy"] <= 1.0
    # the adapter learns, as measured on the clients' held-out data
    # round 1 scores the untrained initial adapter, round 3 the adapter after two rounds of training
    assert result.metrics[-1]["fed_eval_accuracy"] > 0.8
    assert result.metrics[-1]["fed_eval_accuracy"] > result.metrics[0]["fed_eval_accuracy"]


def test_held_out_examples_are_not_trained_on() -> None:
    from secure_fl.client.trainer import split_local

    data = list(range(50))
    train, held = split_local(data, 0.2, seed=3)
    train_items, held_items = [train[i] for i in range(len(train))], [held[i] for i in range(len(held))]
    assert len(held_items) == 10 and sorted(train_items + held_items) == data
    assert set(train_items).isdisjoint(held_items)
    assert split_local(data, 0.0, seed=3) == (data, None)


def test_transformers_model_with_dict_examples(tmp_path: Path) -> None:
    """A transformers model from a factory; dict examples; the model's own .loss is used."""
    from peft import TaskType
    from transformers import BertConfig, BertForSequenceClassification

    def factory() -> torch.nn.Module:
        return BertForSequenceClassification(
            BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=2, initializer_range=0.2)
        )

    def examples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            label = int(rng.integers(0, 2))
            ids = rng.integers(10 + 20 * label, 30 + 20 * label, size=8)  # label-dependent vocabulary
            out.append({"input_ids": torch.tensor(ids), "attention_mask": torch.ones(8, dtype=torch.long),
                        "labels": torch.tensor(label)})
        return out

    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])
    result = secure_fl.simulate(
        _config(3), tmp_path, workload=secure_fl.CustomWorkload(factory, peft_config=lora),
        client_datasets=[examples(40, s) for s in range(3)], eval_dataset=examples(60, 9), progress=False,
    )
    assert result.final_accuracy is not None and result.final_accuracy > 0.8
    assert (result.adapter_dir / "adapter_model.safetensors").exists()


def test_a_rule_that_sends_a_subset_is_honoured_by_every_client(tmp_path: Path) -> None:
    """Clients derive what travels from the configured rule, so server and clients agree."""
    from secure_fl.peft_agg.fedit import FedIT
    from secure_fl.peft_agg.registry import _RULES

    class HeadOnly(FedIT):
        name = "head-only-test"

        def update_keys(self, trainable: Any) -> list[str]:
            return [name for name in trainable if "classifier" in name]

    secure_fl.register_rule("head-only-test", HeadOnly)
    try:
        full = secure_fl.simulate(smoke_config("run.rounds=1"), tmp_path / "full", progress=False)
        head = secure_fl.simulate(smoke_config("run.rounds=1", "peft.rule=head-only-test"), tmp_path / "head", progress=False)
    finally:
        _RULES._entries.pop("head-only-test", None)
    assert head.metrics[0]["status"] == "ok" and head.metrics[0]["stages"]["rule"] == "head-only-test"
    assert head.metrics[0]["bytes_up"] < full.metrics[0]["bytes_up"] / 2  # only the classifier travelled
