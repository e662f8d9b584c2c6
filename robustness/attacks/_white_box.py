"""`WhiteBoxAttack`: the shared half of the attacks that craft their update from the round's
honest updates (ALIE, IPM, min-max, min-sum); each one only says how (`WhiteBoxAttack.craft`)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from robustness.attacks._vectors import (
    centred_terms, check_perturbation, gamma_search, honest_matrix, pairwise_sq_distances, perturbation, unflatten,
)
from robustness.attacks.base import Attack, AttackContext


class WhiteBoxAttack(Attack):
    """An attack defined on the honest updates of its round, which only a simulation shows it.

    `apply` lays the honest updates out as one ``(m, d)`` float64 matrix (at least
    ``minimum_honest`` of them) and sends what `craft` returns; without them it refuses.
    """

    white_box = True
    #: Fewest honest updates the attack's statistics need (2 for a standard deviation or a distance).
    minimum_honest: ClassVar[int] = 2

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Refuse: a white-box attack needs the honest updates of the round (`apply`)."""
        raise self._needs_context()

    def apply(
        self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator, context: AttackContext
    ) -> dict[str, np.ndarray]:
        """Return `craft` of the round's honest updates, laid out like ``update``."""
        if not context.honest_updates:
            raise self._needs_context()
        honest = honest_matrix(update, context.honest_updates, attack=self.name, minimum=self.minimum_honest)
        return unflatten(self.craft(honest, context), update)

    @abstractmethod
    def craft(self, honest: np.ndarray, context: AttackContext) -> np.ndarray:
        """The flat malicious update, from the ``(m, d)`` honest updates of the round."""


class GammaSearchAttack(WhiteBoxAttack):
    """Shejwalkar and Houmansadr's AGR-agnostic attacks: ``mu + gamma * p`` with the largest
    ``gamma`` that `gamma` accepts (min-max and min-sum differ only in that condition).

    Parameters
    ----------
    perturbation:
        ``p``: ``"unit-vec"`` (``-mu / norm(mu)``), ``"sign"`` (``-sign(mu)``) or ``"std"`` (``-sigma``).
    """

    def __init__(self, *, perturbation: str = "std") -> None:
        check_perturbation(perturbation)
        self.perturbation = perturbation

    @staticmethod
    @abstractmethod
    def gamma(matrix: np.ndarray, mean: np.ndarray, direction: np.ndarray) -> float:
        """The ``gamma`` of the search for this attack's condition."""

    def craft(self, honest: np.ndarray, context: AttackContext) -> np.ndarray:
        """Return ``mu + gamma * p`` for the honest updates of the round."""
        mean = honest.mean(axis=0)
        direction = perturbation(self.perturbation, honest, mean)
        return np.asarray(mean + self.gamma(honest, mean, direction) * direction, dtype=np.float64)


def min_max_gamma(matrix: np.ndarray, mean: np.ndarray, direction: np.ndarray) -> float:
    """The ``gamma`` of the search with ``max_i ||m - x_i|| <= max_{i,j} ||x_i - x_j||``, ``m = mean + gamma p``."""
    a, b, c = centred_terms(matrix, mean, direction)
    threshold = float(pairwise_sq_distances(matrix).max())
    return gamma_search(lambda g: float(np.max(a - 2 * g * b + g * g * c)) <= threshold)


def min_sum_gamma(matrix: np.ndarray, mean: np.ndarray, direction: np.ndarray) -> float:
    """The ``gamma`` of the search with ``sum_i ||m - x_i||^2 <= max_i sum_j ||x_i - x_j||^2``, ``m = mean + gamma p``."""
    a, b, c = centred_terms(matrix, mean, direction)
    threshold = float(pairwise_sq_distances(matrix).sum(axis=1).max())
    total_a, total_b, count = float(a.sum()), float(b.sum()), len(a)
    return gamma_search(lambda g: total_a - 2 * g * total_b + count * g * g * c <= threshold)
