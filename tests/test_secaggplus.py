"""SecAgg+ (``secure.mode = "secagg+"``): exact sums of the survivors with drops in every phase,
aborts with a reason when too few remain, the never-reveal-both rule, tampered shares, and a
simulation that matches plain mode.

Most tests drive the two halves directly (`_drive`, no transport, no training): fast, and the
quantised inputs are known, so the unmasked sum is checked exactly. A few run the real engine with
clients dropping out through `DroppingTransport` (`tests/harness.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as hs

from protocols.errors import InvalidShare, MalformedMessage, ProtocolAbort, ProtocolError, Refused, StageTransitionError
from protocols.secagg import ClientContext, PhaseData, RoundContext
from protocols.secagg import secaggplus_stages as st
from protocols.secagg.quantize import dequantize_sum
from protocols.secagg.registry import create_secure_aggregation
from protocols.secagg.secaggplus import SecAggPlus
from protocols.wire.serde import TensorSpec
from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.errors import ConfigError, TransportError
from secure_fl.server.engine import FederatedServer
from secure_fl.simulation import simulate
from secure_fl.stages import Stages
from secure_fl.transport.inprocess import InProcessTransport
from tests.conftest import smoke_config
from tests.harness import drive, in_process_parties, step_all
from tests.test_grpc_round import make_client

SHAPES = {"a": (3, 4), "b": (5,)}
SPEC = {k: TensorSpec(k, "float32", s) for k, s in SHAPES.items()}


def _updates(n: int, seed: int = 0) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    rng = np.random.default_rng(seed)
    ids = [f"c{i}" for i in range(n)]
    updates = {c: {k: rng.normal(scale=0.5, size=s).astype(np.float32) for k, s in SHAPES.items()} for c in ids}
    weights = {c: float(rng.integers(1, 50)) for c in ids}
    return updates, weights


def _drive(protocol: SecAggPlus, updates: Mapping[str, Mapping[str, np.ndarray]], weights: Mapping[str, float], *,
           drops: Mapping[str, set[str]] | None = None, tamper: tuple[str, str] | None = None):
    """Run one round of both halves in memory; return (bucket sums, quantised inputs, client errors, buckets).

    ``drops[phase]`` are clients that do not answer that phase; ``tamper = (receiver, sender)``
    flips one byte of the encrypted share the server routes from sender to receiver.
    """
    drops = drops or {}
    cohort = tuple(sorted(updates))
    context = RoundContext("run-x", 3, cohort, protocol.assign_buckets(cohort, np.random.default_rng(0)), SPEC, 30.0)
    server = protocol.server_round(context)
    clients = {c: protocol.client_round(ClientContext("run-x", 3, c, SPEC)) for c in cohort}
    quantised: dict[str, dict[str, np.ndarray]] = {}
    errors: dict[str, ProtocolError] = {}

    def flip_one_byte(phase, client: str, data: PhaseData) -> PhaseData:
        if not (tamper and phase.trains and client == tamper[0]):
            return data
        blob = bytearray(data.blobs[st.SHARE + tamper[1]])
        blob[-5] ^= 0x01
        return PhaseData(blobs={**data.blobs, st.SHARE + tamper[1]: bytes(blob)})

    drive(server, clients, updates, weights, drops=drops, alter=flip_one_byte, quantised=quantised, errors=errors)
    return server.result(), quantised, errors, context.buckets


def _check_exact(protocol: SecAggPlus, sums, quantised, weights, buckets) -> None:
    """Every bucket total equals the decoded plain sum of its members' weighted quantised inputs."""
    for bucket in sums:
        members = bucket.members
        size = next(len(b) for b in buckets if members[0] in b)  # the plan is fixed when the round opens
        ws = {c: max(1, min(protocol.max_weight, round(weights[c]))) for c in members}
        words = sum(ws[c] * np.concatenate([quantised[c][k].astype(np.int64) for k in sorted(SHAPES)]) for c in members)
        expected = dequantize_sum(words, protocol.plan(size), len(members), sum(ws.values()))
        got = np.concatenate([np.ravel(bucket.total[k]) for k in sorted(SHAPES)])
        np.testing.assert_array_equal(got, expected)
        assert bucket.weight == sum(ws.values())


def _members(sums) -> list[str]:
    return [c for b in sums for c in b.members]


def _run(protocol: SecAggPlus, n: int, **kw):
    updates, weights = _updates(n)
    sums, quantised, errors, buckets = _drive(protocol, updates, weights, **kw)
    return sums, quantised, errors, weights, updates, buckets


def test_no_drops_sums_exactly() -> None:
    protocol = SecAggPlus()
    sums, quantised, errors, weights, updates, buckets = _run(protocol, 5)
    assert errors == {} and len(sums) == 1 and sums[0].members == tuple(f"c{i}" for i in range(5))
    _check_exact(protocol, sums, quantised, weights, buckets)
    mean = sums[0].mean()["a"]  # and it is the weighted mean up to quantisation
    expected = sum(weights[c] * updates[c]["a"] for c in updates) / sum(weights.values())
    np.testing.assert_allclose(mean, expected, atol=protocol.plan(5).step)


def test_sparse_graph_and_buckets() -> None:
    protocol = SecAggPlus(neighbours=4, bucket_size=8)
    sums, quantised, errors, weights, _, buckets = _run(protocol, 14)
    assert errors == {} and len(sums) == 2 and sorted(_members(sums)) == sorted(f"c{i}" for i in range(14))
    assert {len(b.members) for b in sums} == {7}
    _check_exact(protocol, sums, quantised, weights, buckets)


@pytest.mark.parametrize("phase", st.PHASES)
def test_a_drop_in_each_phase_is_recovered_exactly(phase: str) -> None:
    protocol = SecAggPlus()
    sums, quantised, errors, weights, _, buckets = _run(protocol, 5, drops={phase: {"c2"}})
    members = sums[0].members
    assert ("c2" in members) == (phase == st.UNMASK)  # after masked-input the update is in the sum
    assert len(members) == (5 if phase == st.UNMASK else 4)
    _check_exact(protocol, sums, quantised, weights, buckets)


def test_drops_in_several_phases_are_recovered_exactly() -> None:
    protocol = SecAggPlus(neighbours=0, threshold=0.34)  # complete graph: 4 of 8 drop
    drops = {st.ADVERTISE_KEYS: {"c0"}, st.SHARE_KEYS: {"c1"}, st.MASKED_INPUT: {"c2"}, st.UNMASK: {"c3"}}
    sums, quantised, errors, weights, _, buckets = _run(protocol, 8, drops=drops)
    assert sums[0].members == ("c3", "c4", "c5", "c6", "c7")
    _check_exact(protocol, sums, quantised, weights, buckets)


@pytest.mark.parametrize(("drops", "match"), [
    ({st.ADVERTISE_KEYS: {"c0", "c1"}}, r"only 2 client\(s\) advertised keys"),
    ({st.MASKED_INPUT: {"c0", "c1"}}, r"after masked-input: only 1 of c\d's neighbours remain .* t = 2"),
    ({st.UNMASK: {"c0", "c1"}}, r"after unmask: 1 share\(s\) of c\d's self-mask seed arrived, t = 2 needed"),
])
def test_too_few_survivors_abort_with_a_reason(drops, match: str) -> None:
    with pytest.raises(ProtocolAbort, match=match):
        _run(SecAggPlus(), 4, drops=drops)


def _client_at_unmask(protocol: SecAggPlus):
    """Run a 4-client round up to its unmask phase and return (client c0, its unmask payload)."""
    cohort = ("c0", "c1", "c2", "c3")
    updates, weights = _updates(4)
    context = RoundContext("run-x", 1, cohort, ((cohort),), SPEC, 30.0)
    server = protocol.server_round(context)
    clients = {c: protocol.client_round(ClientContext("run-x", 1, c, SPEC)) for c in cohort}
    phase = drive(server, clients, updates, weights, stop_at=st.UNMASK)
    assert phase is not None
    return clients["c0"], phase.payloads["c0"]


def test_client_never_reveals_both_shares_of_one_peer() -> None:
    client, payload = _client_at_unmask(SecAggPlus())
    assert st.decode_ids(payload.blobs[st.SURVIVED]) == ["c1", "c2", "c3"]
    with pytest.raises(Refused, match=r"both the seed and the mask key of \['c1'\]"):
        client.on_phase(st.UNMASK, PhaseData(blobs={st.SURVIVED: b"c1\nc2", st.DROPPED: b"c1"}))


def test_client_refuses_strangers_and_phases_out_of_order() -> None:
    client, payload = _client_at_unmask(SecAggPlus())
    with pytest.raises(Refused, match=r"\['c9'\] are not neighbours"):
        client.on_phase(st.UNMASK, PhaseData(blobs={st.SURVIVED: b"c1", st.DROPPED: b"c9"}))
    with pytest.raises(StageTransitionError, match="round is over"):
        client.on_phase(st.UNMASK, payload)  # a refusal ends the client's round: no second request
    client, payload = _client_at_unmask(SecAggPlus())
    answer = client.on_phase(st.UNMASK, payload)
    assert sorted(answer.blobs) == ["b/c1", "b/c2", "b/c3"]
    with pytest.raises(StageTransitionError, match="got phase 'unmask'"):
        client.on_phase(st.UNMASK, payload)  # one unmask per round: no second chance to ask for s_v
    fresh = SecAggPlus().client_round(ClientContext("run-x", 1, "c0", SPEC))
    with pytest.raises(StageTransitionError, match="expected 'advertise-keys'"):
        fresh.on_phase(st.UNMASK, payload)


def test_a_tampered_share_is_refused_and_the_round_goes_on() -> None:
    protocol = SecAggPlus()
    sums, quantised, errors, weights, _, buckets = _run(protocol, 5, tamper=("c1", "c3"))
    assert isinstance(errors["c1"], InvalidShare) and "from 'c3' to 'c1'" in str(errors["c1"])
    assert "does not authenticate" in str(errors["c1"])
    assert sums[0].members == ("c0", "c2", "c3", "c4")  # c1 refused to mask: it counts as a drop
    _check_exact(protocol, sums, {c: q for c, q in quantised.items() if c != "c1"}, weights, buckets)


@pytest.mark.parametrize(("settings", "match"), [
    ({"neighbours": 3}, "neighbours must be even"),
    ({"threshold": 0.0}, r"threshold must lie in \(0, 1\]"),
    ({"threshold": 1.5}, r"threshold must lie in \(0, 1\]"),
    ({"neighbours": 2, "threshold": 0.3}, "t = 1 < 2"),
    ({"bucket_size": 2}, "bucket_size must be 0"),
    ({"bucket_size": 64}, "need 33 bits"),
    ({"max_weight": -1}, "max_weight must be a non-negative"),
])
def test_impossible_settings_are_refused(settings, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SecAggPlus(**settings)


def test_settings_come_from_the_config() -> None:
    protocol = create_secure_aggregation("secagg+", neighbours=4, threshold=0.75)
    assert (protocol.neighbours, protocol.threshold) == (4, 0.75)
    described = protocol.describe()
    assert described["server_sees_individual_updates"] is False and "encrypted shares" in described["key_custody"]
    with pytest.raises(ConfigError, match="neighbours must be even"):
        Stages.from_config(smoke_config("secure.mode='secagg+'", "secure.params.neighbours=3"))


def test_simulation_matches_plain(tmp_path: Path) -> None:
    plain = simulate(smoke_config(), tmp_path / "plain", progress=False)
    masked = simulate(smoke_config("secure.mode='secagg+'"), tmp_path / "masked", progress=False)
    assert abs(masked.final_accuracy - plain.final_accuracy) <= 0.01
    for name, value in plain.global_state.items():  # 2 rounds: quantisation error, then training on it
        np.testing.assert_allclose(masked.global_state[name], value, atol=2e-2)
    record = masked.metrics[0]
    assert [p["phase"] for p in record["phases"]] == list(st.PHASES)
    assert all(p["answered"] == 4 and p["dropped"] == [] for p in record["phases"])
    floats = sum(v.size for v in plain.global_state.values()) * 4 * 4  # float32 update of 4 clients
    upload = {p["phase"]: p["bytes_up"] for p in record["phases"]}[st.MASKED_INPUT]
    assert upload <= 1.0 * floats, (upload, floats)


def _in_process(tmp_path: Path, drops: dict[int, tuple[int, str]]):
    config = smoke_config(
        "secure.mode='secagg+'", "run.rounds=1", "run.num_clients=4", "run.clients_per_round=4", "run.min_updates=2",
    )
    return in_process_parties(config, tmp_path / "run", drops)


@pytest.mark.parametrize("phase", st.PHASES)
def test_engine_recovers_a_drop_in_each_phase(tmp_path: Path, phase: str) -> None:
    server, clients = _in_process(tmp_path, {2: (1, phase)})
    record = step_all(server, clients).result().metrics[0]
    assert record["status"] == "ok", record.get("reason")
    assert {p["phase"]: p["dropped"] for p in record["phases"]}[phase] == ["client-2"]
    assert record["clients"] == (4 if phase == st.UNMASK else 3)


def test_engine_aborts_when_too_few_survive(tmp_path: Path) -> None:
    server, clients = _in_process(tmp_path, {1: (1, st.MASKED_INPUT), 2: (1, st.MASKED_INPUT)})
    before = {k: v.copy() for k, v in server.global_state.items()}
    result = step_all(server, clients).result()
    record = result.metrics[0]
    assert record["status"] == "aborted" and "after masked-input" in record["reason"] and "t = 2" in record["reason"]
    assert result.ledger == []
    for name, value in before.items():
        np.testing.assert_array_equal(result.global_state[name], value)


def test_a_truncated_share_is_refused_naming_receiver_and_sender() -> None:
    """A ciphertext cut short never reaches AES-GCM: the refusal still says whose share it was."""
    protocol = SecAggPlus()
    updates, weights = _updates(5)
    cohort = tuple(sorted(updates))
    server = protocol.server_round(RoundContext("run-x", 3, cohort, (cohort,), SPEC, 30.0))
    clients = {c: protocol.client_round(ClientContext("run-x", 3, c, SPEC)) for c in cohort}

    def truncate(phase, client: str, data: PhaseData) -> PhaseData:
        if not (phase.trains and client == "c1"):
            return data
        return PhaseData(blobs={**data.blobs, st.SHARE + "c3": data.blobs[st.SHARE + "c3"][:20]})

    errors: dict[str, ProtocolError] = {}
    drive(server, clients, updates, weights, alter=truncate, errors=errors)
    assert isinstance(errors["c1"], MalformedMessage)
    assert str(errors["c1"]).startswith("secagg+ client c1: share from 'c3': ")
    assert server.result()[0].members == ("c0", "c2", "c3", "c4")  # c1 counts as a drop; the round goes on


def _should_survive(graph: Mapping[str, tuple[str, ...]], t: Mapping[str, int], answered: Mapping[str, set[str]]) -> bool:
    """The spec, independently of the server half: does every secret the server needs keep t holders?"""
    shared = answered[st.SHARE_KEYS] & set(graph)
    masked = answered[st.MASKED_INPUT] & shared
    unmasked = answered[st.UNMASK] & masked
    if not masked or any(len(set(graph[u]) & shared) < t[u] for u in shared):
        return False
    dropped = {d for d in shared - masked if set(graph[d]) & masked}
    needed = masked | dropped
    return (all(len(set(graph[u]) & masked) >= t[u] for u in needed)
            and all(len(set(graph[u]) & unmasked) >= t[u] for u in needed))


@settings(max_examples=60, deadline=None)
@given(data=hs.data())
def test_random_graphs_and_drops_give_the_exact_survivor_sum_or_abort(data) -> None:
    """Random n, k, t and a random phase (or none) in which each client drops: enough holders left ->
    the unmasked sum is exactly the survivors' quantised sum; too few -> the round aborts, no sum."""
    n = data.draw(hs.integers(3, 9), label="n")
    k = data.draw(hs.sampled_from([0, *range(2, n - 1, 2)]), label="k")
    threshold = data.draw(hs.sampled_from([0.34, 0.5, 0.67, 1.0]), label="threshold")
    try:
        protocol = SecAggPlus(neighbours=k, threshold=threshold, corrupt_fraction=0.0, dropout_fraction=0.0)
        protocol.parameters(n)
    except ValueError:
        assume(False)  # t < 2: refused before any round, tested above
    phase_or_none = hs.sampled_from([None] * 8 + list(st.PHASES))  # a third of the clients drop somewhere
    when = data.draw(hs.lists(phase_or_none, min_size=n, max_size=n), label="drop phase")
    updates, weights = _updates(n, seed=n)
    cohort = tuple(sorted(updates))
    drops = {phase: {c for c, w in zip(cohort, when) if w == phase} for phase in st.PHASES}
    server = protocol.server_round(RoundContext("run-x", 2, cohort, (cohort,), SPEC, 30.0))
    clients = {c: protocol.client_round(ClientContext("run-x", 2, c, SPEC)) for c in cohort}
    quantised: dict[str, dict[str, np.ndarray]] = {}
    try:
        drive(server, clients, updates, weights, drops=drops, quantised=quantised)
        sums = server.result()
    except ProtocolAbort:
        sums = None
    bucket = server.buckets[0]  # type: ignore[attr-defined]
    advertised = set(cohort) - drops[st.ADVERTISE_KEYS]
    answered = {phase: advertised - set().union(*(drops[p] for p in st.PHASES[: i + 1]))
                for i, phase in enumerate(st.PHASES)}
    graph = bucket.graph  # drawn by the server with secrets: the spec below takes it as given
    t = {u: protocol.share_threshold(bucket.parameters, len(peers)) for u, peers in graph.items()}
    expected = (len(advertised) >= st.MIN_BUCKET and bool(graph)
                and all(2 <= t[u] <= len(graph[u]) for u in graph)  # else refused after advertise-keys
                and _should_survive(graph, t, answered))
    event("aborted" if not expected else "exact sum")
    if not expected:
        assert sums is None
        with pytest.raises(StageTransitionError):
            server.result()  # nothing is released by an aborted round
        return
    assert sums is not None and sums[0].members == tuple(sorted(answered[st.MASKED_INPUT]))
    _check_exact(protocol, sums, quantised, weights, (cohort,))


class _BusyOnce(InProcessTransport):
    """Injected fault: the first upload of every (round, phase) is refused as busy before it is read."""

    def __init__(self, coordinator: Any) -> None:
        super().__init__(coordinator)
        self.refused: list[tuple[int, str]] = []
        self.sent: dict[tuple[int, str], list[bytes]] = {}

    def push_update(self, messages: Iterable[pb.UpdateChunk]) -> pb.PushReply:
        chunks = list(messages)
        envelope = chunks[0].header.envelope
        key = (envelope.round, envelope.phase)
        self.sent.setdefault(key, []).append(b"".join(c.SerializeToString() for c in chunks))
        if key not in self.refused:
            self.refused.append(key)
            raise TransportError("PushUpdate: the server is serving 16 streams (transport.max_streams); retry shortly",
                                 code="RESOURCE_EXHAUSTED")
        return super().push_update(chunks)


def test_an_upload_refused_as_busy_is_sent_again_not_recomputed(tmp_path: Path) -> None:
    """A RESOURCE_EXHAUSTED upload (the server's stream caps, e.g. 200 parties behind one IP) is
    retried with the same answer: re-fetching the task would replay a phase the SecAgg+ session
    already left (StageTransitionError, the party lost) and train again."""
    config = smoke_config("secure.mode='secagg+'", "run.rounds=2", "run.num_clients=4", "run.clients_per_round=4")
    server = FederatedServer(config, tmp_path / "run", transport="in-process")
    transports = [_BusyOnce(server.coordinator) for _ in range(4)]
    clients = [make_client(config, i, t) for i, t in enumerate(transports)]
    for client in clients:
        client.retry_wait = 0.0
        client.join()
    result = step_all(server, clients).result()
    assert [(r["status"], r["clients"]) for r in result.metrics] == [("ok", 4), ("ok", 4)]
    assert all(c.rounds_trained == [1, 2] for c in clients)
    for t in transports:
        assert t.refused == [(r, phase) for r in (1, 2) for phase in st.PHASES]
        assert all(len(attempts) == 2 and attempts[0] == attempts[1] for attempts in t.sent.values())
