"""``ipm``: inner-product manipulation (Xie, Koyejo and Gupta, UAI 2019), white-box."""

from __future__ import annotations

import math

import numpy as np

from robustness.attacks._white_box import WhiteBoxAttack
from robustness.attacks.base import AttackContext


class InnerProductManipulation(WhiteBoxAttack):
    """Send ``-epsilon * mu``, ``mu`` the mean of the round's honest updates (all attackers alike).

    A small ``epsilon`` (0.1) hides among the honest updates and turns median- and Krum-type rules
    against the honest direction; a large one (e.g. 100) overwhelms a plain mean.

    Parameters
    ----------
    epsilon:
        Scale of the reversed honest mean; a finite number > 0.
    """

    name = "ipm"
    paper = "https://arxiv.org/abs/1903.03936"
    minimum_honest = 1  # a mean needs one update

    def __init__(self, *, epsilon: float = 0.1) -> None:
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
        self.epsilon = float(epsilon)

    def craft(self, honest: np.ndarray, context: AttackContext) -> np.ndarray:
        """Return ``-epsilon * mean(honest updates)``."""
        return np.asarray(-self.epsilon * honest.mean(axis=0), dtype=np.float64)
