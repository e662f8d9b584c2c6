"""The interface of a defense: a function of an ``(n, d)`` matrix of updates plus weights.

Rows are whatever the secure-aggregation stage revealed: individual client updates in plain mode,
bucket means otherwise. A defense returns the rows (possibly fewer, or one robust aggregate) and
weights that the PEFT rule then combines, plus the indices of the rows it excluded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class DefenseResult:
    """Output of a defense.

    Attributes
    ----------
    updates:
        ``(m, d)`` float32 rows to be combined by the aggregation rule.
    weights:
        ``(m,)`` non-negative weights of those rows.
    excluded:
        Indices (into the input rows) the defense rejected.
    info:
        Scalar diagnostics for the metrics line.
    """

    updates: np.ndarray
    weights: np.ndarray
    excluded: tuple[int, ...] = ()
    info: dict[str, float] = field(default_factory=dict)


class Defense(ABC):
    """Base class of every defense; ``name`` is its ``[robustness] defense`` value."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""

    @abstractmethod
    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        """Apply the defense to ``updates`` (shape ``(n, d)``) with ``weights`` (shape ``(n,)``)."""

    def min_rows(self) -> int:
        """The fewest input rows this defense's precondition accepts with its settings (default 1).

        The server compares it with the rows a round can deliver (clients, or buckets) and refuses
        a config at start instead of failing in the first round. Krum-type rules need ``2f + 3``,
        Bulyan ``4f + 3``.
        """
        return 1

    def state_dict(self) -> dict[str, Any]:
        """State kept across rounds, saved with every round's checkpoint (default: none).

        Values may be JSON-able scalars, lists and dicts, or numpy arrays. Settings (the
        ``__init__`` arguments) are not state: they come from the config.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (default: only the empty state is accepted)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given {sorted(state)}")
