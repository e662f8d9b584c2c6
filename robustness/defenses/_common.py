"""Helpers shared by the defense plug-ins: one-row results and setting checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from robustness.defenses._rules import check_count as setting_int
from robustness.defenses.base import DefenseResult

__all__ = ["one_row", "setting_float", "setting_int"]


def one_row(row: np.ndarray, weights: np.ndarray, excluded: tuple[int, ...] = (), **info: float) -> DefenseResult:
    """A result holding one aggregate row, weighted by the sum of the input weights."""
    total = float(np.sum(np.asarray(weights, dtype=np.float64)))
    return DefenseResult(
        updates=np.asarray(row, dtype=np.float32).reshape(1, -1),
        weights=np.asarray([total], dtype=np.float64),
        excluded=excluded,
        info=dict(info),
    )


def setting_float(name: str, value: Any, *, low: float, low_open: bool, high: float = math.inf) -> float:
    """``value`` as a finite float in ``(low, high)`` / ``[low, high)`` (bools refused); ValueError naming it."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer))
    v = float(value) if ok else math.nan
    if not (math.isfinite(v) and (v > low if low_open else v >= low) and v < high):
        bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if math.isfinite(high) else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return v
