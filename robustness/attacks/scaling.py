"""``scaling``: send ``lambda`` times the honest update (boosting, as in model replacement)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from robustness.attacks._vectors import flatten, unflatten
from robustness.attacks.base import Attack


class Scaling(Attack):
    """Send ``factor * update``: an honest direction with an outsized norm.

    Parameters
    ----------
    factor:
        ``lambda`` in ``lambda * update``; a finite number other than 0.
    """

    name = "scaling"
    paper = "https://arxiv.org/abs/1807.00459"

    def __init__(self, *, factor: float = 10.0) -> None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor == 0:
            raise ValueError(f"factor must be a finite number other than 0, got {factor!r}")
        self.factor = float(factor)

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Return ``factor * update``."""
        return unflatten(self.factor * flatten(update), update)
