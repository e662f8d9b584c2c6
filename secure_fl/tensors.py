"""Flat views of adapter state: name -> array dicts to ``(d,)`` vectors and back.

Defenses and aggregation rules work on one ``(n, d)`` float32 matrix (vectorised, no Python loop
over parameters); the wire and the model work on named tensors. `Layout` is the fixed,
ordered mapping between the two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from protocols.wire.serde import TensorSpec


@dataclass(frozen=True)
class Layout:
    """Names and shapes of a set of tensors, in a fixed order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: Mapping[str, np.ndarray]) -> Layout:
        """The layout of ``state``, in its iteration order."""
        return cls(tuple(state), tuple(tuple(int(s) for s in v.shape) for v in state.values()))

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Number of elements of each tensor."""
        return tuple(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each tensor in the flat vector."""
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.sizes)[:-1]])) if self.names else ()

    @property
    def size(self) -> int:
        """Total number of elements ``d``."""
        return sum(self.sizes)

    def specs(self, dtype: str = "float32") -> dict[str, TensorSpec]:
        """Wire specs of the tensors, all with ``dtype``."""
        return {name: TensorSpec(name, dtype, shape) for name, shape in zip(self.names, self.shapes)}

    def flatten(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate ``state`` (which must have this layout) into a float32 vector."""
        if self.names == ():
            return np.zeros(0, dtype=np.float32)
        for name, shape in zip(self.names, self.shapes):
            if tuple(np.shape(state[name])) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(np.shape(state[name]))}, layout needs {shape}")
        return np.concatenate([np.asarray(state[name], dtype=np.float32).reshape(-1) for name in self.names])

    def stack(self, states: Sequence[Mapping[str, np.ndarray]]) -> np.ndarray:
        """Flatten each state into one row of an ``(n, d)`` float32 matrix."""
        out = np.empty((len(states), self.size), dtype=np.float32)
        for row, state in enumerate(states):
            out[row] = self.flatten(state)
        return out

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Split a ``(d,)`` vector back into named tensors (copies, float32)."""
        if vector.shape != (self.size,):
            raise ValueError(f"vector has shape {vector.shape}, layout needs ({self.size},)")
        return {
            name: vector[offset : offset + size].reshape(shape).astype(np.float32, copy=True)
            for name, shape, offset, size in zip(self.names, self.shapes, self.offsets, self.sizes)
        }
