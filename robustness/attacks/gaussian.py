"""``gaussian``: send pure noise ``N(0, std^2 I)`` in place of the update."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from robustness.attacks._vectors import flatten, unflatten
from robustness.attacks.base import Attack


class GaussianNoise(Attack):
    """Send ``N(0, std^2 I)`` of the update's shape, drawn from the client's generator.

    Parameters
    ----------
    std:
        Standard deviation ``s`` of every coordinate (the literature uses 1 to 200); finite, > 0.
    """

    name = "gaussian"
    paper = "https://arxiv.org/abs/1703.02757"

    def __init__(self, *, std: float = 1.0) -> None:
        if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std <= 0:
            raise ValueError(f"std must be a finite number > 0, got {std!r}")
        self.std = float(std)

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Return ``std * z`` with ``z ~ N(0, I)`` from ``rng`` (each attacker draws its own)."""
        size = flatten(update).size
        return unflatten(self.std * rng.standard_normal(size), update)
