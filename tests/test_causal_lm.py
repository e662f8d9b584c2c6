"""Causal-LM fine-tuning (``model.task = "causal-lm"``): data, masking, simulation, gRPC, reload."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from secure_fl.client.client import ClientStages, FederatedClient
from secure_fl.client.trainer import LocalTrainer
from secure_fl.config import Config, load_preset
from secure_fl.data import DataError, InstructionDataset, load_instruction_file, make_synthetic_instructions
from secure_fl.data.sources import client_dataset, load_eval_set, load_splits
from secure_fl.errors import ConfigError
from secure_fl.models import load_adapter, load_tokenizer
from secure_fl.simulation import simulate
from secure_fl.tasks import IGNORE_INDEX, CausalLanguageModeling, encode_prompt, special_ids
from secure_fl.transport.grpc_client import GrpcTransport
from secure_fl.workload import CausalLM, config_workload


def clm_config(*overrides: str) -> Config:
    """The causal-LM smoke preset with test-friendly overrides applied."""
    return load_preset("smoke-clm").with_overrides(overrides)


def write_jsonl(path: Path, dataset: InstructionDataset, *, plain: tuple[str, ...] = ()) -> Path:
    """Write ``dataset`` as prompt/response lines, then ``plain`` as text lines."""
    lines = [json.dumps({"prompt": p, "response": r}) for p, r in zip(dataset.prompts, dataset.responses)]
    lines += [json.dumps({"text": t}) for t in plain]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- tokenisation and masking


def test_prompt_tokens_are_masked_out_of_the_labels() -> None:
    tokenizer = load_tokenizer(clm_config().model)
    start, end, _ = special_ids(tokenizer)
    data = InstructionDataset(("which topic: football goal answer:", ""), ("the topic is sports", "plain text here"))
    encoded = CausalLanguageModeling().encode(tokenizer, data, max_length=64)
    prompt = tokenizer("which topic: football goal answer:", add_special_tokens=False)["input_ids"]
    response = tokenizer("the topic is sports", add_special_tokens=False)["input_ids"]
    plain = tokenizer("plain text here", add_special_tokens=False)["input_ids"]
    n0 = 1 + len(prompt) + len(response) + 1
    assert encoded.lengths.tolist() == [n0, 1 + len(plain) + 1]
    ids, labels = encoded.input_ids[0, :n0].tolist(), encoded.labels[0].tolist()
    assert ids == [start, *prompt, *response, end]
    # instruction example: start token and prompt masked, response and end token kept, padding masked
    assert labels[: 1 + len(prompt)] == [IGNORE_INDEX] * (1 + len(prompt))
    assert labels[1 + len(prompt) : n0] == [*response, end]
    assert all(v == IGNORE_INDEX for v in labels[n0:])
    # plain text: only the start token is masked
    assert encoded.labels[1, : 1 + len(plain) + 1].tolist() == [IGNORE_INDEX, *plain, end]
    assert encoded.target_tokens == len(response) + 1 + len(plain) + 1


def test_loss_counts_only_response_tokens() -> None:
    """The task's loss equals cross-entropy over the response positions alone, computed by hand."""
    config = clm_config()
    workload = CausalLM(config.model, config.peft)
    adapted = workload.build(seed=0)
    adapted.model.eval()  # GPT-2's own dropout off
    data = InstructionDataset(("which topic: rain snow answer:", "which topic: bank stock answer:"),
                              ("the topic is weather", "the topic is finance"))
    encoded = workload.prepare(adapted, data)
    batch = encoded.batch(torch.arange(2))
    task = CausalLanguageModeling()
    with torch.no_grad():
        loss = float(task.loss(adapted.model, batch))
        logits = adapted.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tokenizer = adapted.tokenizer
    terms = []
    for row in range(2):
        prompt = encode_prompt(tokenizer, data.prompts[row])
        target = tokenizer(data.responses[row], add_special_tokens=False)["input_ids"] + [special_ids(tokenizer)[1]]
        for k, token in enumerate(target):
            position = len(prompt) + k - 1  # the logits that predict token k of the response
            terms.append(float(-torch.log_softmax(logits[row, position], -1)[token]))
    assert loss == pytest.approx(float(np.mean(terms)), rel=1e-5)
    # changing a prompt token changes the context, never what is scored: the counted positions stay
    other = InstructionDataset(("which topic: rain rain answer:", data.prompts[1]), data.responses)
    assert workload.prepare(adapted, other).target_tokens == encoded.target_tokens


def test_truncation_keeps_prompt_and_drops_late_response_tokens() -> None:
    tokenizer = load_tokenizer(clm_config().model)
    data = InstructionDataset(("one two three four five six",), ("seven eight nine",))
    encoded = CausalLanguageModeling().encode(tokenizer, data, max_length=9)
    assert encoded.lengths.tolist() == [9]
    assert int((encoded.labels[0] != IGNORE_INDEX).sum()) == 2  # 1 + 6 prompt tokens, 2 of the response


# ----------------------------------------------------------------------------- data files and config


def test_jsonl_loader_reads_instructions_and_text(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", make_synthetic_instructions(6, seed=1), plain=("just some text",))
    data = load_instruction_file(path)
    assert len(data) == 7 and data.prompts[-1] == "" and data.responses[-1] == "just some text"
    assert data.prompts[0].startswith("which topic:") and data.responses[0].startswith("the topic is ")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"question": "q", "answer": "a"}', "expected 'prompt' and 'response' (instruction tuning) or 'text'"),
        ('{"prompt": "q"}', "has 'prompt' but no 'response'"),
        ('{"prompt": "q", "response": ""}', "'response' must be a non-empty string"),
        ('{"text": 3}', "'text' must be a non-empty string"),
        ('{"prompt": 1, "response": "a"}', "'prompt' must be a string"),
        ('["prompt", "response"]', "expected a JSON object"),
        ('{"prompt": "q", "response": "a"', "bad JSON"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "response": "r"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_instruction_file(path)
    assert f"{path}: line 3:" in str(info.value)
    assert expected in str(info.value)


def test_malformed_jsonl_refused_through_the_config(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"body": "no"}\n', encoding="utf-8")
    config = clm_config("data.dataset='file'", f"data.path='{path}'")
    with pytest.raises(DataError, match=rf"{path}: line 3: expected 'prompt' and 'response'"):
        load_splits(config)


def test_custom_keys_are_read(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "say hi", "output": "hi"}\n{"body": "text"}\n', encoding="utf-8")
    config = clm_config("data.dataset='file'", f"data.path='{path}'", "data.prompt_column='instruction'",
                        "data.response_column='output'", "data.text_column='body'", "data.test_fraction=0.5")
    train, test = load_splits(config)
    assert sorted(train.responses + test.responses) == ["hi", "text"]


def test_causal_lm_peft_defaults_fill_only_missing_keys() -> None:
    config = Config.from_dict({"model": {"name": "tiny-gpt2", "task": "causal-lm"}})
    assert config.peft.target_modules == ("c_attn",) and config.peft.modules_to_save == ()
    config = Config.from_dict({"model": {"name": "tiny-gpt2", "task": "causal-lm"}, "peft": {"target_modules": ["c_proj"]}})
    assert config.peft.target_modules == ("c_proj",)
    assert Config.from_dict({}).peft.target_modules == ("query", "value")  # seq-cls unchanged


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (("model.name='tiny-bert'",), "model.name"),
        (("model.task='seq-cls'",), "model.task"),
        (("peft.modules_to_save=['classifier']",), "peft.modules_to_save"),
        (("data.label_names=['a', 'b']",), "data.label_names"),
        (("data.dataset='file'", "data.path='train.csv'"), "data.path"),
        (("data.prompt_column='text'",), "data.prompt_column"),
        (("data.response_column=''",), "data.response_column"),
        (("attack.kind='label-flip'", "attack.fraction=0.25"), "attack.kind"),
    ],
)
def test_causal_lm_config_errors_name_the_key(overrides: tuple[str, ...], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        clm_config(*overrides)
    assert info.value.key == key and str(info.value).startswith(f"{key}:")


# ----------------------------------------------------------------------------- federated runs


def test_simulation_trains_and_reports_perplexity(tmp_path: Path) -> None:
    config = clm_config("run.rounds=3", "run.num_clients=2", "run.clients_per_round=2", "client.local_steps=6",
                        "client.eval_fraction=0.2")
    result = simulate(config, tmp_path / "run", progress=False)
    losses = [r["loss"] for r in result.metrics]
    assert all(r["status"] == "ok" and "accuracy" not in r for r in result.metrics)
    assert losses[0] > losses[1] > losses[2], losses
    for record in result.metrics:
        assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
    # federated evaluation: clients score the adapter they received; perplexity is exp of the mean loss
    later = result.metrics[-1]
    assert later["fed_eval_perplexity"] == pytest.approx(math.exp(later["fed_eval_loss"]))
    assert later["fed_eval_loss"] < result.metrics[0]["fed_eval_loss"]
    assert result.final_accuracy is None and result.final_perplexity == pytest.approx(result.metrics[-1]["perplexity"])
    assert result.headline.startswith("perplexity ")
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [x["perplexity"] for x in lines] == [r["perplexity"] for r in result.metrics]
    report = result.report
    assert report is not None
    assert report["run"]["final_perplexity"] == pytest.approx(result.final_perplexity)
    assert [p["perplexity"] for p in report["perplexity"]] == pytest.approx([r["perplexity"] for r in result.metrics])
    html = Path(str(result.report_html)).read_text(encoding="utf-8")
    assert "Final perplexity:" in html and "Perplexity over rounds" in html


def test_grpc_two_clients_and_the_saved_adapter_reloads(tmp_path: Path, grpc_server) -> None:
    """One server and two clients over real gRPC on a JSONL file; the adapter reloads with plain peft."""
    data = make_synthetic_instructions(96, seed=3)
    path = write_jsonl(tmp_path / "train.jsonl", data, plain=tuple(f"plain text number {i} of the set" for i in range(8)))
    config = clm_config(
        "run.num_clients=2", "run.clients_per_round=2", "run.rounds=2", "client.local_steps=4",
        "data.dataset='file'", f"data.path='{path}'",
    )
    running = grpc_server(config)
    clients = [
        FederatedClient(f"client-{i}", GrpcTransport(running.address), LocalTrainer.from_config(config, client_dataset(config, i)),
                        ClientStages.from_config(config), seed=config.run.seed, chunk_size=4096)
        for i in range(2)
    ]
    threads = [threading.Thread(target=c.run, kwargs={"connect_timeout": 30}) for c in clients]
    for t in threads:
        t.start()
    result = running.result(timeout=300)
    for t in threads:
        t.join(30)
    assert [r["status"] for r in result.metrics] == ["ok", "ok"] and all(r["clients"] == 2 for r in result.metrics)
    assert result.metrics[1]["loss"] < result.metrics[0]["loss"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = result.adapter_dir
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(result.run_dir / "base_model")), str(adapter))
    reloaded.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    _, eval_set = load_eval_set(config)
    encoded = CausalLanguageModeling().encode(tokenizer, eval_set, max_length=config.model.max_length)
    metrics = CausalLanguageModeling().evaluate(reloaded, encoded, batch_size=16)
    assert metrics["loss"] == pytest.approx(result.metrics[-1]["loss"], abs=1e-5)
    assert metrics["perplexity"] == pytest.approx(result.metrics[-1]["perplexity"], rel=1e-5)
    # logits of the reloaded adapter equal the server's global adapter in a freshly built model
    workload = config_workload(config, ())
    live = workload.build(seed=config.run.seed)
    from secure_fl.models import load_trainable_state

    load_trainable_state(live.model, result.global_state)
    live.model.eval()
    batch = encoded.batch(torch.arange(8))
    with torch.no_grad():
        a = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = live.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # secure-fl's own loader picks AutoModelForCausalLM too, and generation continues a prompt
    model, tok, labels = load_adapter(adapter)
    assert labels == ("text",)
    ids = torch.tensor([encode_prompt(tok, data.prompts[0])])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1] and torch.equal(out[0, : ids.shape[1]], ids[0])


def test_cli_and_console_lines_report_perplexity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from secure_fl.cli import main
    from secure_fl.progress import format_record

    out = tmp_path / "run"
    code = main(["simulate", "--preset", "smoke-clm", "--out", str(out), "--set", "run.rounds=1",
                 "--set", "run.num_clients=2", "--set", "run.clients_per_round=2", "--set", "client.local_steps=2"])
    assert code == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert f"final perplexity {record['perplexity']:.4g};" in printed and "accuracy" not in printed
    line = format_record(record, 1)
    assert f"ppl {record['perplexity']:.4g}" in line and " acc " not in line
    # a seq-cls record keeps its accuracy-only line
    assert format_record({"round": 1, "accuracy": 0.5, "loss": 1.0}, 1) == "round 1/1 | acc 0.5000 | loss 1.0000"
