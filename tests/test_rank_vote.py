"""Rank voting (FRL, ``peft.rule = "rank-vote"``): the oracle of algorithms.md section 1, its
invariants, one ordering key (pitfall a), raw vote sums, plaintext vote validation through the
server's admission path, exact sums under SecAgg+, refusals, and end-to-end runs in both modes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs
from safetensors.numpy import load_file

import protocols.secagg.registry as protocol_registry
import robustness.defenses.registry as defense_registry
from protocols.secagg import ClientContext, RoundContext
from protocols.secagg.plain import PlainAggregation
from protocols.secagg.secaggplus import SecAggPlus
from protocols.wire.serde import TensorSpec
from robustness.defenses.none import NoDefense
from secure_fl.client.client import ClientStages, FederatedClient
from secure_fl.client.trainer import LocalTrainer
from secure_fl.data.sources import client_dataset
from secure_fl.errors import ConfigError, TransportError
from secure_fl.models import load_adapter
from secure_fl.peft_agg import create_rule, supermask
from secure_fl.peft_agg.rank_vote import RankVote
from secure_fl.server.engine import BackgroundRun, FederatedServer
from secure_fl.server.pipeline import ServerPipeline
from secure_fl.simulation import simulate
from secure_fl.stages import Stages
from secure_fl.tensors import Layout
from secure_fl.transport.inprocess import InProcessTransport
from tests.conftest import smoke_config
from tests.harness import drive

RANK_VOTE = ("peft.rule='rank-vote'", "client.lr=0.1")
ORACLE_SCORES = np.array([[0.1, 0.4, 0.3, 0.2], [0.2, 0.1, 0.4, 0.3], [0.4, 0.3, 0.2, 0.1]])
LAYOUT = Layout(("w",), ((4,),))


def _votes(scores: np.ndarray) -> np.ndarray:
    rule = RankVote()
    return np.stack([rule.client_message({"w": s}, {"w": s}, ["w"])["w"] for s in scores])


# ------------------------------------------------------------------------------ the oracle


def test_oracle_positions_vote_order_and_mask() -> None:
    rule = RankVote(sparsity=0.5)
    rows = _votes(ORACLE_SCORES)
    assert rows.dtype == np.float32
    assert rows.tolist() == [[0, 3, 2, 1], [1, 0, 3, 2], [3, 2, 1, 0]]
    votes = rule.aggregate(rows, np.ones(3), LAYOUT)
    assert votes.tolist() == [4, 5, 6, 3]
    assert supermask.order(votes).tolist() == [3, 0, 1, 2]
    initial = np.array([0.7, 0.1, 0.9, 0.3], dtype=np.float32)
    new = rule.apply({"w": initial}, LAYOUT.unflatten(votes.astype(np.float32)))["w"]
    assert new.tolist() == pytest.approx([0.3, 0.7, 0.9, 0.1])  # edge g[j] gets the j-th smallest score
    assert np.flatnonzero(rule.mask(new)).tolist() == [1, 2]  # k = 0.5 keeps edges {1, 2}
    assert sorted(new.tolist()) == sorted(initial.tolist())  # the score multiset never changes
    assert ((votes >= 0) & (votes <= 3 * (4 - 1))).all()


def test_one_ordering_key_signed_scores_pitfall_a() -> None:
    """Signed scores symmetric about 0: the lowest-voted edges get the most negative scores and stay out."""
    rule = RankVote(sparsity=0.5)
    initial = np.array([-0.9, -0.5, 0.1, 0.6], dtype=np.float32)
    votes = rule.aggregate(_votes(ORACLE_SCORES), np.ones(3), LAYOUT)  # g = [3, 0, 1, 2]
    new = rule.apply({"w": initial}, LAYOUT.unflatten(votes.astype(np.float32)))["w"]
    kept = set(np.flatnonzero(rule.mask(new)).tolist())
    assert kept == {1, 2} == set(supermask.order(votes)[2:].tolist())
    by_magnitude = set(np.argsort(-np.abs(new), kind="stable")[:2].tolist())  # the released code's mask key
    assert by_magnitude != kept and 3 in by_magnitude  # |score| would keep the worst-voted edge 3
    # the forward mask (torch) keeps the same edges as the numpy twin and the client's ranking
    mask = supermask.TopKMask.apply(torch.tensor(new), 2)
    assert np.flatnonzero(mask.numpy()).tolist() == [1, 2]
    assert rule.client_message({"w": new}, {"w": new}, ["w"])["w"].argsort()[2:].tolist() == [1, 2]


def test_ties_are_broken_by_edge_index() -> None:
    votes = np.array([2.0, 2.0, 2.0, 2.0])
    assert supermask.order(votes).tolist() == [0, 1, 2, 3]
    assert supermask.positions(np.array([0.5, 0.5, 0.1, 0.5])).tolist() == [1, 2, 0, 3]


@settings(max_examples=40, deadline=None)
@given(n=hs.integers(1, 9), m=hs.integers(1, 40), split=hs.integers(1, 4), seed=hs.integers(0, 2**31 - 1))
def test_bucket_means_times_counts_give_the_raw_vote_sums(n: int, m: int, split: int, seed: int) -> None:
    """Property: however the votes are bucketed (float32 means), the rule recovers the exact integer sums."""
    rng = np.random.default_rng(seed)
    rule = RankVote(sparsity=float(rng.uniform(0.05, 1.0)))
    layout = Layout(("w",), ((m,),))
    votes = np.stack([rng.permutation(m) for _ in range(n)]).astype(np.float32)
    groups = np.array_split(np.arange(n), min(split, n))
    means = np.stack([votes[g].astype(np.float64).sum(0) / len(g) for g in groups]).astype(np.float32)
    total = rule.aggregate(means, np.array([len(g) for g in groups], dtype=np.float64), layout)
    np.testing.assert_array_equal(total, votes.astype(np.int64).sum(0))
    assert ((total >= 0) & (total <= n * (m - 1))).all() and total.sum() == n * m * (m - 1) // 2
    scores = rng.permutation(m).astype(np.float32) / m
    new = rule.apply({"w": scores}, layout.unflatten(total.astype(np.float32)))["w"]
    assert np.array_equal(np.sort(new), np.sort(scores))
    kept = supermask.kept_edges(m, rule.sparsity)
    assert set(np.flatnonzero(rule.mask(new))) == set(supermask.order(total)[m - kept :])


def test_pipeline_counts_every_client_once_whatever_its_example_count() -> None:
    """Plain buckets carry example-count weights; the vote still sums raw positions (one client, one vote)."""
    from protocols.secagg import BucketSum

    config = smoke_config(*RANK_VOTE)
    stages = Stages.from_config(config)
    pipeline = ServerPipeline(stages, LAYOUT)
    rows = _votes(ORACLE_SCORES)
    buckets = [BucketSum({"w": r.astype(np.float64) * w}, w, (f"c{i}",)) for i, (r, w) in enumerate(zip(rows, [5.0, 90.0, 1.0]))]
    scores = np.array([0.25, 0.5, 0.75, 1.0], dtype=np.float32)
    state = pipeline.aggregate_buckets({"w": scores}, buckets, num_contributions=3).state["w"]
    assert state.tolist() == [0.5, 0.75, 1.0, 0.25]  # V = [4, 5, 6, 3], not a weighted mean


def test_aggregate_refuses_sums_no_votes_can_give() -> None:
    rule = RankVote()
    with pytest.raises(ValueError, match="not integral"):
        rule.aggregate(np.array([[0.5, 1, 2, 2.5]], np.float32), np.ones(1), LAYOUT)
    with pytest.raises(ValueError, match="outside"):
        rule.aggregate(np.array([[-1, 3, 2, 2]], np.float32), np.ones(1), LAYOUT)
    with pytest.raises(ValueError, match="totals"):
        rule.aggregate(np.array([[0, 0, 1, 1]], np.float32), np.ones(1), LAYOUT)


@pytest.mark.parametrize("kwargs", [{"sparsity": 0.0}, {"sparsity": 1.5}, {"gain": 0.0}, {"sparsity": True}])
def test_settings_are_validated(kwargs: dict) -> None:
    key = next(iter(kwargs))
    with pytest.raises(ValueError, match=key):
        RankVote(**kwargs)


def test_supermask_forward_uses_w_times_mask_and_the_gradient_goes_straight_to_the_scores() -> None:
    layer = torch.nn.Linear(6, 3, bias=False)
    supermask.attach(layer, "layer.weight", seed=5, gain=2.0, sparsity=0.5)
    scores = layer.parametrizations.weight.original
    constants = supermask.signed_constants("layer.weight", (3, 6), seed=5, gain=2.0)
    assert torch.unique(constants.abs()).tolist() == [pytest.approx(2.0 / 6**0.5)]
    assert {-1.0, 1.0} == set(torch.sign(constants).unique().tolist())
    mask = torch.tensor(supermask.mask_of(scores.detach().numpy(), 9))
    assert torch.equal(layer.weight, constants * mask) and int(mask.sum()) == 9
    x = torch.randn(4, 6)
    layer(x).sum().backward()
    expected = torch.ones(3, 1) @ x.sum(0, keepdim=True) * constants  # dL/d(W M) * W, mask skipped
    torch.testing.assert_close(scores.grad, expected)
    assert sorted(scores.detach().reshape(-1).tolist()) == pytest.approx([(i + 1) / 18 for i in range(18)])


def test_only_scores_train_and_the_constants_are_in_the_fingerprint() -> None:
    from secure_fl.peft_agg.hooks import build_for_rule, rule_fingerprint
    from secure_fl.workload import TextClassification

    config = smoke_config(*RANK_VOTE)
    workload = TextClassification(config.model, config.peft, ["a", "b", "c", "d"])
    one = build_for_rule(workload, RankVote(gain=1.0), seed=0)
    other = build_for_rule(workload, RankVote(gain=0.5), seed=0)
    assert one.trainable_names and all(n.endswith(supermask.SCORES_SUFFIX) for n in one.trainable_names)
    assert len(one.trainable_names) == 9  # 2 layers x (query, value) x (A, B) + the head
    assert rule_fingerprint(one.model, RankVote()) != rule_fingerprint(other.model, RankVote())


# ------------------------------------------------------------------------------ validation


def test_validate_update_accepts_permutations_and_names_the_tensor() -> None:
    rule = RankVote()
    good = {"a": np.array([[2, 0], [1, 3]], np.float32), "b": np.array([0], np.float32)}
    rule.validate_update(good)
    for bad in ([0, 0, 2, 3], [0, 1, 2, 4], [0, 1.5, 2, 3], [-1, 1, 2, 3]):
        with pytest.raises(ValueError, match=r"tensor 'a': the vote is not a permutation of 0\.\.3"):
            rule.validate_update({"a": np.array(bad, np.float32).reshape(2, 2), "b": good["b"]})


@settings(max_examples=50, deadline=None)
@given(m=hs.integers(2, 60), seed=hs.integers(0, 2**31 - 1), kind=hs.sampled_from(["dup", "range", "frac"]))
def test_every_tampered_permutation_is_refused(m: int, seed: int, kind: str) -> None:
    rng = np.random.default_rng(seed)
    vote = rng.permutation(m).astype(np.float32)
    RankVote().validate_update({"t": vote})
    i, j = rng.choice(m, size=2, replace=False)
    bad = vote.copy()
    bad[i] = {"dup": bad[j], "range": m, "frac": bad[i] + 0.5}[kind]
    with pytest.raises(ValueError, match="tensor 't'"):
        RankVote().validate_update({"t": bad})


def test_non_permutation_vote_is_rejected_with_client_and_tensor_named(tmp_path: Path) -> None:
    """Through the server's admission path: the bad upload is refused, the round goes on with the others."""
    config = smoke_config(*RANK_VOTE, "run.rounds=1")
    server = FederatedServer(config, tmp_path / "run", transport="in-process")
    shared = server.workload.build(seed=config.run.seed)  # one model for the four clients (they train in turn)
    clients = [
        FederatedClient(
            f"client-{i}", InProcessTransport(server.coordinator),
            LocalTrainer.from_config(config, client_dataset(config, i), adapted=shared),
            ClientStages.from_config(config), seed=config.run.seed,
        )
        for i in range(4)
    ]
    bad = clients[3]
    honest = bad.trainer.rule.client_message
    target = bad.trainer.update_keys[-1]

    def duplicated(local, start, keys):  # type: ignore[no-untyped-def]
        message = honest(local, start, keys)
        flat = message[target].ravel().copy()
        flat[flat == 0] = 1.0  # position 1 twice, position 0 missing
        message[target] = flat.reshape(message[target].shape)
        return message

    bad.trainer.rule.client_message = duplicated  # type: ignore[method-assign]
    for client in clients:
        client.join()
    rounds = BackgroundRun(server)
    refused: list[TransportError] = []
    alive = list(clients)
    while rounds.is_alive() and alive:
        for client in list(alive):
            try:
                if client.step() == "finished":
                    alive.remove(client)
            except TransportError as exc:
                refused.append(exc)
                client.leave("refused")
                alive.remove(client)
    rounds.join(60)
    record = rounds.result().metrics[0]
    assert len(refused) == 1 and refused[0].code == "INVALID_ARGUMENT"
    assert "client 'client-3'" in str(refused[0]) and f"tensor {target!r}" in str(refused[0])
    assert "not a permutation" in str(refused[0])
    assert record["status"] == "ok" and record["clients"] == 3 and record["dropped"] == ["client-3"]


def test_votes_are_validated_only_where_the_server_sees_them(tmp_path: Path) -> None:
    plain = FederatedServer(smoke_config(*RANK_VOTE), tmp_path / "plain", transport="in-process")
    assert plain.coordinator.validate_update == plain.stages.rule.validate_update
    secure = FederatedServer(smoke_config(*RANK_VOTE, "secure.mode='secagg+'"), tmp_path / "secagg", transport="in-process")
    assert secure.coordinator.validate_update is None  # only bucket sums arrive: validity is unchecked
    assert secure.stages.secure.integer_inputs and "integer_inputs" in secure.stages.secure.describe()


# ------------------------------------------------------------------------------ SecAgg+


def test_secagg_plus_integer_plan_sums_votes_exactly() -> None:
    """Step-1 integer plan: the unmasked bucket sums are the plaintext vote sums, exactly."""
    protocol = SecAggPlus()
    protocol.enable_integer_inputs()
    shapes = {"a": (3, 7), "b": (5,)}
    spec = {k: TensorSpec(k, "float32", s) for k, s in shapes.items()}
    plan = protocol.plan(5, 26)
    assert plan.step == 1.0 and plan.clip_range == 32 and plan.max_weight == 1
    rng = np.random.default_rng(3)
    cohort = tuple(f"c{i}" for i in range(5))
    updates = {c: {k: rng.permutation(int(np.prod(s))).reshape(s).astype(np.float32) for k, s in shapes.items()} for c in cohort}
    weights = {c: float(rng.integers(1, 200)) for c in cohort}  # example counts: ignored, every vote counts once
    server = protocol.server_round(RoundContext("run-x", 1, cohort, (cohort,), spec, 30.0))
    clients = {c: protocol.client_round(ClientContext("run-x", 1, c, spec)) for c in cohort}
    drive(server, clients, updates, weights)
    (bucket,) = server.result()
    assert bucket.weight == 5.0
    for name in shapes:
        expected = sum(updates[c][name].astype(np.int64) for c in cohort)
        np.testing.assert_array_equal(np.asarray(bucket.total[name]).reshape(shapes[name]), expected)
        np.testing.assert_array_equal(np.rint(bucket.mean()[name].astype(np.float64) * bucket.weight), expected)


def test_rank_vote_end_to_end_plain_and_secagg_plus(tmp_path: Path) -> None:
    """Smoke preset, 2 rounds: accuracy is reported, the adapter changes, and SecAgg+ gives the plain result bit for bit."""
    plain = simulate(smoke_config(*RANK_VOTE), tmp_path / "plain", progress=False)
    secure = simulate(smoke_config(*RANK_VOTE, "secure.mode='secagg+'"), tmp_path / "secagg", progress=False)
    assert [r["status"] for r in plain.metrics + secure.metrics] == ["ok"] * 4
    assert all(r["clients"] == 4 and r["stages"]["rule"] == "rank-vote" for r in plain.metrics + secure.metrics)
    assert plain.metrics[-1]["accuracy"] > 0.5  # chance is 0.25 (4 labels); measured 0.742
    assert [r["accuracy"] for r in secure.metrics] == [r["accuracy"] for r in plain.metrics]
    assert plain.global_state.keys() == secure.global_state.keys()
    for name, value in plain.global_state.items():
        np.testing.assert_array_equal(secure.global_state[name], value)  # exact vote sums under SecAgg+
    rule = create_rule("rank-vote")
    changed = 0
    for name, value in plain.global_state.items():
        assert name.endswith(supermask.SCORES_SUFFIX)
        start = supermask.initial_scores(name.removesuffix(supermask.SCORES_SUFFIX) + ".weight", value.shape, seed=0).numpy()
        assert np.array_equal(np.sort(value, axis=None), np.sort(start, axis=None))  # multiset unchanged
        changed += int(not np.array_equal(rule.mask(value), rule.mask(start)))
    assert changed == len(plain.global_state)  # every mask moved
    # the saved adapter holds W * M as plain peft weights, and reloads
    saved = load_file(str(plain.adapter_dir / "adapter_model.safetensors"))
    for name, value in plain.global_state.items():
        layer = name.removesuffix(supermask.SCORES_SUFFIX)
        key = layer.replace("modules_to_save.", "").replace(".default", "") + ".weight"
        constants = supermask.signed_constants(layer + ".weight", value.shape, seed=0, gain=1.0).numpy()
        np.testing.assert_array_equal(saved[key], constants * rule.mask(value))
    model, _, labels = load_adapter(plain.adapter_dir)
    assert len(labels) == 4 and not any("parametrizations" in n for n, _ in model.named_parameters())


# ------------------------------------------------------------------------------ refusals


@pytest.fixture
def _restore_registries() -> Iterator[None]:
    saved = [(r, dict(r._entries)) for r in (protocol_registry._PROTOCOLS, defense_registry._DEFENSES)]
    yield
    for registry, entries in saved:
        registry._entries.clear()
        registry._entries.update(entries)


class _SumOnly(PlainAggregation):
    name = "test-sum-only"
    reveals_individual_updates = False


class _Trim(NoDefense):
    name = "test-trim"


@pytest.mark.usefixtures("_restore_registries")
@pytest.mark.parametrize(("override", "key"), [
    ("privacy.mode='central'", "privacy.mode"),
    ("robustness.defense='test-trim'", "robustness.defense"),
    ("secure.mode='test-sum-only'", "secure.mode"),
])
def test_combinations_that_break_the_vote_are_refused(override: str, key: str) -> None:
    protocol_registry.register_secure_aggregation("test-sum-only", _SumOnly)
    defense_registry.register_defense("test-trim", _Trim)
    with pytest.raises(ConfigError) as info:
        Stages.from_config(smoke_config(*RANK_VOTE, override))
    assert info.value.key == key and "rank-vote" in str(info.value)
