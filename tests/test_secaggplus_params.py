"""SecAgg+'s (k, t) from the parameter analysis: the bounds, the choice, refusals at start, and the
top-level ``[secure] bucket_size`` key."""

from __future__ import annotations

import math
import re
import secrets
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from protocols.errors import Refused
from protocols.secagg import ClientContext, PhaseData
from protocols.secagg import secaggplus_stages as st
from protocols.secagg.secaggplus import SecAggPlus
from protocols.secagg.secaggplus_params import (
    _security_s2, check_parameters, choose_parameters, hypergeometric_tail,
)
from protocols.wire.serde import TensorSpec
from secure_fl.config import load_config
from secure_fl.errors import ConfigError
from secure_fl.simulation import simulate
from tests.conftest import smoke_config

ROOT = Path(__file__).resolve().parents[1]


def _exact_tail(population: int, successes: int, draws: int, at_least: int) -> float:
    total = math.comb(population, draws)
    return sum(math.comb(successes, x) * math.comb(population - successes, draws - x)
               for x in range(max(at_least, 0), min(successes, draws) + 1)) / total


@given(hs.integers(1, 60).flatmap(lambda n: hs.tuples(
    hs.just(n), hs.integers(0, n), hs.integers(0, n), hs.integers(0, n + 1))))
def test_hypergeometric_tail_matches_exact_counting(args) -> None:
    population, successes, draws, at_least = args
    assert hypergeometric_tail(population, successes, draws, at_least) == pytest.approx(
        _exact_tail(population, successes, draws, at_least), rel=1e-9, abs=1e-300)


def _splits(n: int, k: int, removed: int) -> bool:
    """Whether removing ``removed`` random clients disconnects a fresh random H(n, k)."""
    graph = st.neighbour_graph([f"c{i}" for i in range(n)], k)
    gone = set(secrets.SystemRandom().sample(sorted(graph), removed))
    alive = [u for u in graph if u not in gone]
    seen, todo = {alive[0]}, [alive[0]]
    while todo:
        for v in graph[todo.pop()]:
            if v not in gone and v not in seen:
                seen.add(v)
                todo.append(v)
    return len(seen) < len(alive)


@pytest.mark.parametrize(("n", "k", "removed"), [(40, 6, 12), (60, 4, 8), (50, 8, 20)])
def test_the_split_bound_holds_on_the_graph_we_build(n: int, k: int, removed: int) -> None:
    """S2 is an upper bound on how often the honest survivors' graph splits (Monte Carlo, 1,500 graphs)."""
    bound = _security_s2(n, k, removed, 0)
    assert bound < 1
    rate = sum(_splits(n, k, removed) for _ in range(1500)) / 1500
    assert rate <= bound + 0.03, (rate, bound)  # 0.03: four standard errors at these rates
    assert rate > 0  # the event is real at these sizes: the bound is not vacuous


def test_no_split_when_fewer_than_k_are_removed() -> None:
    assert _security_s2(40, 6, 5, 0) == 0.0
    assert not any(_splits(40, 6, 5) for _ in range(200))


#: The table in docs/threat-model.md (gamma = 0.05, delta = 0.1, 2^-40 / 2^-30).
DOC_TABLE = {4: (3, 2), 10: (4, 3), 32: (10, 6), 100: (22, 12), 1000: (48, 25), 10000: (56, 29)}


@pytest.mark.parametrize(("n", "expected"), sorted(DOC_TABLE.items()))
def test_default_choice_matches_the_documented_table(n: int, expected: tuple[int, int]) -> None:
    p = choose_parameters(n, corrupt_fraction=0.05, dropout_fraction=0.1)
    assert (p.k, p.t) == expected
    text = (ROOT / "docs" / "threat-model.md").read_text(encoding="utf-8")
    assert re.search(rf"\| {n:,} \| {expected[0]} \| {expected[1]} \|", text), f"row for n={n} missing or stale"


@settings(max_examples=60, deadline=None)
@given(hs.integers(4, 400), hs.sampled_from([0.0, 0.01, 0.05, 0.1, 0.2]), hs.sampled_from([0.0, 0.05, 0.1, 0.2]))
def test_every_choice_meets_both_targets_and_is_the_cheapest(n: int, gamma: float, delta: float) -> None:
    try:
        p = choose_parameters(n, corrupt_fraction=gamma, dropout_fraction=delta)
    except ValueError as exc:  # infeasible: the complete graph cannot do it either
        assert "even the complete graph" in str(exc)
        complete = n - 1
        corrupt, dropped = math.ceil(gamma * n - 1e-12), math.ceil(delta * n - 1e-12)
        assert max(2, corrupt + 1, complete // 2 + 1) > complete - dropped
        return
    assert p.security_log2 <= -40 and p.correctness_log2 <= -30
    assert 2 <= p.t <= p.k <= n - 1 and p.t > p.k // 2 and (p.k % 2 == 0 or p.complete)
    if p.k > 2 and not p.complete:
        with pytest.raises(ValueError):  # the next smaller k cannot meet the targets
            check_parameters(n, k=p.k - 2, threshold=None, corrupt_fraction=gamma, dropout_fraction=delta)


def test_explicit_settings_that_miss_a_target_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match=r"k = 10 .* security bound is 2\^-20\.1 .* split the honest survivors' graph"
                                          r".* automatic choice for these fractions is k = 22, t = 12"):
        check_parameters(100, k=10, threshold=None, corrupt_fraction=0.05, dropout_fraction=0.1)
    with pytest.raises(ValueError, match=r"t or more of the 20 corrupt clients"):
        check_parameters(100, k=0, threshold=0.1, corrupt_fraction=0.2, dropout_fraction=0.0)
    with pytest.raises(ValueError, match=r"correctness bound is 2\^0\.0 > 2\^-30 \(with 30 dropouts"):
        check_parameters(100, k=0, threshold=0.9, corrupt_fraction=0.0, dropout_fraction=0.3)
    with pytest.raises(ValueError, match="even the complete graph"):
        choose_parameters(3, corrupt_fraction=0.05, dropout_fraction=0.1)
    ok = check_parameters(100, k=10, threshold=None, corrupt_fraction=0.0, dropout_fraction=0.0)
    assert (ok.k, ok.t) == (10, 6)


def test_the_server_refuses_a_cohort_no_safe_parameters_protect(tmp_path: Path) -> None:
    config = smoke_config("secure.mode='secagg+'", "run.num_clients=3", "run.clients_per_round=3", "run.min_updates=3")
    with pytest.raises(ConfigError, match=r"run.clients_per_round=3: no SecAgg\+ \(k, t\) protects a bucket of 3"):
        simulate(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
    relaxed = smoke_config("secure.mode='secagg+'", "secure.params.dropout_fraction=0.0", "run.num_clients=3",
                           "run.clients_per_round=3", "run.min_updates=3", "run.rounds=1")
    result = simulate(relaxed, tmp_path / "relaxed", progress=False)
    assert result.metrics[0]["status"] == "ok"
    rows = {row["party"]: row for row in reversed(result.report["threat_model"])}  # first row per party
    assert "k = 2, t = 2 for buckets of 3" in rows["server"]["protected_by"]  # the report reads describe()
    collusion = rows["server colluding with clients"]
    assert "t or more of its neighbours" in collusion["sees"] and "0.05 of a bucket colluding" in collusion["protected_by"]
    assert "honest-but-curious" in rows["a server that deviates from the protocol"]["protected_by"]
    codes = {w["code"]: w["message"] for w in result.report["warnings"]}
    assert "honest-but-curious" in codes
    assert "small-buckets" in codes and "bucket of 3 clients" in codes["small-buckets"]  # no DP: the sum of 3 is exposed
    assert "central-noise-server" not in codes


def test_client_refuses_a_neighbourhood_that_breaks_the_parameters() -> None:
    protocol = SecAggPlus(bucket_size=10)
    client = protocol.client_round(ClientContext("run-x", 1, "c0", {"a": TensorSpec("a", "float32", (3,))}))
    client.on_phase(st.ADVERTISE_KEYS, PhaseData(blobs={st.BUCKET: b"0", st.SIZE: b"10"}))
    keys = {}
    for i in range(1, 7):  # six neighbours, but k = 4 for a bucket of 10
        other = protocol.client_round(ClientContext("run-x", 1, f"c{i}", {}))
        answer = other.on_phase(st.ADVERTISE_KEYS, PhaseData(blobs={st.BUCKET: b"0", st.SIZE: b"10"}))
        keys[f"c/c{i}"], keys[f"s/c{i}"] = answer.blobs[st.ENCRYPTION_KEY], answer.blobs[st.MASK_KEY]
    with pytest.raises(Refused, match="sent 6 neighbours, but k = 4"):
        client.on_phase(st.SHARE_KEYS, PhaseData(blobs=keys))
    fresh = SecAggPlus().client_round(ClientContext("run-x", 1, "c0", {}))
    with pytest.raises(Refused, match="refusing a bucket of 3"):
        fresh.on_phase(st.ADVERTISE_KEYS, PhaseData(blobs={st.BUCKET: b"0", st.SIZE: b"3"}))


def test_describe_names_the_parameters_of_each_planned_bucket() -> None:
    protocol = SecAggPlus(bucket_size=8)
    protocol.check_cohort(20)  # 20 clients -> 3 buckets of 6 or 7
    sizes = [(p["n"], p["k"], p["t"]) for p in protocol.describe()["bucket_parameters"]]  # type: ignore[union-attr]
    assert sizes == [(6, 4, 3), (7, 4, 3)]
    assert "honest-but-curious" in str(protocol.describe()["adversary_model"])


def test_bucket_size_is_a_top_level_secure_key(tmp_path: Path) -> None:
    config = smoke_config("secure.mode='secagg+'", "secure.bucket_size=8")
    assert config.secure.bucket_size == 8 and config.secure.params["bucket_size"] == 8
    legacy = smoke_config("secure.mode='secagg+'", "secure.params.bucket_size=8")
    assert legacy.secure.bucket_size == 8
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml(), encoding="utf-8")
    assert load_config(path) == config
    with pytest.raises(ConfigError, match=r"secure.bucket_size: is 8 but secure.params.bucket_size is 6"):
        smoke_config("secure.mode='secagg+'", "secure.bucket_size=8", "secure.params.bucket_size=6")
    plain = smoke_config("secure.bucket_size=4")  # plain mode: the server buckets the updates (bucketing)
    assert plain.secure.bucket_size == 4 and "bucket_size" not in plain.secure.params
    with pytest.raises(ConfigError, match=r"secure.bucket_size"):
        smoke_config("secure.mode='secagg+'", "secure.bucket_size=-1")
