"""Robust aggregation rules: the oracles of algorithms.md section 7, refused preconditions, and
property tests with Byzantine rows at arbitrary (huge) values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import robustness.defenses.registry as registry
from robustness.defenses import _order, _rules
from robustness.errors import InsufficientHonestClients
from secure_fl.config import Config
from secure_fl.errors import ConfigError

FAST = settings(max_examples=40, deadline=None, database=None)


def col(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)[:, None]


# ------------------------------------------------------------------------------ oracles (algorithms.md section 7)

KRUM_1D = col(0, 0.5, 1.5, 3, 100)


def test_krum_oracle() -> None:
    np.testing.assert_allclose(_rules.krum_scores(KRUM_1D, 1), [2.5, 1.25, 3.25, 8.5, 19111.25])
    row, index = _rules.krum(KRUM_1D, 1)
    assert index == 1 and row.tolist() == [0.5]


def test_multi_krum_oracle() -> None:
    mean, chosen = _rules.multi_krum(KRUM_1D, 1, 3)
    assert mean == pytest.approx([0.666667], abs=1e-6) and chosen.tolist() == [1, 0, 2]
    out = registry.create_defense("multi-krum", f=1, m=3).aggregate(KRUM_1D, np.ones(5))
    assert out.updates.ravel().tolist() == [0.5, 0.0, 1.5] and out.excluded == (3, 4)
    assert float(out.weights @ out.updates.ravel() / out.weights.sum()) == pytest.approx(0.666667, abs=1e-6)


def test_median_and_trimmed_mean_oracle() -> None:
    x = col(1, 2, 3, 4, 100)
    assert _rules.coordinate_median(x).tolist() == [3.0]
    assert _rules.trimmed_mean(x, 0.2).tolist() == [3.0]  # b = floor(0.2 * 5) = 1
    assert registry.create_defense("median").aggregate(x, np.ones(5)).updates.tolist() == [[3.0]]
    assert registry.create_defense("trimmed-mean", trim_fraction=0.2).aggregate(x, np.ones(5)).updates.tolist() == [[3.0]]


def test_bulyan_oracle() -> None:
    x = col(0, 0.1, 0.2, 0.3, 0.4, 0.5, 100)
    row, chosen = _rules.bulyan(x, 1)
    assert row == pytest.approx([0.2], abs=1e-6) and 6 not in chosen.tolist() and len(chosen) == 5
    out = registry.create_defense("bulyan", f=1).aggregate(x, np.ones(7))
    assert out.updates.ravel() == pytest.approx([0.2], abs=1e-6) and 6 in out.excluded and len(out.excluded) == 2


def test_bucketing_oracle() -> None:
    x = col(1, 2, 3, 4, 5, 100)
    means, weights, groups = _rules.bucket_means(x, np.ones(6), 2, groups=[(0, 5), (1, 2), (3, 4)])
    assert means.ravel().tolist() == [50.5, 2.5, 4.5] and weights.tolist() == [2, 2, 2]
    assert groups == ((0, 5), (1, 2), (3, 4))
    assert _rules.coordinate_median(means).tolist() == [4.5]


def test_bucketing_draws_a_weighted_random_partition() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 4)).astype(np.float32)
    w = rng.uniform(1, 5, size=7)
    means, weights, groups = _rules.bucket_means(x, w, 3, np.random.default_rng(0))
    assert [len(g) for g in groups] == [3, 3, 1] and sorted(i for g in groups for i in g) == list(range(7))
    for g, mean, total in zip(groups, means, weights):
        np.testing.assert_allclose(mean, (w[list(g)] @ x[list(g)]) / w[list(g)].sum(), rtol=1e-5)
        assert total == pytest.approx(w[list(g)].sum())
    assert _rules.bucket_means(x, w, 3, np.random.default_rng(0))[2] == groups  # the generator decides
    with pytest.raises(ValueError, match="partition"):
        _rules.bucket_means(x, w, 3, groups=[(0, 1), (1, 2, 3, 4, 5, 6)])
    with pytest.raises(ValueError, match="bucket_size"):
        _rules.bucket_means(x, w, 0)


# ------------------------------------------------------------------------------ preconditions refuse, never clamp


@pytest.mark.parametrize(
    ("call", "rule", "n", "f"),
    [
        (lambda: _rules.krum(np.zeros((4, 3)), 1), "krum", 4, 1),
        (lambda: _rules.krum_scores(np.zeros((6, 3)), 2), "krum", 6, 2),
        (lambda: _rules.multi_krum(np.zeros((4, 3)), 1), "multi-krum", 4, 1),
        (lambda: _rules.multi_krum(np.zeros((7, 3)), 1, 7), "multi-krum", 7, 1),
        (lambda: _rules.bulyan(np.zeros((6, 3)), 1), "bulyan", 6, 1),
        (lambda: _rules.bulyan(np.zeros((10, 3)), 2), "bulyan", 10, 2),
        (lambda: registry.create_defense("krum", f=2).aggregate(np.zeros((6, 2), np.float32), np.ones(6)), "krum", 6, 2),
        (lambda: registry.create_defense("bulyan", f=1).aggregate(np.zeros((5, 2), np.float32), np.ones(5)), "bulyan", 5, 1),
    ],
)
def test_too_few_rows_are_refused_naming_rule_n_and_f(call: object, rule: str, n: int, f: int) -> None:
    with pytest.raises(InsufficientHonestClients) as info:
        call()  # type: ignore[operator]
    message = str(info.value)
    assert message.startswith(rule) and f"n={n}" in message and f"f={f}" in message
    assert isinstance(info.value, ValueError)


def test_bad_arguments_are_refused() -> None:
    x = np.zeros((9, 2), np.float32)
    for bad in (True, -1, 1.0, "1"):
        with pytest.raises(ValueError, match="f must be an integer"):
            _rules.krum(x, bad)  # type: ignore[arg-type]
    for fraction in (0.5, -0.1, 1.0):
        with pytest.raises(ValueError, match="trim_fraction"):
            _rules.trimmed_mean(x, fraction)
    for bound in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="bound"):
            _rules.norm_bound(x, bound)
    with pytest.raises(ValueError, match="tau"):
        _rules.centered_clip(x, np.zeros(2), 0.0)
    with pytest.raises(ValueError, match="row 3"):
        _rules.coordinate_median(np.where(np.arange(9)[:, None] == 3, np.inf, x))
    with pytest.raises(ValueError, match="shape"):
        _rules.coordinate_median(np.zeros(3))
    assert _rules.coordinate_median(x[:1]).tolist() == [0.0, 0.0]
    for rule in (_rules.coordinate_median, lambda u: _rules.trimmed_mean(u, 0.1), lambda u: _rules.norm_bound(u, 1.0)):
        with pytest.raises(InsufficientHonestClients, match="n=0"):
            rule(np.zeros((0, 2), np.float32))


@pytest.mark.parametrize(
    ("name", "settings", "key"),
    [
        ("krum", {"f": True}, "f"), ("krum", {"f": -1}, "f"), ("multi-krum", {"m": -2}, "m"),
        ("bulyan", {"f": 1.5}, "f"), ("trimmed-mean", {"trim_fraction": 0.5}, "trim_fraction"),
        ("norm-bound", {"norm_bound": -1.0}, "norm_bound"), ("centered-clip", {"tau": 0}, "tau"),
        ("centered-clip", {"iterations": 0}, "iterations"),
    ],
)
def test_plugin_settings_are_validated_naming_the_setting(name: str, settings: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        registry.create_defense(name, **settings)


def test_min_rows_match_the_preconditions() -> None:
    assert registry.create_defense("krum", f=3).min_rows() == 9
    assert registry.create_defense("multi-krum", f=2).min_rows() == 7
    assert registry.create_defense("multi-krum", f=2, m=10).min_rows() == 12
    assert registry.create_defense("bulyan", f=2).min_rows() == 11
    for name in ("none", "median", "trimmed-mean", "norm-bound", "centered-clip"):
        assert registry.create_defense(name).min_rows() == 1
    for f in range(4):  # min_rows rows are accepted, one fewer refused
        for name, rows in (("krum", 2 * f + 3), ("bulyan", 4 * f + 3)):
            defense = registry.create_defense(name, f=f)
            x = np.random.default_rng(f).normal(size=(rows, 3)).astype(np.float32)
            defense.aggregate(x, np.ones(rows))
            with pytest.raises(InsufficientHonestClients):
                defense.aggregate(x[:-1], np.ones(rows - 1))


def test_config_accepts_the_defenses_and_their_settings() -> None:
    cfg = Config.from_dict({"robustness": {"defense": "bulyan", "params": {"f": 2}}})
    assert cfg.robustness.params == {"f": 2}
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"robustness": {"defense": "krum", "params": {"trim_fraction": 0.1}}})
    assert info.value.key == "robustness.params.trim_fraction"


# ------------------------------------------------------------------------------ fast paths agree with the definitions


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 16, 33, 50, 64, 65, 130, 257])
def test_sorting_network_median_and_trimmed_mean_match_numpy(n: int) -> None:
    x = np.random.default_rng(n).normal(size=(n, 300)).astype(np.float32)
    x[:, :5] = np.round(x[:, :5])  # ties
    np.testing.assert_allclose(_rules.coordinate_median(x), np.median(x, axis=0), atol=1e-6)
    for fraction in (0.0, 0.1, 0.25, 0.49):
        b = int(np.floor(fraction * n))
        np.testing.assert_allclose(_rules.trimmed_mean(x, fraction), np.sort(x, axis=0)[b : n - b].mean(0), atol=1e-5)


@pytest.mark.parametrize(("n", "f"), [(3, 0), (7, 1), (11, 2), (12, 2), (23, 5), (40, 3)])
def test_bulyan_coordinate_step_matches_the_definition(n: int, f: int) -> None:
    x = np.random.default_rng(n).normal(size=(n, 400)).astype(np.float32)
    row, chosen = _rules.bulyan(x, f)
    chosen_rows = x[np.sort(chosen)]
    median = np.median(chosen_rows, axis=0)
    closest = np.argsort(np.abs(chosen_rows - median), axis=0, kind="stable")[: n - 4 * f]
    np.testing.assert_allclose(row, np.take_along_axis(chosen_rows, closest, 0).mean(0), atol=1e-5)


def test_sort_fallback_for_many_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_order, "NETWORK_MAX_ROWS", 4)
    x = np.random.default_rng(2).normal(size=(11, 50)).astype(np.float32)
    np.testing.assert_allclose(_rules.coordinate_median(x), np.median(x, axis=0), atol=1e-6)
    np.testing.assert_allclose(_rules.trimmed_mean(x, 0.2), np.sort(x, axis=0)[2:9].mean(0), atol=1e-6)
    row, chosen = _rules.bulyan(x, 2)
    monkeypatch.setattr(_order, "NETWORK_MAX_ROWS", 1024)
    np.testing.assert_allclose(row, _rules.bulyan(x, 2)[0], atol=1e-6)


def test_block_boundaries_of_the_network() -> None:
    x = np.random.default_rng(0).normal(size=(9, _order.BLOCK + 17)).astype(np.float32)
    np.testing.assert_allclose(_rules.coordinate_median(x), np.median(x, axis=0), atol=1e-6)


def test_gram_distances_match_exact_ones_even_next_to_a_huge_attacker() -> None:
    rng = np.random.default_rng(1)
    honest = (rng.normal(size=(8, 70_000)) * 0.01 + 0.5).astype(np.float32)  # n^2 d above the direct limit
    x = np.vstack([honest, np.full((1, 70_000), 1e6, np.float32)])
    exact = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    got = _rules.pairwise_sq_distances(x)
    np.testing.assert_allclose(got[:8, :8], exact[:8, :8], rtol=1e-4)
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-3)
    assert _rules.krum(x, 1)[1] != 8
    x[8] = 1e30  # float32 Gram products overflow: that row is recomputed exactly
    exact = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(_rules.pairwise_sq_distances(x), exact, rtol=1e-4, atol=1e-3)


# ------------------------------------------------------------------------------ attackers (hypothesis)

BIG = float(np.float32(1e30))
huge = st.floats(-BIG, BIG, allow_nan=False, width=32)


@st.composite
def attacked(draw: st.DrawFn, min_honest: int, ratio: int, extra: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Honest rows in [-1, 1]^d plus f Byzantine rows anywhere, f as large as n >= ratio f + extra allows."""
    d = draw(st.integers(1, 4))
    f = draw(st.integers(0, 3))
    n_honest = max(min_honest, (ratio - 1) * f + extra) + draw(st.integers(0, 3))
    honest = np.asarray(draw(st.lists(st.floats(-1, 1, width=32), min_size=n_honest * d, max_size=n_honest * d)), np.float32)
    bad = np.asarray(draw(st.lists(huge, min_size=f * d, max_size=f * d)), np.float32)
    rows = np.vstack([honest.reshape(n_honest, d), bad.reshape(f, d)])
    order = np.asarray(draw(st.permutations(range(len(rows)))))
    return rows[order], order < n_honest, f


@FAST
@given(attacked(1, 2, 1))
def test_median_stays_within_the_honest_range(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    x, honest, _ = case  # n >= 2f + 1: the attackers are a minority
    out = _rules.coordinate_median(x)
    assert (out >= x[honest].min(0)).all() and (out <= x[honest].max(0)).all()


@FAST
@given(attacked(1, 2, 1), st.floats(0, 0.49))
def test_trimmed_mean_stays_within_the_honest_range(case: tuple[np.ndarray, np.ndarray, int], fraction: float) -> None:
    x, honest, f = case
    n = len(x)
    fraction = max(fraction, f / n)  # b >= f: every attacker value can be trimmed
    if np.floor(fraction * n) < f or fraction >= 0.5:
        return
    out = _rules.trimmed_mean(x, fraction)
    lo, hi = x[honest].min(0), x[honest].max(0)
    assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()


@FAST
@given(attacked(3, 2, 3))
def test_krum_picks_a_row_close_to_the_honest_mean(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    """Lemma: score(pick) <= score(any honest row) <= (n - f - 2) D_h, and the pick has an honest
    neighbour among its n - f - 2 nearest, so |pick - honest mean| <= (sqrt(n - f - 2) + 1) sqrt(D_h)."""
    x, honest, f = case
    n = len(x)
    row, _ = _rules.krum(x, f)
    h = x[honest].astype(np.float64)
    spread = np.sqrt(max(((h[:, None] - h[None]) ** 2).sum(-1).max(), 0.0))
    assert np.linalg.norm(row - h.mean(0)) <= (np.sqrt(n - f - 2) + 1) * spread + 1e-4
    mean, chosen = _rules.multi_krum(x, f, 1)
    assert np.array_equal(mean, row)


@FAST
@given(attacked(3, 4, 3))
def test_bulyan_stays_within_one_honest_width_of_the_honest_range(case: tuple[np.ndarray, np.ndarray, int]) -> None:
    """The median of the theta picks lies in the honest range; the beta closest values are within
    the distance of the farthest honest value, so within one honest width of the range."""
    x, honest, f = case
    out, _ = _rules.bulyan(x, f)
    lo, hi = x[honest].min(0), x[honest].max(0)
    width = hi - lo
    assert (out >= lo - width - 1e-5).all() and (out <= hi + width + 1e-5).all()


@FAST
@given(attacked(1, 1, 1), st.floats(0.01, 10))
def test_norm_bound_output_norms_are_bounded(case: tuple[np.ndarray, np.ndarray, int], bound: float) -> None:
    x, _, _ = case
    rows, clipped = _rules.norm_bound(x, bound)
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    assert (norms <= bound * (1 + 1e-5)).all() and clipped == int((np.linalg.norm(x.astype(np.float64), axis=1) > bound).sum())


@FAST
@given(attacked(1, 1, 1), st.floats(0.1, 5))
def test_centered_clip_moves_at_most_tau_per_attacker(case: tuple[np.ndarray, np.ndarray, int], tau: float) -> None:
    x, honest, f = case
    center = np.zeros(x.shape[1], np.float32)
    attacked_out = _rules.centered_clip(x, center, tau)
    clean = _rules.centered_clip(np.where(honest[:, None], x, center), center, tau)  # attackers contribute 0
    assert np.linalg.norm(attacked_out - clean) <= tau * f / len(x) * (1 + 1e-5) + 1e-5


# ------------------------------------------------------------------------------ state and plug-in results


def test_centered_clip_state_round_trips_and_continues_the_same() -> None:
    rng = np.random.default_rng(5)
    x1, x2 = (rng.normal(size=(6, 4)).astype(np.float32) for _ in range(2))
    a = registry.create_defense("centered-clip", tau=0.5, iterations=2)
    assert a.state_dict() == {}
    first = a.aggregate(x1, np.ones(6))
    np.testing.assert_allclose(first.updates[0], _rules.centered_clip(x1, np.zeros(4), 0.5, 2), rtol=1e-6)
    b = registry.create_defense("centered-clip", tau=0.5, iterations=2)
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(a.aggregate(x2, np.ones(6)).updates, b.aggregate(x2, np.ones(6)).updates)
    with pytest.raises(ValueError, match="unknown state"):
        b.load_state_dict({"centre": np.zeros(4)})
    with pytest.raises(ValueError, match="stored center"):
        b.aggregate(np.zeros((3, 5), np.float32), np.ones(3))


def test_one_row_results_carry_the_total_weight_and_exclusions() -> None:
    x = col(0, 0.5, 1.5, 3, 100)
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    out = registry.create_defense("krum", f=1).aggregate(x, w)
    assert out.updates.tolist() == [[0.5]] and out.weights.tolist() == [15.0] and out.excluded == (0, 2, 3, 4)
    assert out.info["krum_selected"] == 1.0
    bounded = registry.create_defense("norm-bound").aggregate(x, w)  # bound = median norm = 1.5
    assert bounded.updates.ravel().tolist() == [0, 0.5, 1.5, 1.5, 1.5] and bounded.info["norm_clipped"] == 2.0
    assert registry.create_defense("norm-bound").aggregate(np.zeros((3, 2), np.float32), np.ones(3)).updates.sum() == 0
