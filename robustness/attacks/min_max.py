"""``min-max``: the AGR-agnostic min-max attack (Shejwalkar and Houmansadr, NDSS 2021), white-box."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from robustness.attacks._vectors import (
    centred_terms, check_perturbation, gamma_search, honest_matrix, pairwise_sq_distances, perturbation, unflatten,
)
from robustness.attacks.base import Attack, AttackContext


def min_max_gamma(matrix: np.ndarray, mean: np.ndarray, direction: np.ndarray) -> float:
    """The ``gamma`` of the search with ``max_i ||m - x_i|| <= max_{i,j} ||x_i - x_j||``, ``m = mean + gamma p``."""
    a, b, c = centred_terms(matrix, mean, direction)
    threshold = float(pairwise_sq_distances(matrix).max())
    return gamma_search(lambda g: float(np.max(a - 2 * g * b + g * g * c)) <= threshold)


class MinMax(Attack):
    """Send ``mu + gamma * p``, the farthest point along ``p`` no farther from any honest update
    than the two farthest honest updates are from each other (all attackers the same update).

    Parameters
    ----------
    perturbation:
        ``p``: ``"unit-vec"`` (``-mu / norm(mu)``), ``"sign"`` (``-sign(mu)``) or ``"std"`` (``-sigma``).
    """

    name = "min-max"
    paper = "https://www.ndss-symposium.org/ndss-paper/manipulating-the-byzantine-optimizing-model-poisoning-attacks-and-defenses-for-federated-learning/"
    white_box = True

    def __init__(self, *, perturbation: str = "std") -> None:
        check_perturbation(perturbation)
        self.perturbation = perturbation

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Refuse: min-max needs the honest updates of the round (`apply`)."""
        raise self._needs_context()

    def apply(
        self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator, context: AttackContext
    ) -> dict[str, np.ndarray]:
        """Return ``mu + gamma * p`` for the honest updates of the round."""
        if not context.honest_updates:
            raise self._needs_context()
        honest = honest_matrix(update, context.honest_updates, attack=self.name, minimum=2)
        mean = honest.mean(axis=0)
        direction = perturbation(self.perturbation, honest, mean)
        return unflatten(mean + min_max_gamma(honest, mean, direction) * direction, update)
