"""Model sources: a local transformers checkpoint directory works like the built-in models."""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_fl.errors import ModelError
from secure_fl.models import build_base_model, load_adapter, load_tokenizer
from secure_fl.simulation import simulate
from tests.conftest import smoke_config


def test_local_checkpoint_directory(tmp_path: Path) -> None:
    config = smoke_config()
    tokenizer = load_tokenizer(config.model)
    base = build_base_model(config.model, num_labels=4, seed=123, vocab_size=len(tokenizer))
    checkpoint = tmp_path / "my-bert"
    base.save_pretrained(str(checkpoint))
    tokenizer.save_pretrained(str(checkpoint))

    local = config.with_overrides([f"model.name={str(checkpoint)!r}", "run.rounds=1"])
    result = simulate(local, tmp_path / "run", progress=False)
    assert result.metrics[0]["status"] == "ok" and result.metrics[0]["accuracy"] is not None
    model, _, labels = load_adapter(result.adapter_dir)
    assert len(labels) == 4 and model is not None


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    config = smoke_config(f"model.name='{tmp_path / 'nope'}'")
    with pytest.raises(ModelError, match="never downloads"):
        simulate(config, tmp_path / "run", progress=False)


def test_concurrent_builds_in_threads_agree() -> None:
    """Seeded builds in parallel threads (server + clients in one process) give identical models."""
    import threading

    from secure_fl.models import build_model, model_fingerprint

    config = smoke_config()
    prints: list[str] = []

    def build() -> None:
        adapted = build_model(config.model, config.peft, num_labels=4, seed=7)
        prints.append(model_fingerprint(adapted.model))

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(prints) == 4 and len(set(prints)) == 1
