"""``sign-flip``: send ``-k`` times the honest update (a crude model-poisoning baseline)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from robustness.attacks._vectors import flatten, unflatten
from robustness.attacks.base import Attack


class SignFlip(Attack):
    """Send ``-scale * update``: the honest update reversed (and amplified when ``scale > 1``).

    Parameters
    ----------
    scale:
        ``k`` in ``-k * update``; a finite number > 0.
    """

    name = "sign-flip"
    paper = "https://arxiv.org/abs/1811.03761"

    def __init__(self, *, scale: float = 1.0) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Return ``-scale * update``."""
        return unflatten(-self.scale * flatten(update), update)
