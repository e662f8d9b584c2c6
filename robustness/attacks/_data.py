"""Rewriting a client's labelled examples (label flipping, backdoor triggers) without knowing its type.

`robustness` may not import `secure_fl`, so datasets are handled by shape: a frozen dataclass with
``labels`` (int array) and ``label_names`` fields, plus ``texts`` where the attack edits the text
(`secure_fl.data.TextDataset` is one). `dataclasses.replace` builds the poisoned copy, so the
dataset's own validation runs again on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from robustness.errors import RobustnessError


def check_dataset(dataset: Any, *, attack: str, fields: tuple[str, ...]) -> int:
    """The number of classes of ``dataset``; refuse one the attack cannot rewrite (naming it)."""
    if not dataclasses.is_dataclass(dataset) or isinstance(dataset, type) or any(
        not hasattr(dataset, name) for name in (*fields, "label_names")
    ):
        raise RobustnessError(
            f"attack.kind={attack!r} rewrites labelled examples: it needs a dataset with fields "
            f"{', '.join((*fields, 'label_names'))} (secure_fl.data.TextDataset), got {type(dataset).__name__}"
        )
    return len(getattr(dataset, "label_names"))


def check_label(value: int, num_labels: int, *, setting: str, attack: str) -> None:
    """Refuse a class id outside ``[0, num_labels)``, naming the setting."""
    if not 0 <= value < num_labels:
        raise RobustnessError(
            f"attack.params.{setting} = {value} is not a class of this dataset (attack.kind={attack!r}: "
            f"{num_labels} classes, ids 0..{num_labels - 1})"
        )


def replace(dataset: Any, **changes: Any) -> Any:
    """A copy of ``dataset`` with ``changes`` (validated by the dataset's own checks)."""
    return dataclasses.replace(dataset, **changes)


def with_trigger(texts: Any, index: np.ndarray, trigger: str) -> tuple[str, ...]:
    """``texts`` with ``trigger`` put in front of the examples at ``index`` (before truncation can cut it)."""
    out = np.asarray(list(texts), dtype=object)
    if index.size:
        out[index] = trigger + " " + out[index]
    return tuple(str(text) for text in out)
