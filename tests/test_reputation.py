"""RFFL reputations: the oracle of algorithms.md section 2, weights, removal and the state file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from robustness.reputation import ReputationTracker, cosine_scores, removal_mask, reputation_weights, smooth
from secure_fl.errors import RunError
from secure_fl.server.robust import restore_reputation
from secure_fl.server.rundir import RunDirectory

G = np.array([[1.0, 0.0], [0.8, 0.2], [-1.0, 0.5]])


def test_cosine_scores_oracle() -> None:
    u = G.mean(axis=0)  # equal weights 1/3
    np.testing.assert_allclose(u, [0.266667, 0.233333], atol=1e-6)
    np.testing.assert_allclose(cosine_scores(G, u), [0.752577, 0.889817, -0.378633], atol=1e-6)


def test_first_round_reputation_is_five_percent_of_the_score() -> None:
    phi = cosine_scores(G, G.mean(axis=0))
    np.testing.assert_allclose(smooth(np.zeros(3), phi, alpha=0.95), 0.05 * phi, atol=1e-12)


def test_negative_reputation_never_gives_a_weight_above_one() -> None:
    r = 0.05 * cosine_scores(G, G.mean(axis=0))
    signed = r / r.sum()  # the paper's code: negatives shrink the sum
    assert signed[1] > 0.7 and signed[2] < 0  # [0.595505, 0.704102, -0.299608]
    np.testing.assert_allclose(signed, [0.595505, 0.704102, -0.299608], atol=1e-6)
    w = reputation_weights(r)
    assert w[2] == 0.0 and np.all(w <= 1.0) and w.sum() == pytest.approx(1.0)
    # A sum dominated by negatives would make the paper's normalised weights explode.
    nasty = np.array([0.30, -0.29])
    assert np.max(nasty / nasty.sum()) > 1.0
    assert np.max(reputation_weights(nasty)) <= 1.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=1, max_size=30))
def test_weights_always_lie_in_the_unit_interval(values: list[float]) -> None:
    w = reputation_weights(values)
    assert np.all(w >= 0.0) and np.all(w <= 1.0) and w.sum() == pytest.approx(1.0)


def test_removal_below_threshold_over_reputable_set() -> None:
    phi = cosine_scores(G, G.mean(axis=0))
    mask = removal_mask(0.05 * phi, threshold=1 / 3)
    assert mask.tolist() == [False, False, True]  # client 3 falls below (1/3)(1/3)


def test_tracker_removes_only_after_warmup_and_keeps_removed_out() -> None:
    tracker = ReputationTracker(alpha=0.95, threshold=1 / 3, warmup=3)
    phi = cosine_scores(G, G.mean(axis=0))
    groups = [("a",), ("b",), ("c",)]
    assert tracker.row_weights(groups, np.array([5.0, 5.0, 5.0])).tolist() == [5.0, 5.0, 5.0]  # round 1: sizes
    for expected in ([], [], ["c"]):
        info = tracker.update(groups, phi)
        assert info["reputation_removed"] == expected
    assert tracker.is_removed("c") and not tracker.is_removed("a")
    weights = tracker.row_weights(groups, np.ones(3))
    assert weights[2] == 0.0 and weights[1] > weights[0] > 0
    tracker.update(groups, [0.5, 0.5, 1.0])  # a removed client's score is ignored from now on
    assert "c" not in tracker.reputations


def test_bucket_scores_are_attributed_to_every_member() -> None:
    tracker = ReputationTracker(warmup=100)
    tracker.update([("a", "b"), ("c", "d")], [0.8, -0.4])
    assert tracker.reputations["a"] == tracker.reputations["b"] > 0 > tracker.reputations["c"] == tracker.reputations["d"]
    w = tracker.row_weights([("a", "c"), ("b", "new")], np.ones(2))
    assert w[1] > w[0]  # an unknown client counts as an average reputable one


def test_state_round_trip_and_refusals(tmp_path: Path) -> None:
    tracker = ReputationTracker(warmup=1)
    tracker.update([("a",), ("b",), ("c",)], cosine_scores(G, G.mean(axis=0)))
    run_dir = RunDirectory(tmp_path)
    run_dir.write_reputation({**tracker.state_dict(), "round": 4, "run_id": "r"})
    assert not list(tmp_path.glob("*.tmp"))  # written via a temporary file and renamed
    again = ReputationTracker(warmup=1)
    restore_reputation(again, run_dir, 4)
    assert again.reputations == tracker.reputations and again.removed == {"c": 1}
    with pytest.raises(RunError, match="after round 4, but the checkpoint is of round 3"):
        restore_reputation(ReputationTracker(warmup=1), run_dir, 3)
    with pytest.raises(RunError, match="settings"):
        restore_reputation(ReputationTracker(warmup=2), run_dir, 4)
    state = json.loads(run_dir.reputation_path.read_text())
    state["reputations"]["a"] = "high"
    run_dir.reputation_path.write_text(json.dumps(state))
    with pytest.raises(RunError, match="finite numbers"):
        restore_reputation(ReputationTracker(warmup=1), run_dir, 4)
    run_dir.reputation_path.write_text("{not json")
    with pytest.raises(RunError, match="cannot be read"):
        restore_reputation(ReputationTracker(warmup=1), run_dir, 4)
