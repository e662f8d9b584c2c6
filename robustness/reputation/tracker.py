"""`ReputationTracker`: RFFL reputations kept per client across rounds (the stateful half).

Each round the server scores what it saw against the round's aggregate: every row is an
individual update in plain mode, or a bucket mean under secure aggregation. A bucket's score is
attributed to each of its members, and buckets are re-drawn at random every round, so over
rounds a client's reputation averages the scores of many different buckets: a client that
keeps pulling against the aggregate drags every bucket it joins down, and its honest bucket
mates share that score only in the rounds they happened to share its bucket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from robustness.reputation.rffl_math import removal_mask, reputation_weights, smooth

__all__ = ["ReputationTracker"]

SCHEMA = "secure-fl/reputation/v1"


class ReputationTracker:
    """Per-client reputations, reputation weights, and removal below the threshold.

    Parameters
    ----------
    alpha:
        Smoothing: ``r <- alpha r + (1 - alpha) phi`` (RFFL: 0.95).
    threshold:
        A reputable client whose normalised reputation is below ``threshold / |R|`` is removed
        for the rest of the run (RFFL: ``c = 1/3``).
    warmup:
        Reputation updates before anybody may be removed (RFFL: 10 rounds).
    """

    paper = "https://arxiv.org/abs/2011.10464"

    def __init__(self, *, alpha: float = 0.95, threshold: float = 1.0 / 3.0, warmup: int = 10) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must lie in [0, 1), got {alpha!r}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must lie in [0, 1), got {threshold!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
        self.alpha = float(alpha)
        self.threshold = float(threshold)
        self.warmup = warmup
        #: Normalised reputation of every client scored so far and not removed.
        self.reputations: dict[str, float] = {}
        #: Removed clients and the update (1-based) that removed them.
        self.removed: dict[str, int] = {}
        #: Reputation updates so far (released rounds).
        self.updates = 0

    # ------------------------------------------------------------------ weights
    def is_removed(self, client_id: str) -> bool:
        """True once ``client_id`` fell below the threshold (it is never selected again)."""
        return client_id in self.removed

    def row_weights(self, groups: Sequence[Sequence[str]], fallback: NDArray[np.float64]) -> NDArray[np.float64]:
        """The weight of each row, the summed reputation weight of the clients behind it.

        Before the first update (round 1 of the paper) ``fallback`` (the example counts) is used
        unchanged. A client without a reputation yet counts as an average reputable client.
        """
        if self.updates == 0 or not self.reputations:
            return np.asarray(fallback, dtype=np.float64)
        known = list(self.reputations)
        per_client = dict(zip(known, reputation_weights([self.reputations[c] for c in known]).tolist()))
        neutral = 1.0 / len(known)
        weights = np.asarray([sum(per_client.get(c, 0.0 if c in self.removed else neutral) for c in group)
                              for group in groups], dtype=np.float64)
        if not np.any(weights > 0):  # everybody of this round is removed or at zero: nobody is preferred
            return np.asarray(fallback, dtype=np.float64)
        return weights

    # ------------------------------------------------------------------ update
    def update(self, groups: Sequence[Sequence[str]], scores: Sequence[float]) -> dict[str, Any]:
        """Fold one released round in: each member of ``groups[i]`` gets the score ``scores[i]``.

        Returns what happened, for the metrics line (the clients removed by this update).
        """
        if len(groups) != len(scores):
            raise ValueError(f"{len(groups)} groups but {len(scores)} scores")
        members = [c for group in groups for c in group if c not in self.removed]
        phi = {c: float(s) for group, s in zip(groups, scores) for c in group if c not in self.removed}
        if members:
            ids = list(dict.fromkeys(members))
            new = smooth([self.reputations.get(c, 0.0) for c in ids], [phi[c] for c in ids], alpha=self.alpha)
            self.reputations.update(zip(ids, new.tolist()))
        self._normalise()
        self.updates += 1
        removed_now: list[str] = []
        if self.updates >= self.warmup and self.reputations:
            ids = list(self.reputations)
            mask = removal_mask([self.reputations[c] for c in ids], threshold=self.threshold)
            removed_now = [c for c, drop in zip(ids, mask.tolist()) if drop]
            for c in removed_now:
                self.removed[c] = self.updates
                del self.reputations[c]
            self._normalise()
        values = list(self.reputations.values())
        return {
            "reputation_min": min(values) if values else None,
            "reputation_max": max(values) if values else None,
            "reputation_removed": sorted(removed_now),
        }

    def _normalise(self) -> None:
        """Divide by the sum of the positive parts, so that the reputable weights sum to 1."""
        positive = sum(max(v, 0.0) for v in self.reputations.values())
        if positive > 0:
            self.reputations = {c: v / positive for c, v in self.reputations.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (``schema``, reputations, removed clients, updates so far)."""
        return {
            "schema": SCHEMA,
            "updates": self.updates,
            "reputations": dict(self.reputations),
            "removed": dict(self.removed),
            "settings": {"alpha": self.alpha, "threshold": self.threshold, "warmup": self.warmup},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict`; refuses another schema, other settings or malformed values."""
        if state.get("schema") != SCHEMA:
            raise ValueError(f"reputation state has schema {state.get('schema')!r}, expected {SCHEMA!r}")
        settings = {"alpha": self.alpha, "threshold": self.threshold, "warmup": self.warmup}
        if dict(state.get("settings", {})) != settings:
            raise ValueError(f"reputation state was kept with settings {state.get('settings')}, this run has {settings}")
        updates, reputations, removed = state.get("updates"), state.get("reputations"), state.get("removed")
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError(f"reputation state: updates must be an integer >= 0, got {updates!r}")
        if not isinstance(reputations, Mapping) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                for k, v in reputations.items()):
            raise ValueError("reputation state: reputations must map client ids to finite numbers")
        if not isinstance(removed, Mapping) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in removed.items()):
            raise ValueError("reputation state: removed must map client ids to round numbers")
        self.updates = updates
        self.reputations = {k: float(v) for k, v in reputations.items()}
        self.removed = dict(removed)
