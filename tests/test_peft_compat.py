"""The rule x secure mode x privacy mode matrix: computed from the start-time checks, documented as computed.

docs/peft.md holds the table `matrix_markdown` prints between two markers; this test regenerates
it, so a change to what the code refuses fails here until the documentation says the same.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from secure_fl.peft_agg.compat import PRIVACY_MODES, SECURE_MODES, compatibility, matrix_markdown
from secure_fl.peft_agg.registry import available

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"


@pytest.fixture(scope="module")
def cells():
    return compatibility()


def test_every_built_in_rule_is_in_the_matrix(cells) -> None:
    assert {c.rule for c in cells} == set(available())
    assert len(cells) == len(available()) * len(SECURE_MODES) * len(PRIVACY_MODES)


def test_every_refusal_names_the_key_it_is_about(cells) -> None:
    refused = [c for c in cells if not c.accepted]
    assert refused, "some combination must be refused (rank-vote under ckks, distributed DP in plain mode)"
    for cell in refused:
        assert cell.key and cell.key.split(".")[0] in ("peft", "secure", "privacy", "robustness"), cell
        assert cell.key.split(".params")[0] in cell.reason or cell.key in cell.reason, cell


def test_the_documented_matrix_is_the_computed_one(cells) -> None:
    text = (ROOT / "docs" / "peft.md").read_text(encoding="utf-8")
    assert START in text and END in text, "docs/peft.md lost its matrix markers"
    documented = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert documented == matrix_markdown(cells).strip(), (
        "docs/peft.md's matrix differs from the code; regenerate it with `python -m secure_fl.peft_agg.compat`"
    )
