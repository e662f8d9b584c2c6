"""``min-sum``: the AGR-agnostic min-sum attack (Shejwalkar and Houmansadr, NDSS 2021), white-box."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from robustness.attacks._vectors import (
    centred_terms, check_perturbation, gamma_search, honest_matrix, pairwise_sq_distances, perturbation, unflatten,
)
from robustness.attacks.base import Attack, AttackContext


def min_sum_gamma(matrix: np.ndarray, mean: np.ndarray, direction: np.ndarray) -> float:
    """The ``gamma`` of the search with ``sum_i ||m - x_i||^2 <= max_i sum_j ||x_i - x_j||^2``, ``m = mean + gamma p``."""
    a, b, c = centred_terms(matrix, mean, direction)
    threshold = float(pairwise_sq_distances(matrix).sum(axis=1).max())
    total_a, total_b, count = float(a.sum()), float(b.sum()), len(a)
    return gamma_search(lambda g: total_a - 2 * g * total_b + count * g * g * c <= threshold)


class MinSum(Attack):
    """Send ``mu + gamma * p``, the farthest point along ``p`` whose summed squared distance to the
    honest updates is at most the largest such sum of an honest update (all attackers alike).

    The condition is the paper's (``max_i``, as algorithms.md section 7 states); the authors'
    released code compares with ``min_i`` instead, a stealthier and weaker attack.

    Parameters
    ----------
    perturbation:
        ``p``: ``"unit-vec"`` (``-mu / norm(mu)``), ``"sign"`` (``-sign(mu)``) or ``"std"`` (``-sigma``).
    """

    name = "min-sum"
    paper = "https://www.ndss-symposium.org/ndss-paper/manipulating-the-byzantine-optimizing-model-poisoning-attacks-and-defenses-for-federated-learning/"
    white_box = True

    def __init__(self, *, perturbation: str = "std") -> None:
        check_perturbation(perturbation)
        self.perturbation = perturbation

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Refuse: min-sum needs the honest updates of the round (`apply`)."""
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
        return unflatten(mean + min_sum_gamma(honest, mean, direction) * direction, update)
