"""Docstrings use markup the API reference (mkdocs + mkdocstrings, numpy style) renders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SOURCES = ["secure_fl", "privacy", "robustness", "protocols", "benchmarks", "examples", "tests"]

#: A Sphinx cross-reference role (``:class:``, ``:func:``, ... before a back-quoted name): mkdocstrings shows it literally.
SPHINX_ROLE = re.compile(r":(?:py:)?(?:class|attr|func|meth|mod|data|exc|obj|const|ref):`")


def _python_files() -> list[Path]:
    return [path for name in SOURCES if (ROOT / name).is_dir() for path in sorted((ROOT / name).rglob("*.py"))]


def test_no_sphinx_roles_in_sources() -> None:
    hits = []
    for path in _python_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if SPHINX_ROLE.search(line) and path.name != "test_docs_markup.py":
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "Sphinx roles render literally in mkdocs; use `Name` instead:\n" + "\n".join(hits)


def test_no_sphinx_roles_in_markdown_docs() -> None:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    hits = [str(p.relative_to(ROOT)) for p in docs if SPHINX_ROLE.search(p.read_text(encoding="utf-8"))]
    assert not hits


def test_server_eval_dataset_is_documented_with_its_own_type() -> None:
    griffe = pytest.importorskip("griffe")
    module = griffe.load("secure_fl.api", search_paths=[str(ROOT)])
    server = module["Server"]
    parsed = server.docstring.parse("numpy")
    params = {
        param.name: param
        for section in parsed if section.kind.value == "parameters"
        for param in section.value
    }
    assert "eval_dataset" in params, sorted(params)
    assert "Workload" not in str(params["eval_dataset"].annotation)
