"""``min-max``: the AGR-agnostic min-max attack (Shejwalkar and Houmansadr, NDSS 2021), white-box."""

from __future__ import annotations

from robustness.attacks._white_box import GammaSearchAttack, min_max_gamma

__all__ = ["MinMax", "min_max_gamma"]


class MinMax(GammaSearchAttack):
    """Send ``mu + gamma * p``, the farthest point along ``p`` no farther from any honest update
    than the two farthest honest updates are from each other (all attackers the same update).

    Parameters
    ----------
    perturbation:
        ``p``: ``"unit-vec"`` (``-mu / norm(mu)``), ``"sign"`` (``-sign(mu)``) or ``"std"`` (``-sigma``).
    """

    name = "min-max"
    paper = "https://www.ndss-symposium.org/ndss-paper/manipulating-the-byzantine-optimizing-model-poisoning-attacks-and-defenses-for-federated-learning/"
    gamma = staticmethod(min_max_gamma)
