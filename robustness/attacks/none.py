"""``none``: no attackers (the default)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from robustness.attacks.base import Attack


class NoAttack(Attack):
    """Send the honest update."""

    name = "none"

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Return the update unchanged."""
        return dict(update)
