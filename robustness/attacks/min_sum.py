"""``min-sum``: the AGR-agnostic min-sum attack (Shejwalkar and Houmansadr, NDSS 2021), white-box."""

from __future__ import annotations

from robustness.attacks._white_box import GammaSearchAttack, min_sum_gamma

__all__ = ["MinSum", "min_sum_gamma"]


class MinSum(GammaSearchAttack):
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
    gamma = staticmethod(min_sum_gamma)
