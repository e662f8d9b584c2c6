"""Tests of the plug-in registries, the FedIT rule, `Layout` and plain aggregation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import privacy._registry
import privacy.accounting.registry as accountant_registry
import privacy.mechanisms.registry as privacy_registry
import protocols._registry
import protocols.secagg.registry as secagg_registry
import robustness._registry
import robustness.attacks.registry as attack_registry
import robustness.defenses.registry as defense_registry
import secure_fl.peft_agg.registry as rule_registry
from protocols.secagg.base import BucketSum, Contribution, SecureAggregation
from protocols.secagg.plain import PlainAggregation
from robustness.defenses.base import Defense, DefenseResult
from secure_fl.config import Config
from secure_fl.errors import ConfigError
from secure_fl.peft_agg.fedit import FedIT
from secure_fl.tensors import Layout
from tests.harness import drive

FAST = settings(max_examples=30, deadline=None, database=None)

# (module, create function, registry object, config key)
REGISTRIES: dict[str, tuple[ModuleType, Callable[..., Any], Any, str]] = {
    "secure": (secagg_registry, secagg_registry.create_secure_aggregation, secagg_registry._PROTOCOLS, "secure.mode"),
    "privacy": (privacy_registry, privacy_registry.create_privacy_mechanism, privacy_registry._MECHANISMS, "privacy.mode"),
    "defense": (defense_registry, defense_registry.create_defense, defense_registry._DEFENSES, "robustness.defense"),
    "attack": (attack_registry, attack_registry.create_attack, attack_registry._ATTACKS, "attack.kind"),
    "rule": (rule_registry, rule_registry.create_rule, rule_registry._RULES, "peft.rule"),
}

REGISTRY_CLASSES = [protocols._registry.Registry, privacy._registry.Registry, robustness._registry.Registry]


@pytest.fixture(autouse=True)
def _restore_registries() -> Iterator[None]:
    """Snapshot every registry's entries and put them back after each test."""
    saved = {kind: dict(entry[2]._entries) for kind, entry in REGISTRIES.items()}
    try:
        yield
    finally:
        for kind, entry in REGISTRIES.items():
            entry[2]._entries.clear()
            entry[2]._entries.update(saved[kind])


# ------------------------------------------------------------------------------ conformance

CONFORMANCE_CASES = [
    pytest.param(kind, name, id=f"{kind}:{name}") for kind, entry in REGISTRIES.items() for name in entry[0].available()
]


def test_every_registry_has_entries() -> None:
    assert len(CONFORMANCE_CASES) >= len(REGISTRIES)
    for module, _, registry, key in REGISTRIES.values():
        assert module.available() == registry.names()
        assert registry.config_key == key


def _case(kind: str) -> list[Any]:
    return [pytest.param(name, id=f"{kind}:{name}") for name in REGISTRIES[kind][0].available()]


def _state_round_trip(plugin: Any, fresh: Any) -> None:
    """What `state_dict` returns loads into a fresh instance and comes back equal."""
    state = plugin.state_dict()
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert set(again) == set(state)
    for key, value in state.items():
        np.testing.assert_equal(again[key], value)


@pytest.mark.parametrize("name", _case("defense"))
def test_defense_contract(name: str) -> None:
    """Shapes kept, one weight per returned row, excluded indices valid, state round trip."""
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(7, 5)).astype(np.float32)
    weights = rng.uniform(1.0, 10.0, size=7)
    defense = defense_registry.create_defense(name)
    out = defense.aggregate(updates.copy(), weights.copy())
    assert out.updates.ndim == 2 and out.updates.shape[1] == 5 and 1 <= out.updates.shape[0] <= 7
    assert out.updates.dtype == np.float32 and np.isfinite(out.updates).all()
    assert out.weights.shape == (out.updates.shape[0],) and (out.weights >= 0).all() and out.weights.sum() > 0
    assert all(0 <= i < 7 for i in out.excluded) and len(set(out.excluded)) == len(out.excluded)
    assert all(isinstance(v, (int, float)) for v in out.info.values())
    _state_round_trip(defense, defense_registry.create_defense(name))


@pytest.mark.parametrize("name", _case("rule"))
def test_rule_contract(name: str) -> None:
    """``update_keys`` picks trainable names, ``aggregate`` gives a ``(d,)`` delta, ``apply`` keeps the layout."""
    rule = rule_registry.create_rule(name)
    layout = Layout(("a", "b"), ((2, 3), (4,)))
    rng = np.random.default_rng(1)
    # the rows are what the rule's clients send (a delta for FedIT, rank positions for rank-vote)
    start = {"a": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    messages = []
    for _ in range(3):
        local = {k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in start.items()}
        messages.append(rule.client_message(local, start, ["a", "b"]))
        rule.validate_update(messages[-1])
    rows = layout.stack(messages)
    assert set(rule.update_keys(["a", "b"])) <= {"a", "b"}
    delta = rule.aggregate(rows, np.array([1.0, 2.0, 3.0]), layout)
    assert delta.shape == (layout.size,) and np.isfinite(delta).all()
    state = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    new = rule.apply(state, layout.unflatten(delta))
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in state.items()}
    _state_round_trip(rule, rule_registry.create_rule(name))


@pytest.mark.parametrize("name", _case("secure"))
def test_protocol_contract(name: str) -> None:
    """encode -> aggregate of a few contributions: the bucket totals sum to the weighted sum of the updates."""
    protocol = secagg_registry.create_secure_aggregation(name)
    layout = Layout(("a", "b"), ((2, 3), (4,)))
    if type(protocol).server_round is not SecureAggregation.server_round:
        _multi_phase_contract(protocol, layout)
        return
    spec = protocol.payload_spec(layout.specs())
    rng = np.random.default_rng(2)
    updates = [layout.unflatten(rng.normal(size=layout.size).astype(np.float32)) for _ in range(4)]
    weights = [1.0, 2.5, 4.0, 0.5]
    contributions = []
    for i, (update, weight) in enumerate(zip(updates, weights)):
        encoded = protocol.encode(update, weight=weight)
        assert {k: (str(v.dtype), v.shape) for k, v in encoded.items()} == {k: (s.dtype, s.shape) for k, s in spec.items()}
        contributions.append(Contribution(f"c{i}", encoded, weight))
    buckets = protocol.aggregate(contributions)
    members = [m for bucket in buckets for m in bucket.members]
    assert sorted(members) == [f"c{i}" for i in range(4)]
    assert sum(b.weight for b in buckets) == pytest.approx(sum(weights))
    for key in ("a", "b"):
        total = sum(np.asarray(b.total[key], np.float64) for b in buckets)
        expected = sum(w * u[key].astype(np.float64) for u, w in zip(updates, weights))
        np.testing.assert_allclose(total, expected, rtol=1e-3, atol=1e-3)
    assert isinstance(protocol.describe()["server_sees_individual_updates"], bool)
    _state_round_trip(protocol, secagg_registry.create_secure_aggregation(name))


def _multi_phase_contract(protocol: SecureAggregation, layout: Layout) -> None:
    """A multi-phase protocol: run its two halves in memory over four clients (integer weights);
    the bucket totals sum to the weighted sum of the updates within quantisation error."""
    from protocols.secagg import ClientContext, RoundContext

    rng = np.random.default_rng(2)
    cohort = tuple(f"c{i}" for i in range(4))
    updates = {c: layout.unflatten(rng.normal(size=layout.size).astype(np.float32)) for c in cohort}
    weights = dict(zip(cohort, [1.0, 2.0, 4.0, 3.0]))
    context = RoundContext("run", 1, cohort, protocol.assign_buckets(cohort, rng), layout.specs(), 30.0)
    server = protocol.server_round(context)
    clients = {c: protocol.client_round(ClientContext("run", 1, c, layout.specs())) for c in cohort}
    assert drive(server, clients, updates, weights) is None
    buckets = server.result()
    assert sorted(m for b in buckets for m in b.members) == list(cohort)
    assert sum(b.weight for b in buckets) == pytest.approx(sum(weights.values()))
    for key in ("a", "b"):
        total = sum(np.asarray(b.total[key], np.float64) for b in buckets)
        expected = sum(w * updates[c][key].astype(np.float64) for c, w in weights.items())
        np.testing.assert_allclose(total, expected, rtol=1e-3, atol=1e-2)
    assert protocol.describe()["server_sees_individual_updates"] is False
    _state_round_trip(protocol, type(protocol)())


@pytest.mark.parametrize("name", _case("privacy"))
def test_mechanism_contract(name: str) -> None:
    """Transforms keep names and shapes; ``privacy_event`` is a valid event; ``describe`` is JSON."""
    import json

    from privacy.accounting import DiscreteGaussianEvent, GaussianEvent

    mechanism = privacy_registry.create_privacy_mechanism(name)
    if getattr(mechanism, "client_noise", False):  # distributed noise: the server binds the protocol's plan first
        mechanism.bind(step=2.0**-12, buckets=lambda n: [(n, n - 1)], num_values=10, cohort_size=3)  # type: ignore[attr-defined]
    update = {"a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.float32)}
    for out in (mechanism.client_transform(update), mechanism.server_transform(update, num_contributions=3)):
        assert {k: np.shape(v) for k, v in out.items()} == {k: v.shape for k, v in update.items()}
    event = mechanism.privacy_event(cohort_size=3, population=10, contributions=3)
    assert isinstance(event, (GaussianEvent, DiscreteGaussianEvent))
    z = event.noise_multiplier if isinstance(event, GaussianEvent) else event.effective_noise_multiplier
    assert z >= 0 and 0 < event.sample_rate <= 1 and event.steps >= 1
    described = json.loads(json.dumps(mechanism.describe()))
    assert described["mode"] == name and isinstance(described["guarantee"], str)


@pytest.mark.parametrize("name", _case("attack"))
def test_attack_contract(name: str) -> None:
    """``apply`` with a round's context keeps names, shapes and float dtypes; a white-box attack
    refuses ``perturb`` (no honest updates) with a `RobustnessError`; settings are described."""
    from robustness.attacks import AttackContext
    from robustness.errors import RobustnessError

    attack = attack_registry.create_attack(name)
    assert isinstance(type(attack).paper, str) and (name == "none" or type(attack).paper.startswith("https://"))
    rng = np.random.default_rng(0)
    update = {"a": np.ones((2, 3), np.float32), "b": np.full(4, -0.5, np.float32)}
    honest = tuple({"a": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)} for _ in range(4))
    context = AttackContext(1, "client-0", honest, num_attackers=1, cohort_size=5)
    out = attack.apply(update, rng=np.random.default_rng(0), context=context)
    assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in out.items()} == {"a": ((2, 3), np.float32), "b": ((4,), np.float32)}
    assert all(np.isfinite(v).all() for v in out.values())
    try:
        plain = attack.perturb(update, rng=np.random.default_rng(0))
    except RobustnessError:
        assert attack.white_box or name == "backdoor"  # the backdoor's default boost n / eta needs the context
    else:
        assert not attack.white_box and {k: np.shape(v) for k, v in plain.items()} == {"a": (2, 3), "b": (4,)}


@pytest.mark.parametrize("name", list(accountant_registry.available()))
def test_accountant_contract(name: str) -> None:
    """Zero before any release, monotone in noisy releases, unbounded after a noiseless one."""
    from privacy.accounting import GaussianEvent

    accountant = accountant_registry.create_accountant(name)
    assert accountant.epsilon(1e-5) == 0
    spent = []
    for _ in range(3):
        accountant.compose(GaussianEvent(noise_multiplier=1.0, sample_rate=0.1), count=10)
        spent.append(accountant.epsilon(1e-5))
    assert all(0 < e < float("inf") for e in spent) and spent == sorted(spent)
    assert spent[0] < spent[-1]
    accountant.compose(GaussianEvent(noise_multiplier=0.0, sample_rate=1.0))
    assert accountant.epsilon(1e-5) == float("inf")


@pytest.mark.parametrize(("kind", "name"), CONFORMANCE_CASES)
def test_registered_plugin_is_a_valid_config_value(kind: str, name: str) -> None:
    section, key = REGISTRIES[kind][3].split(".")
    cfg = Config.from_dict({section: {key: name}})
    assert getattr(getattr(cfg, section), key) == name


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_unknown_name_lists_allowed_values_and_config_key(kind: str) -> None:
    module, create, _, key = REGISTRIES[kind]
    with pytest.raises(ValueError) as info:
        create("no-such-plugin")
    msg = str(info.value)
    assert "'no-such-plugin'" in msg
    assert key in msg
    assert f"allowed: {', '.join(module.available())}" in msg


# ------------------------------------------------------------------------------ Registry class


class _Thing:
    name = "thing"


class _OtherThing:
    name = "thing"


class _Nameless:
    pass


@pytest.mark.parametrize("registry_cls", REGISTRY_CLASSES, ids=["protocols", "privacy", "robustness"])
def test_registry_behaviour(registry_cls: type) -> None:
    reg = registry_cls("widget", "widget.kind", {"thing": _Thing})
    assert reg.names() == ("thing",)
    assert "thing" in reg and "other" not in reg
    assert reg.get("thing") is _Thing
    assert isinstance(reg.create("thing"), _Thing)

    with pytest.raises(ValueError, match="already registered"):
        reg.register("thing", _OtherThing)
    assert reg.get("thing") is _Thing
    reg.register("thing", _OtherThing, force=True)
    assert reg.get("thing") is _OtherThing

    with pytest.raises(ValueError, match="differs from"):
        reg.register("gadget", _Thing)
    with pytest.raises(ValueError, match="differs from"):
        reg.register("gadget", _Nameless)
    # a mismatched key is refused even with force=True
    with pytest.raises(ValueError, match="differs from"):
        reg.register("gadget", _Thing, force=True)
    assert reg.names() == ("thing",)

    with pytest.raises(ValueError) as info:
        reg.get("gizmo")
    assert "widget.kind" in str(info.value)
    assert "allowed: thing" in str(info.value)


def test_registry_init_rejects_mismatched_builtin() -> None:
    with pytest.raises(ValueError):
        protocols._registry.Registry("widget", "widget.kind", {"other": _Thing})


class _MyDefense(Defense):
    name = "mine"

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> DefenseResult:
        return DefenseResult(updates=updates[:1], weights=weights[:1])


class _MyDefenseV2(_MyDefense):
    name = "mine"


def test_register_defense_duplicates_and_force() -> None:
    defense_registry.register_defense("mine", _MyDefense)
    with pytest.raises(ValueError, match="already registered"):
        defense_registry.register_defense("mine", _MyDefenseV2)
    defense_registry.register_defense("mine", _MyDefenseV2, force=True)
    assert type(defense_registry.create_defense("mine")) is _MyDefenseV2
    # a built-in cannot be silently replaced either
    with pytest.raises(ValueError, match="already registered"):
        defense_registry.register_defense("none", type("FakeNone", (_MyDefense,), {"name": "none"}))


def test_register_defense_name_mismatch() -> None:
    with pytest.raises(ValueError, match="differs from"):
        defense_registry.register_defense("yours", _MyDefense)
    assert "yours" not in defense_registry.available()


def test_user_defense_becomes_a_valid_config_value() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"robustness": {"defense": "mine"}})
    assert info.value.key == "robustness.defense"
    assert "none" in str(info.value)

    defense_registry.register_defense("mine", _MyDefense)
    cfg = Config.from_dict({"robustness": {"defense": "mine"}})
    assert cfg.robustness.defense == "mine"
    assert "mine" in defense_registry.available()
    defense = defense_registry.create_defense(cfg.robustness.defense)
    assert defense.name == "mine"
    out = defense.aggregate(np.ones((3, 2), np.float32), np.ones(3))
    assert out.updates.shape == (1, 2)


def test_registration_is_undone_between_tests() -> None:
    # runs after the tests above (file order): the fixture removed 'mine'
    assert "mine" not in defense_registry.available()
    with pytest.raises(ConfigError):
        Config.from_dict({"robustness": {"defense": "mine"}})


# ------------------------------------------------------------------------------ FedIT


@FAST
@given(
    m=st.integers(1, 6),
    d=st.integers(1, 20),
    seed=st.integers(0, 2**32 - 1),
)
def test_fedit_weighted_mean_matches_numpy(m: int, d: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = rng.normal(size=(m, d)).astype(np.float32)
    weights = rng.uniform(0.1, 100.0, size=m)
    layout = Layout(("x",), ((d,),))
    out = FedIT().aggregate(updates, weights, layout)
    assert out.dtype == np.float32
    assert out.shape == (d,)
    np.testing.assert_allclose(out, np.average(updates.astype(np.float64), axis=0, weights=weights), rtol=1e-5, atol=1e-6)


def test_fedit_single_update_and_equal_weights() -> None:
    layout = Layout(("x",), ((3,),))
    u = np.array([[1.0, -2.0, 3.5]], np.float32)
    np.testing.assert_array_equal(FedIT().aggregate(u, np.array([7.0]), layout), u[0])
    two = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]], np.float32)
    np.testing.assert_array_equal(FedIT().aggregate(two, np.array([5, 5]), layout), [2.0, 3.0, 4.0])
    # integer weights are fine; a zero weight drops a row
    np.testing.assert_array_equal(FedIT().aggregate(two, np.array([0, 2]), layout), two[1])


@pytest.mark.parametrize(
    ("updates", "weights"),
    [
        (np.ones((2, 3), np.float32), np.zeros(2)),
        (np.ones((2, 3), np.float32), np.array([1.0, -1.0])),
        (np.zeros((0, 3), np.float32), np.zeros(0)),
    ],
)
def test_fedit_refuses_non_positive_total_weight(updates: np.ndarray, weights: np.ndarray) -> None:
    with pytest.raises(ValueError, match="positive weight|non-negative"):
        FedIT().aggregate(updates, weights, Layout(("x",), ((3,),)))


def test_fedit_apply_adds_delta_only_to_given_keys() -> None:
    rule = FedIT()
    global_state = {
        "a": np.arange(4, dtype=np.float32).reshape(2, 2),
        "b": np.ones(3, dtype=np.float32),
        "head": np.full(2, 5.0, dtype=np.float32),
    }
    before = {k: v.copy() for k, v in global_state.items()}
    delta = {"a": np.full((2, 2), 0.5, np.float32), "head": np.array([1.0, -1.0], np.float32)}
    new = rule.apply(global_state, delta)
    assert set(new) == set(global_state)
    np.testing.assert_array_equal(new["a"], before["a"] + 0.5)
    np.testing.assert_array_equal(new["b"], before["b"])
    np.testing.assert_array_equal(new["head"], [6.0, 4.0])
    assert all(v.dtype == np.float32 for v in new.values())
    # the input is not modified and the result does not alias it
    for k in global_state:
        np.testing.assert_array_equal(global_state[k], before[k])
    assert new["b"] is not global_state["b"]
    assert rule.update_keys(["a", "b"]) == ["a", "b"]
    assert rule.needs_individual_updates is False


def test_fedit_is_inexact_for_lora_products() -> None:
    """mean(B) @ mean(A) != mean(B @ A): the FedIT approximation error, on a two-client example."""
    states = [
        {"lora_A": np.array([[1.0, 0.0]]), "lora_B": np.array([[1.0], [0.0]])},  # A: (r=1, d=2), B: (d=2, r=1)
        {"lora_A": np.array([[0.0, 1.0]]), "lora_B": np.array([[0.0], [1.0]])},
    ]
    layout = Layout.of(states[0])
    assert layout.shapes == ((1, 2), (2, 1))
    rows = layout.stack(states)
    mean = layout.unflatten(FedIT().aggregate(rows, np.array([1.0, 1.0]), layout))
    np.testing.assert_array_equal(mean["lora_A"], [[0.5, 0.5]])
    np.testing.assert_array_equal(mean["lora_B"], [[0.5], [0.5]])

    fedit_product = mean["lora_B"] @ mean["lora_A"]
    exact_product = np.mean([s["lora_B"] @ s["lora_A"] for s in states], axis=0)
    np.testing.assert_allclose(fedit_product, 0.25 * np.ones((2, 2)))
    np.testing.assert_allclose(exact_product, 0.5 * np.eye(2))
    assert not np.allclose(fedit_product, exact_product)


# ------------------------------------------------------------------------------ Layout

SHAPES = st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple), min_size=0, max_size=5)


@FAST
@given(shapes=SHAPES, seed=st.integers(0, 2**32 - 1))
def test_layout_round_trip(shapes: list[tuple[int, ...]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    state = {f"t{i}": rng.normal(size=shape).astype(np.float32) for i, shape in enumerate(shapes)}
    layout = Layout.of(state)
    assert layout.names == tuple(state)
    assert layout.shapes == tuple(shapes)
    flat = layout.flatten(state)
    assert flat.dtype == np.float32
    assert flat.shape == (layout.size,)
    assert layout.size == sum(int(np.prod(s)) for s in shapes)
    back = layout.unflatten(flat)
    assert list(back) == list(state)
    for name in state:
        assert back[name].shape == state[name].shape
        assert back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], state[name])


def test_layout_with_scalars() -> None:
    state = {"s": np.float32(2.5), "v": np.array([1.0, 2.0]), "z": np.array(-1.0), "m": np.ones((2, 3))}
    state = {k: np.asarray(v) for k, v in state.items()}
    layout = Layout.of(state)
    assert layout.shapes == ((), (2,), (), (2, 3))
    assert layout.sizes == (1, 2, 1, 6)
    assert layout.offsets == (0, 1, 3, 4)
    assert layout.size == 10
    flat = layout.flatten(state)
    np.testing.assert_array_equal(flat, [2.5, 1.0, 2.0, -1.0, 1, 1, 1, 1, 1, 1])
    back = layout.unflatten(flat)
    assert back["s"].shape == () and float(back["s"]) == 2.5
    assert back["z"].shape == () and float(back["z"]) == -1.0
    np.testing.assert_array_equal(back["m"], np.ones((2, 3)))
    # unflatten copies: changing the result leaves the vector alone
    back["v"][0] = 99.0
    assert flat[1] == 1.0


def test_layout_empty() -> None:
    layout = Layout.of({})
    assert layout.size == 0
    assert layout.offsets == ()
    assert layout.flatten({}).shape == (0,)
    assert layout.unflatten(np.zeros(0, np.float32)) == {}
    assert layout.stack([{}, {}]).shape == (2, 0)


def test_layout_stack_shape() -> None:
    layout = Layout(("a", "b"), ((2, 2), (3,)))
    states = [{"a": np.full((2, 2), i), "b": np.arange(3) + i} for i in range(5)]
    rows = layout.stack(states)
    assert rows.shape == (5, 7)
    assert rows.dtype == np.float32
    for i, state in enumerate(states):
        np.testing.assert_array_equal(rows[i], layout.flatten(state))
    assert layout.stack([]).shape == (0, 7)


@pytest.mark.parametrize("bad", [np.zeros(6), np.zeros(8), np.zeros((7, 1)), np.zeros((1, 7)), np.zeros(())])
def test_layout_unflatten_wrong_size(bad: np.ndarray) -> None:
    layout = Layout(("a", "b"), ((2, 2), (3,)))
    with pytest.raises(ValueError, match=r"layout needs \(7,\)"):
        layout.unflatten(bad)


def test_layout_specs() -> None:
    layout = Layout(("a", "b"), ((2, 2), ()))
    specs = layout.specs()
    assert list(specs) == ["a", "b"]
    assert specs["a"].shape == (2, 2) and specs["a"].dtype == "float32"
    assert specs["b"].shape == ()


# ------------------------------------------------------------------------------ PlainAggregation


def test_plain_encode_is_float32() -> None:
    plain = PlainAggregation()
    update = {"a": np.arange(6, dtype=np.float64).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64)}
    encoded = plain.encode(update, weight=3.0)
    assert set(encoded) == {"a", "b"}
    for key, value in encoded.items():
        assert value.dtype == np.float32
        assert value.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(value, update[key])
    assert plain.reveals_individual_updates is True
    assert plain.describe() == {"mode": "plain", "server_sees_individual_updates": True, "bucket_size": 1, "key_custody": None}


def test_plain_encode_makes_non_contiguous_input_contiguous() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4).T
    encoded = PlainAggregation().encode({"t": arr}, weight=1.0)
    assert encoded["t"].flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(encoded["t"], arr)


def test_plain_payload_spec() -> None:
    layout = Layout(("a", "b"), ((2, 3), (4,)))
    spec = PlainAggregation().payload_spec(layout.specs("float64"))
    assert {k: (v.dtype, v.shape) for k, v in spec.items()} == {"a": ("float32", (2, 3)), "b": ("float32", (4,))}


def test_plain_aggregate_one_bucket_per_contribution() -> None:
    rng = np.random.default_rng(0)
    plain = PlainAggregation()
    contributions = []
    for i, weight in enumerate([1.0, 3.0, 12.5]):
        update = {"a": rng.normal(size=(2, 3)), "b": rng.normal(size=4)}
        contributions.append(Contribution(f"client-{i}", plain.encode(update, weight=weight), weight))
    buckets = plain.aggregate(contributions)
    assert len(buckets) == len(contributions)
    for bucket, contribution in zip(buckets, contributions):
        assert isinstance(bucket, BucketSum)
        assert bucket.members == (contribution.client_id,)
        assert bucket.weight == contribution.weight
        mean = bucket.mean()
        for key, value in contribution.tensors.items():
            np.testing.assert_allclose(bucket.total[key], contribution.weight * value, rtol=1e-6)
            assert mean[key].dtype == np.float32
            np.testing.assert_allclose(mean[key], value, rtol=1e-6, atol=1e-7)
    assert plain.aggregate([]) == []


def test_bucket_mean_refuses_zero_weight() -> None:
    bucket = BucketSum(total={"a": np.zeros(2, np.float32)}, weight=0.0, members=("c",))
    with pytest.raises(ValueError, match="non-positive"):
        bucket.mean()


def test_fedit_refuses_nan_and_negative_weights() -> None:
    from secure_fl.peft_agg.fedit import FedIT
    from secure_fl.tensors import Layout

    layout = Layout(("w",), ((2,),))
    rows = np.ones((2, 2), np.float32)
    for bad in ([1.0, np.nan], [2.0, -1.0], [np.inf, 1.0]):
        with pytest.raises(ValueError, match="finite, non-negative"):
            FedIT().aggregate(rows, np.array(bad), layout)


def test_layout_flatten_refuses_wrong_shape() -> None:
    from secure_fl.tensors import Layout

    with pytest.raises(ValueError, match="shape"):
        Layout(("a",), ((2,),)).flatten({"a": np.ones(3)})
