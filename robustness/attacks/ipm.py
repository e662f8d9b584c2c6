"""``ipm``: inner-product manipulation (Xie, Koyejo and Gupta, UAI 2019), white-box."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from robustness.attacks._vectors import honest_matrix, unflatten
from robustness.attacks.base import Attack, AttackContext


class InnerProductManipulation(Attack):
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
    white_box = True

    def __init__(self, *, epsilon: float = 0.1) -> None:
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
            raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
        self.epsilon = float(epsilon)

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Refuse: IPM needs the honest updates of the round (`apply`)."""
        raise self._needs_context()

    def apply(
        self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator, context: AttackContext
    ) -> dict[str, np.ndarray]:
        """Return ``-epsilon * mean(honest updates)``."""
        if not context.honest_updates:
            raise self._needs_context()
        honest = honest_matrix(update, context.honest_updates, attack=self.name)
        return unflatten(-self.epsilon * honest.mean(axis=0), update)
