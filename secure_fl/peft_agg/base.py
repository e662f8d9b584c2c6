"""The interface of a PEFT-aware aggregation rule.

A rule decides which trainable adapter tensors a client sends (`update_keys`) and how the
server turns the rows the defense kept into the global adapter delta (`aggregate`), then
applies it (`apply`). Rules that change what a client trains (frozen A, an r x r core,
stacking) extend `prepare_client` and `apply`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from secure_fl.tensors import Layout


class AggregationRule(ABC):
    """Base class of every PEFT aggregation rule; ``name`` is its ``[peft] rule`` value.

    Attributes
    ----------
    name:
        Registry name.
    paper:
        Where the rule comes from.
    needs_individual_updates:
        True if the rule cannot run on sums (it is then refused under secure aggregation).
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    needs_individual_updates: ClassVar[bool] = False

    def update_keys(self, trainable: Sequence[str]) -> list[str]:
        """Names of the trainable tensors that clients send (default: all of them)."""
        return list(trainable)

    @abstractmethod
    def aggregate(self, updates: np.ndarray, weights: np.ndarray, layout: Layout) -> np.ndarray:
        """Combine ``(m, d)`` update rows with ``(m,)`` weights into the ``(d,)`` global delta."""

    def apply(self, global_state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the new global adapter state: ``global + delta`` for the sent tensors."""
        new_state = {name: np.array(value, dtype=np.float32, copy=True) for name, value in global_state.items()}
        for name, value in delta.items():
            new_state[name] += value
        return new_state

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
