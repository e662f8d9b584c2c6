"""The reference docs build without broken references; the code base passes mypy --strict."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PACKAGES = ["secure_fl", "privacy", "robustness", "protocols"]  # strict on everything but generated stubs


def test_docs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocstrings")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "simulate" in api and "CustomWorkload" in api and "register" not in api.split("<body")[0]


def test_code_base_passes_mypy_strict() -> None:
    pytest.importorskip("mypy")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", *PACKAGES],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_readme_config_table_lists_every_key() -> None:
    from dataclasses import fields

    from secure_fl.config import _SECTIONS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = []
    for section, cls in _SECTIONS.items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| `[{section}]` |"))
        missing += [f"{section}.{f.name}" for f in fields(cls) if f"`{f.name}`" not in row]
    assert not missing, f"README config table lacks {missing}"
    assert "--explain" in readme


def test_config_explain_prints_value_default_and_meaning() -> None:
    import tomllib
    from dataclasses import fields

    from secure_fl.config import _SECTIONS, load_preset

    done = subprocess.run(
        [sys.executable, "-m", "secure_fl.cli", "config", "--preset", "smoke", "--explain", "--set", "client.lr=0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert tomllib.loads(text) == load_preset("smoke").with_overrides(["client.lr=0.5"]).to_dict()  # still valid TOML
    for section, cls in _SECTIONS.items():
        block = text.split(f"[{section}]\n", 1)[1].split("\n\n", 1)[0]
        for f in fields(cls):
            line = next((line for line in block.splitlines() if line.startswith(f"{f.name} = ")), "")
            assert f"# {f.metadata['help']} (default: " in line, f"{section}.{f.name}: {line!r}"
    assert "lr = 0.5  # AdamW learning rate (default: 0.001) [changed]" in text
    assert "eval_fraction = 0.0  # share of each client's data held out" in text
    plain = subprocess.run(
        [sys.executable, "-m", "secure_fl.cli", "config", "--preset", "smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert plain.returncode == 0 and "#" not in plain.stdout  # without --explain: values only, as before


def test_every_metrics_key_is_documented(tmp_path: Path) -> None:
    from secure_fl.simulation import simulate
    from tests.conftest import smoke_config

    result = simulate(smoke_config("run.rounds=1", "client.eval_fraction=0.25"), tmp_path, progress=False)
    keys = {key for record in result.metrics for key in record}
    keys |= {"reason", "updates_discarded"}  # failed and interrupted rounds
    concepts = (ROOT / "docs" / "concepts.md").read_text(encoding="utf-8")
    table = concepts.split("## The metrics record", 1)[1].split("\n## ", 1)[0]
    documented = {m for row in table.splitlines() if row.startswith("| `") for m in re.findall(r"`([a-z_]+)`", row.split(" | ")[0])}
    assert "buckets" in keys and "fed_eval_accuracy" in keys
    assert not keys - documented, f"undocumented metrics.jsonl keys: {sorted(keys - documented)}"
