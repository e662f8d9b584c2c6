"""``centered-clip``: clip every row around the previous aggregate (Karimireddy, He, Jaggi 2021)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from robustness.defenses import _rules
from robustness.defenses._common import one_row, setting_float, setting_int
from robustness.defenses.base import Defense, DefenseResult


class CenteredClip(Defense):
    """Centred clipping: ``v <- v + sum_i w_i (x_i - v) min(1, tau / |x_i - v|) / sum_i w_i``.

    Weighted by the input weights. The center is the previous round's aggregate, kept as state
    (``state_dict``: it survives a checkpoint and a restart); the first round starts from 0, as in
    the authors' code. Each Byzantine row moves the result by at most ``tau * w_i / sum w`` per
    iteration. One row is returned with the sum of the input weights.

    Parameters
    ----------
    tau:
        Clipping radius around the center (> 0).
    iterations:
        Clipping iterations per round (integer >= 1; the paper uses 1).
    """

    name = "centered-clip"
    paper = "https://proceedings.mlr.press/v139/karimireddy21a.html"

    def __init__(self, *, tau: float = 1.0, iterations: int = 1) -> None:
        self.tau = setting_float("tau", tau, low=0.0, low_open=True)
        self.iterations = setting_int("iterations", iterations, 1)
        self.center: np.ndarray | None = None

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        """Clip around the stored center, return the result and keep it as the next center."""
        x = _rules.as_updates(updates, "centered-clip")
        center = np.zeros(x.shape[1], np.float32) if self.center is None else self.center
        if center.shape != (x.shape[1],):
            raise ValueError(f"centered-clip: stored center has {center.shape[0]} values, updates have {x.shape[1]}")
        row = _rules.centered_clip(x, center, self.tau, self.iterations, weights)
        clipped = float((_rules.row_norms(x - center) > self.tau).sum())
        self.center = row
        return one_row(row, weights, centered_clip_clipped=clipped)

    def state_dict(self) -> dict[str, Any]:
        """``{"center": previous aggregate}`` once a round ran, else empty."""
        return {} if self.center is None else {"center": self.center.copy()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the center (a 1-D finite array) or nothing."""
        unknown = set(state) - {"center"}
        if unknown:
            raise ValueError(f"centered-clip: unknown state key(s) {sorted(unknown)}")
        if "center" not in state or state["center"] is None:
            self.center = None
            return
        center = np.asarray(state["center"], dtype=np.float32)
        if center.ndim != 1 or not np.isfinite(center).all():
            raise ValueError(f"centered-clip: state center must be a 1-D finite array, got shape {center.shape}")
        self.center = center.copy()
