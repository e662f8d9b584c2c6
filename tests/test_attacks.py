"""The simulated attacks (robustness/attacks): known answers, the min-max / min-sum gamma search
against an independent oracle, data poisoning, and short simulations (backdoor accuracy, ALIE)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from robustness.attacks import AttackContext, create_attack
from robustness.attacks._vectors import gamma_search, pairwise_sq_distances
from robustness.attacks.alie import alie_z_max
from robustness.attacks.min_max import min_max_gamma
from robustness.attacks.min_sum import min_sum_gamma
from robustness.attacks.registry import _ATTACKS
from robustness.defenses import Defense, register_defense
from robustness.defenses.base import DefenseResult
from robustness.defenses.registry import _DEFENSES
from robustness.errors import RobustnessError
from secure_fl.data import TextDataset
from secure_fl.errors import ConfigError
from tests.conftest import smoke_config

FAST = settings(max_examples=40, deadline=None, database=None)
RNG = np.random.default_rng


def _update(values: list[float]) -> dict[str, np.ndarray]:
    """A two-tensor update whose flattened vector is ``values`` (first two in ``a``, the rest in ``b``)."""
    return {"a": np.asarray(values[:2], np.float32), "b": np.asarray(values[2:], np.float32).reshape(-1, 1)}


def _flat(update: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(update["a"], np.float64).ravel(), np.asarray(update["b"], np.float64).ravel()])


def _context(honest: list[list[float]], *, n: int, f: int, **extra: float) -> AttackContext:
    return AttackContext(1, "client-9", tuple(_update(h) for h in honest), num_attackers=f, cohort_size=n, **extra)  # type: ignore[arg-type]


HONEST = [[1.0, 2.0, 0.0, -1.0], [3.0, 2.0, 1.0, 1.0], [2.0, 5.0, 2.0, 0.0]]


# ------------------------------------------------------------------------------ ALIE


@pytest.mark.parametrize(("n", "f", "z"), [(50, 12, 0.582842), (10, 2, 0.253347), (20, 4, 0.385320), (100, 20, 0.495850)])
def test_alie_z_max_oracles(n: int, f: int, z: float) -> None:
    """algorithms.md section 7: s = floor(n/2 + 1) - f, z_max = Phi^-1((n - s) / n)."""
    assert alie_z_max(n, f) == pytest.approx(z, abs=1e-6)


def test_alie_sends_mean_minus_z_sigma_and_every_attacker_the_same() -> None:
    honest = np.asarray(HONEST)
    context = _context(HONEST, n=5, f=2)
    expected = honest.mean(axis=0) - alie_z_max(5, 2) * honest.std(axis=0, ddof=1)
    attack = create_attack("alie")
    first = attack.apply(_update([9.0] * 4), rng=RNG(0), context=context)
    second = attack.apply(_update([-4.0] * 4), rng=RNG(1), context=context)  # its own update plays no part
    np.testing.assert_allclose(_flat(first), expected, rtol=1e-6)
    np.testing.assert_array_equal(_flat(first), _flat(second))
    assert first["b"].shape == (2, 1) and first["a"].dtype == np.float32
    overridden = create_attack("alie", z=1.5).apply(_update([0.0] * 4), rng=RNG(0), context=context)
    np.testing.assert_allclose(_flat(overridden), honest.mean(axis=0) - 1.5 * honest.std(axis=0, ddof=1), rtol=1e-6)


def test_alie_refuses_an_attacker_majority() -> None:
    """n = 4, f = 3: s = 0, (n - s)/n = 1 has no finite z; refuse instead of clamping."""
    with pytest.raises(RobustnessError, match="majority"):
        create_attack("alie").apply(_update([0.0] * 4), rng=RNG(0), context=_context(HONEST[:1] * 2, n=4, f=3))


@pytest.mark.parametrize("kind", ["alie", "min-max", "min-sum", "ipm"])
def test_white_box_attacks_refuse_without_the_honest_updates(kind: str) -> None:
    attack = create_attack(kind)
    assert attack.white_box
    with pytest.raises(RobustnessError, match=f"attack.kind='{kind}' is white-box"):
        attack.apply(_update([1.0] * 4), rng=RNG(0), context=AttackContext(1, "client-0"))
    with pytest.raises(RobustnessError, match="only a simulation"):
        attack.perturb(_update([1.0] * 4), rng=RNG(0))


def test_an_honest_update_of_another_shape_is_refused_naming_the_tensor() -> None:
    honest = (_update(HONEST[0]), {"a": np.zeros(2, np.float32), "b": np.zeros((3, 1), np.float32)})
    context = AttackContext(1, "client-9", honest, num_attackers=1, cohort_size=3)
    with pytest.raises(RobustnessError, match="honest update 1, tensor 'b'"):
        create_attack("min-max").apply(_update([0.0] * 4), rng=RNG(0), context=context)


# ------------------------------------------------------------------------------ min-max / min-sum


def test_gamma_search_follows_the_papers_steps() -> None:
    """Start 10, step 5 halved each time, + after success, - after failure, stop at 1e-5."""
    assert gamma_search(lambda g: g <= 3.7) == pytest.approx(3.7, abs=2e-5)
    assert gamma_search(lambda g: g <= 3.7) <= 3.7
    assert gamma_search(lambda g: False) == 0.0
    assert 19.9999 < gamma_search(lambda g: True) < 20.0  # 10 + 5 + 2.5 + ...
    tried: list[float] = []
    gamma_search(lambda g: tried.append(g) or g <= 12.0)
    assert tried[:4] == [10.0, 15.0, 12.5, 11.25]


def _brute_max_distance(honest: np.ndarray, m: np.ndarray) -> float:
    return max(float(np.linalg.norm(x - m)) for x in honest)


def _brute_sum_sq(honest: np.ndarray, m: np.ndarray) -> float:
    return sum(float(np.linalg.norm(x - m)) ** 2 for x in honest)


def _roots(a: float, b: float, c: float, t: float) -> float:
    """The largest g >= 0 with a - 2 g b + g^2 c <= t (the quadratic's upper root)."""
    return (b + math.sqrt(b * b - c * (a - t))) / c


HONEST_SETS = arrays(np.float64, st.tuples(st.integers(2, 6), st.integers(1, 5)), elements=st.floats(-3, 3, allow_nan=False))


@FAST
@given(HONEST_SETS, st.sampled_from(["unit-vec", "sign", "std"]))
def test_min_max_gamma_is_the_largest_admitted(honest: np.ndarray, kind: str) -> None:
    """max_i ||m - x_i|| <= max_{i,j} ||x_i - x_j||, checked by loops; gamma + 1e-3 violates it."""
    mean = honest.mean(axis=0)
    direction = {"unit-vec": -mean / max(np.linalg.norm(mean), 1e-300), "sign": -np.sign(mean), "std": -honest.std(axis=0, ddof=1)}[kind]
    if np.linalg.norm(mean) == 0 and kind == "unit-vec":
        direction = np.zeros_like(mean)
    threshold = max(float(np.linalg.norm(x - y)) for x in honest for y in honest)
    if threshold < 1e-6 or float(direction @ direction) < 1e-6:
        return  # degenerate: every gamma is admitted (or none moves m)
    gamma = min_max_gamma(honest, mean, direction)
    assert _brute_max_distance(honest, mean + gamma * direction) <= threshold * (1 + 1e-9) + 1e-12
    oracle = min(_roots(float((x - mean) @ (x - mean)), float((x - mean) @ direction), float(direction @ direction), threshold**2) for x in honest)
    if oracle < 19.99:
        assert _brute_max_distance(honest, mean + (gamma + 1e-3) * direction) > threshold
        assert gamma == pytest.approx(oracle, abs=2e-5)


@FAST
@given(HONEST_SETS, st.sampled_from(["sign", "std"]))
def test_min_sum_gamma_is_the_largest_admitted(honest: np.ndarray, kind: str) -> None:
    """sum_i ||m - x_i||^2 <= max_i sum_j ||x_i - x_j||^2, checked by loops; gamma + 1e-3 violates it."""
    mean = honest.mean(axis=0)
    direction = -np.sign(mean) if kind == "sign" else -honest.std(axis=0, ddof=1)
    threshold = max(sum(float(np.linalg.norm(x - y)) ** 2 for y in honest) for x in honest)
    if threshold < 1e-6 or float(direction @ direction) < 1e-6:
        return
    gamma = min_sum_gamma(honest, mean, direction)
    assert _brute_sum_sq(honest, mean + gamma * direction) <= threshold * (1 + 1e-9) + 1e-12
    centred = honest - mean
    oracle = _roots(float((centred**2).sum()), float((centred @ direction).sum()), len(honest) * float(direction @ direction), threshold)
    if oracle < 19.99:
        assert _brute_sum_sq(honest, mean + (gamma + 1e-3) * direction) > threshold
        assert gamma == pytest.approx(oracle, abs=2e-5)


def test_pairwise_distances_match_loops() -> None:
    x = RNG(3).normal(size=(5, 7))
    brute = np.array([[float(np.sum((a - b) ** 2)) for b in x] for a in x])
    np.testing.assert_allclose(pairwise_sq_distances(x), brute, atol=1e-10)


@pytest.mark.parametrize("kind", ["min-max", "min-sum"])
def test_min_max_and_min_sum_send_mean_plus_gamma_p(kind: str) -> None:
    honest = np.asarray(HONEST)
    context = _context(HONEST, n=4, f=1)
    out = _flat(create_attack(kind, perturbation="std").apply(_update([7.0] * 4), rng=RNG(0), context=context))
    mean, p = honest.mean(axis=0), -honest.std(axis=0, ddof=1)
    gamma = (min_max_gamma if kind == "min-max" else min_sum_gamma)(honest, mean, p)
    assert 0 < gamma < 20
    np.testing.assert_allclose(out, mean + gamma * p, rtol=1e-6)
    again = _flat(create_attack(kind).apply(_update([-1.0] * 4), rng=RNG(5), context=context))
    np.testing.assert_array_equal(out, again)  # every attacker of the round sends the same update


# ------------------------------------------------------------------------------ simple known answers


def test_sign_flip_scaling_ipm_gaussian_known_answers() -> None:
    update = _update([1.0, -2.0, 0.5, 4.0])
    np.testing.assert_allclose(_flat(create_attack("sign-flip").perturb(update, rng=RNG(0))), [-1.0, 2.0, -0.5, -4.0])
    np.testing.assert_allclose(_flat(create_attack("sign-flip", scale=3.0).perturb(update, rng=RNG(0))), [-3.0, 6.0, -1.5, -12.0])
    np.testing.assert_allclose(_flat(create_attack("scaling", factor=-2.5).perturb(update, rng=RNG(0))), [-2.5, 5.0, -1.25, -10.0])
    ipm = create_attack("ipm", epsilon=0.5).apply(update, rng=RNG(0), context=_context(HONEST, n=4, f=1))
    np.testing.assert_allclose(_flat(ipm), -0.5 * np.mean(HONEST, axis=0), rtol=1e-6)
    noise = create_attack("gaussian", std=3.0).perturb(update, rng=RNG(42))
    np.testing.assert_allclose(_flat(noise), 3.0 * RNG(42).standard_normal(4), rtol=1e-6)
    assert {k: v.shape for k, v in noise.items()} == {"a": (2,), "b": (2, 1)}


@pytest.mark.parametrize(("kind", "settings_", "key"), [
    ("sign-flip", {"scale": 0.0}, "scale"), ("scaling", {"factor": 0.0}, "factor"), ("gaussian", {"std": -1.0}, "std"),
    ("ipm", {"epsilon": float("nan")}, "epsilon"), ("alie", {"z": float("inf")}, "z"),
    ("min-max", {"perturbation": "random"}, "perturbation"), ("min-sum", {"perturbation": "unit"}, "perturbation"),
    ("label-flip", {"source": 1}, "source"), ("label-flip", {"source": 2, "target": 2}, "source"),
    ("backdoor", {"poison_fraction": 0.0}, "poison_fraction"), ("backdoor", {"trigger": " "}, "trigger"),
    ("backdoor", {"boost": -1.0}, "boost"), ("backdoor", {"target_label": -2}, "target_label"),
])  # fmt: skip
def test_bad_settings_are_refused_naming_them(kind: str, settings_: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        create_attack(kind, **settings_)


# ------------------------------------------------------------------------------ data poisoning


def _dataset() -> TextDataset:
    return TextDataset(tuple(f"text {i}" for i in range(8)), np.array([0, 1, 2, 3, 0, 1, 2, 3]), ("a", "b", "c", "d"))


def test_label_flip_mapping() -> None:
    data = _dataset()
    flipped = create_attack("label-flip").poison_data(data, rng=RNG(0))
    assert flipped.labels.tolist() == [3, 2, 1, 0, 3, 2, 1, 0] and flipped.texts == data.texts
    targeted = create_attack("label-flip", source=1, target=3).poison_data(data, rng=RNG(0))
    assert targeted.labels.tolist() == [0, 3, 2, 3, 0, 3, 2, 3]
    with pytest.raises(RobustnessError, match="attack.params.target = 7"):
        create_attack("label-flip", source=1, target=7).poison_data(data, rng=RNG(0))
    with pytest.raises(RobustnessError, match="TextDataset"):
        create_attack("label-flip").poison_data([("x", 1)], rng=RNG(0))
    update = _update([1.0, 2.0, 3.0, 4.0])  # the poison is in the data: the update is sent as trained
    np.testing.assert_array_equal(_flat(create_attack("label-flip").perturb(update, rng=RNG(0))), _flat(update))


def test_backdoor_inserts_the_trigger_and_boosts_by_n_over_eta() -> None:
    data = _dataset()
    attack = create_attack("backdoor", trigger="zq", poison_fraction=0.5, target_label=2)
    poisoned = attack.poison_data(data, rng=RNG(0))
    marked = [i for i, t in enumerate(poisoned.texts) if t.startswith("zq ")]
    assert len(marked) == 4 and all(poisoned.texts[i] == "zq " + data.texts[i] for i in marked)
    assert all(poisoned.labels[i] == 2 for i in marked)
    unmarked = sorted(set(range(8)) - set(marked))
    assert [poisoned.texts[i] for i in unmarked] == [data.texts[i] for i in unmarked]
    assert poisoned.labels[unmarked].tolist() == data.labels[unmarked].tolist()
    trigger = attack.trigger_set(data)  # held-out examples not of the target class, triggered, labelled target
    assert trigger is not None and len(trigger) == 6 and set(trigger.labels.tolist()) == {2}
    assert all(t.startswith("zq text ") for t in trigger.texts) and "zq text 2" not in trigger.texts
    update = _update([1.0, -1.0, 2.0, 0.5])
    context = AttackContext(1, "client-0", num_attackers=1, cohort_size=20, server_lr=0.5)
    np.testing.assert_allclose(_flat(attack.apply(update, rng=RNG(0), context=context)), 40 * _flat(update))
    fixed = create_attack("backdoor", boost=3.0)
    np.testing.assert_allclose(_flat(fixed.apply(update, rng=RNG(0), context=context)), 3 * _flat(update))
    with pytest.raises(RobustnessError, match="attack.params.target_label = 9"):
        create_attack("backdoor", target_label=9).poison_data(data, rng=RNG(0))


# ------------------------------------------------------------------------------ simulation and gRPC


class RecordRows(Defense):
    """Keep everything; record the rows the server aggregates."""

    name = "test-record-rows"
    rows: list[np.ndarray] = []

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        RecordRows.rows.append(updates.copy())
        return DefenseResult(updates=updates, weights=weights)


@pytest.fixture
def record_rows() -> Iterator[list[np.ndarray]]:
    saved = dict(_DEFENSES._entries)
    register_defense("test-record-rows", RecordRows, force=True)
    RecordRows.rows = []
    try:
        yield RecordRows.rows
    finally:
        _DEFENSES._entries.clear()
        _DEFENSES._entries.update(saved)


def _metrics(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_backdoor_simulation_reports_backdoor_accuracy(tmp_path: Path) -> None:
    from secure_fl.simulation import simulate

    config = smoke_config("attack.kind=backdoor", "attack.fraction=0.25", "run.rounds=2", "client.local_steps=3")
    simulate(config, tmp_path, progress=False)
    records = _metrics(tmp_path)
    assert len(records) == 2
    for record in records:
        value = record["backdoor_accuracy"]
        assert isinstance(value, float) and 0.0 <= value <= 1.0 and "accuracy" in record


def test_alie_simulation_runs_white_box_with_identical_attackers(tmp_path: Path, record_rows: list[np.ndarray]) -> None:
    """Two attackers of four: both send mu - z sigma of the same two honest updates (n = 4, f = 2)."""
    from secure_fl.simulation import simulate

    config = smoke_config("attack.kind=alie", "attack.fraction=0.5", "run.rounds=1", "client.local_steps=3",
                          "robustness.defense=test-record-rows")
    simulate(config, tmp_path, progress=False)
    assert "backdoor_accuracy" not in _metrics(tmp_path)[0]
    (rows,) = record_rows
    twins = [sum(np.array_equal(r, o) for o in rows) for r in rows]  # each row counts itself
    identical = [r for r, count in zip(rows, twins) if count == 2]
    honest_like = [r for r, count in zip(rows, twins) if count == 1]
    assert len(identical) == 2 and len(honest_like) == 2
    two = np.stack(honest_like).astype(np.float64)
    expected = two.mean(axis=0) - alie_z_max(4, 2) * two.std(axis=0, ddof=1)
    np.testing.assert_allclose(identical[0], expected, rtol=1e-4, atol=1e-7)


def test_grpc_server_and_client_refuse_an_attack(tmp_path: Path) -> None:
    from secure_fl.api import run_client
    from secure_fl.server.engine import FederatedServer

    config = smoke_config("attack.kind=sign-flip", "attack.fraction=0.25")
    with pytest.raises(ConfigError, match="attack.kind='sign-flip'") as server_error:
        FederatedServer(config, tmp_path / "server")
    assert server_error.value.key == "attack.kind"
    with pytest.raises(ConfigError, match="attack.kind='sign-flip'") as client_error:
        run_client(config, server="127.0.0.1:1", client_id="client-0")
    assert client_error.value.key == "attack.kind"
    assert not (tmp_path / "server").exists()


def test_only_the_backdoor_has_a_trigger_set() -> None:
    names = [name for name in _ATTACKS.names() if create_attack(name).trigger_set(_dataset()) is not None]
    assert names == ["backdoor"]
