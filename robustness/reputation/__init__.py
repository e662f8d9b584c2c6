"""Per-client reputation (RFFL, Xu and Lyu 2021): ``[robustness] reputation = true``.

`ReputationTracker` keeps one smoothed score per client across rounds, weights the rows the
server combines by it and removes clients that fall below a threshold. The math is in
`robustness.reputation.rffl_math` (pure functions on numpy arrays).
"""

from robustness.reputation.rffl_math import cosine_scores, removal_mask, reputation_weights, smooth
from robustness.reputation.tracker import ReputationTracker

__all__ = ["ReputationTracker", "cosine_scores", "removal_mask", "reputation_weights", "smooth"]
