"""SecAgg+ phase transitions and tampering: every phase x every message kind, on both halves and
through the real coordinator; shares routed elsewhere, replays, wrong lengths and duplicates.

Three state machines are checked exhaustively (`itertools.product` over `secaggplus_stages.PHASES`):

* the client half: in every state (fresh, after each phase) only the next phase's message is
  answered; any other raises `StageTransitionError`, reveals nothing and changes nothing;
* the server half: only the result of the phase it declared last is taken;
* the `Coordinator`: in every open phase only an answer shaped for that phase is stored; an answer
  for another phase (honestly labelled, or relabelled as the open one) is refused naming the
  client and the phase.

After every refusal the round goes on and the sum of the survivors is checked exactly
(`tests.test_secaggplus._check_exact`), or it aborts with a `ProtocolAbort` naming the reason. The
halves run in memory (`tests.harness.drive`) or behind the coordinator (`Federation`), with no
engine and no training, so each case takes milliseconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from itertools import product

import grpc
import numpy as np
import pytest

from protocols.errors import (
    InvalidShare,
    MalformedMessage,
    ProtocolAbort,
    ProtocolError,
    Refused,
    StageTransitionError,
    StaleMessage,
    WrapAround,
)
from protocols.secagg import (
    ClientContext,
    ClientRound,
    Phase,
    PhaseData,
    PhaseResult,
    RoundContext,
    ServerRound,
)
from protocols.secagg import secaggplus_stages as st
from protocols.secagg.packing import packed_size
from protocols.secagg.secaggplus import SecAggPlus, SecAggPlusClient
from protocols.wire import serde
from protocols.wire.limits import PROTOCOL_VERSION
from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.server.coordinator import Coordinator
from tests.harness import drive
from tests.test_secaggplus import SPEC, _check_exact, _updates

RUN = "run-x"
FINGERPRINT = "secaggplus-phases"
COHORT = ("c0", "c1", "c2", "c3")  # one bucket of 4: k = 3, t = 2, so one drop is recoverable
WORDS = sum(size for _, _, size in st.update_layout(SPEC)) + 1  # the weight is the last word
#: Client states: how many phases the client has answered (0: fresh, 4: the round is over).
STATES = range(len(st.PHASES) + 1)


def _state_name(done: int) -> str:
    return "fresh" if done == 0 else f"after-{st.PHASES[done - 1]}"


def _clients(protocol: SecAggPlus, number: int, cohort: tuple[str, ...]) -> dict[str, SecAggPlusClient]:
    return {c: protocol.client_round(ClientContext(RUN, number, c, SPEC)) for c in cohort}  # type: ignore[misc]


class _Recorder(ServerRound):
    """A server half that remembers every result it was given, by phase name."""

    def __init__(self, inner: ServerRound) -> None:
        self.inner = inner
        self.results: dict[str, PhaseResult] = {}

    def first_phase(self) -> Phase:
        return self.inner.first_phase()

    def next_phase(self, result: PhaseResult) -> Phase | None:
        self.results[result.phase.name] = result
        return self.inner.next_phase(result)

    def result(self):  # type: ignore[no-untyped-def]
        return self.inner.result()


def _halves(
    protocol: SecAggPlus, *, number: int = 1, buckets: tuple[tuple[str, ...], ...] = (COHORT,),
    keys_from: Mapping[str, SecAggPlusClient] | None = None,
) -> tuple[_Recorder, dict[str, SecAggPlusClient]]:
    """The server half (recorded) and the client halves of one round.

    ``keys_from`` gives clients the key pairs and seed of earlier sessions (clients that reused
    their keys), so that only the round or the bucket differs between two instances.
    """
    cohort = tuple(sorted(c for b in buckets for c in b))
    recorder = _Recorder(protocol.server_round(RoundContext(RUN, number, cohort, buckets, SPEC, 30.0)))
    clients = _clients(protocol, number, cohort)
    for c, old in (keys_from or {}).items():
        clients[c].enc_key, clients[c].mask_key, clients[c].seed = old.enc_key, old.mask_key, old.seed
    return recorder, clients


def _play(recorder: _Recorder, clients: Mapping[str, SecAggPlusClient], **kw):  # type: ignore[no-untyped-def]
    """Run the round in memory (`drive`); return (quantised, errors, weights). A client that refuses counts as a drop."""
    updates, weights = _updates(len(clients))
    quantised: dict[str, dict[str, np.ndarray]] = {}
    errors: dict[str, ProtocolError] = {}
    drive(recorder, clients, updates, weights, quantised=quantised, errors=errors, **kw)
    return quantised, errors, weights


@functools.cache
def _reference() -> tuple[dict[str, PhaseData], dict[str, PhaseResult]]:
    """One honest round of another instance: what c0 received in each phase, and each phase's result."""
    payloads: dict[str, PhaseData] = {}

    def record(phase: Phase, client: str, data: PhaseData) -> PhaseData:
        if client == "c0":
            payloads[phase.name] = data
        return data

    recorder, clients = _halves(SecAggPlus(), number=9)
    _play(recorder, clients, alter=record)
    return payloads, recorder.results


def _answer_of(result: PhaseResult, client: str) -> PhaseData:
    answer = result.answers[client]
    return PhaseData(tensors=dict(answer.tensors), blobs=dict(answer.blobs))


def _members(sums) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(c for b in sums for c in b.members)


# ---------------------------------------------------------------------------------- client half
def _deliver(client: ClientRound, kind: str, data: PhaseData) -> PhaseData:
    """Hand ``client`` a message of phase ``kind`` the way the client process does."""
    if kind == st.MASKED_INPUT:  # a TRAIN task: its (zero) words are never reached
        words = {name: np.zeros(size, np.int64) for name, _, size in st.update_layout(SPEC)}
        return client.mask(words, weight=1.0, data=data)
    return client.on_phase(kind, data)


def _state(client: SecAggPlusClient) -> tuple[object, ...]:
    return client.stage, client.bucket, client.plan, sorted(client.held), sorted(client.enc_public), sorted(client.mask_public)


def _refused(client: SecAggPlusClient, kind: str, data: PhaseData, expected: str) -> None:
    """``client`` refuses a ``kind`` message with a StageTransitionError naming both phases; nothing changes."""
    before = _state(client)
    with pytest.raises(StageTransitionError) as info:
        _deliver(client, kind, data)
    message = str(info.value)
    assert f"secagg+ client {client.me}:" in message and f"got phase {kind!r}" in message, message
    assert f"expected {expected!r}" in message, message
    assert _state(client) == before  # no key learnt, no share held, still waiting for the same phase


@pytest.mark.parametrize(
    ("done", "kind"),
    [pytest.param(done, kind, id=f"{_state_name(done)}-gets-{kind}") for done, kind in product(STATES, st.PHASES)],
)
def test_client_answers_only_the_phase_it_expects(done: int, kind: str) -> None:
    """State x message kind: the expected message is answered; every other one (a replay of this
    round's earlier message, or a well-formed later one from another instance) is refused, and c0
    still takes part in every phase of an exact sum."""
    protocol = SecAggPlus()
    reference, _ = _reference()
    expected = st.PHASES[done] if done < len(st.PHASES) else "(none: the round is over)"
    recorder, clients = _halves(protocol)
    seen: dict[str, PhaseData] = {}
    probed = []

    def probe(phase: Phase, client: str, data: PhaseData) -> PhaseData:
        if client == "c0":
            seen[phase.name] = data
            if phase.name == expected and kind != expected:
                _refused(clients["c0"], kind, seen.get(kind, reference[kind]), expected)
                probed.append(kind)
        return data

    quantised, errors, weights = _play(recorder, clients, alter=probe)
    if done == len(st.PHASES):
        _refused(clients["c0"], kind, seen[kind], expected)  # a replay after the round: nothing more
        probed.append(kind)
    assert probed == ([] if kind == expected else [kind])
    assert errors == {} and clients["c0"].stage == len(st.PHASES)
    sums = recorder.result()
    assert _members(sums) == list(COHORT)
    _check_exact(protocol, sums, quantised, weights, (COHORT,))


@pytest.mark.parametrize("done", STATES, ids=_state_name)
def test_client_refuses_phases_it_never_answers(done: int) -> None:
    """In every state: ``masked-input`` as a PHASE task (it only comes with training), or a phase
    SecAgg+ does not have, is refused and changes nothing."""
    payloads, _ = _reference()
    expected = st.PHASES[done] if done < len(st.PHASES) else None
    protocol = SecAggPlus()
    recorder, clients = _halves(protocol)

    def never(client: SecAggPlusClient) -> None:
        before = _state(client)
        for name, data in ((st.MASKED_INPUT, payloads[st.MASKED_INPUT]), ("consistency-check", PhaseData())):
            with pytest.raises(StageTransitionError, match=f"secagg\\+ client c0: no phase {name!r} to answer"):
                client.on_phase(name, data)
        assert _state(client) == before

    def probe(phase: Phase, client: str, data: PhaseData) -> PhaseData:
        if client == "c0" and phase.name == expected:
            never(clients["c0"])
        return data

    quantised, errors, weights = _play(recorder, clients, alter=probe)
    if expected is None:
        never(clients["c0"])
    assert errors == {}
    _check_exact(protocol, recorder.result(), quantised, weights, (COHORT,))


@pytest.mark.parametrize("kind", st.PHASES)
def test_a_closed_session_answers_nothing(kind: str) -> None:
    """After `close` (a later round began) the session refuses every phase: its secrets are gone."""
    reference, _ = _reference()
    client = _clients(SecAggPlus(), 1, ("c0",))["c0"]
    client.on_phase(st.ADVERTISE_KEYS, reference[st.ADVERTISE_KEYS])
    client.close()
    _refused(client, kind, reference[kind], "(none: the round is over)")


# ---------------------------------------------------------------------------------- server half
@pytest.mark.parametrize(
    ("open_index", "kind"),
    [pytest.param(i, kind, id=f"{_state_name(i)}-gets-{kind}") for i, kind in product(STATES, st.PHASES)],
)
def test_server_takes_only_the_result_of_the_phase_it_declared(open_index: int, kind: str) -> None:
    """Open phase x result kind: the result of another phase (this round's earlier one, or a later
    one from another instance) is refused naming both, and the round goes on exactly. The state
    ``after-unmask`` is the finished round, which takes no result at all."""
    protocol = SecAggPlus()
    _, reference = _reference()
    open_name = st.PHASES[open_index] if open_index < len(st.PHASES) else None
    recorder, clients = _halves(protocol)
    refused = []

    def refuse(result: PhaseResult) -> None:
        with pytest.raises(StageTransitionError) as info:
            recorder.inner.next_phase(result)
        message = str(info.value)
        assert f"got the result of phase {kind!r}" in message, message
        assert f"the open phase is {repr(open_name) if open_name else 'none'}" in message, message
        refused.append(kind)

    def probe(phase: Phase, client: str, data: PhaseData) -> PhaseData:
        if client == "c0" and phase.name == open_name and kind != open_name:
            refuse(recorder.results.get(kind, reference[kind]))
        return data

    quantised, errors, weights = _play(recorder, clients, alter=probe)
    if open_name is None:  # even a replay of its own last result
        refuse(recorder.results[kind])
    assert refused == ([] if kind == open_name else [kind])
    sums = recorder.result()
    assert errors == {} and _members(sums) == list(COHORT)
    _check_exact(protocol, sums, quantised, weights, (COHORT,))


def test_server_takes_no_result_before_its_first_phase_and_starts_once() -> None:
    _, reference = _reference()
    recorder, _ = _halves(SecAggPlus())
    for kind in st.PHASES:
        with pytest.raises(StageTransitionError, match=f"result of phase {kind!r}, but the open phase is none"):
            recorder.next_phase(reference[kind])
    recorder.first_phase()
    with pytest.raises(StageTransitionError, match="round 1: the round already began"):
        recorder.first_phase()


def test_server_refuses_the_open_phase_of_another_round() -> None:
    """A result named like the open phase but not the one this round declared (another round's) is refused."""
    _, reference = _reference()
    recorder, _ = _halves(SecAggPlus())
    recorder.first_phase()
    with pytest.raises(StageTransitionError, match="'advertise-keys' that this round did not declare"):
        recorder.next_phase(reference[st.ADVERTISE_KEYS])


@pytest.mark.parametrize(("phase", "reason"), [
    (st.ADVERTISE_KEYS, "only 0 client(s) advertised keys"),
    (st.SHARE_KEYS, "after masked-input: no masked input arrived (gone: c0, c1, c2, c3)"),
    (st.MASKED_INPUT, "after masked-input: no masked input arrived (gone: c0, c1, c2, c3)"),
])
def test_a_bucket_that_loses_every_client_aborts_cleanly(phase: str, reason: str) -> None:
    """Nobody of a bucket left: a ProtocolAbort naming the bucket (after share-keys or masked-input
    this was a ValueError from an empty modular sum, which the engine does not catch), and then the
    server takes no more results and releases nothing."""
    recorder, clients = _halves(SecAggPlus())
    with pytest.raises(ProtocolAbort) as info:
        _play(recorder, clients, drops={phase: set(COHORT)})
    assert str(info.value).startswith("secagg+ bucket 0 (4 clients)") and reason in str(info.value), info.value
    with pytest.raises(StageTransitionError, match="the open phase is none"):
        recorder.next_phase(recorder.results[phase])
    with pytest.raises(StageTransitionError, match="has not finished"):
        recorder.result()


# ---------------------------------------------------------------------------------- coordinator
class Federation:
    """The real `Coordinator` between the two SecAgg+ halves: clients pull tasks and push answers as
    protobuf streams, and the server half sees only what the coordinator stored (no engine)."""

    def __init__(self, protocol: SecAggPlus, buckets: tuple[tuple[str, ...], ...] = (COHORT,)) -> None:
        self.protocol, self.buckets = protocol, buckets
        self.cohort = tuple(sorted(c for b in buckets for c in b))
        self.updates, self.weights = _updates(len(self.cohort))
        self.coordinator = Coordinator(
            run_id=RUN, model_fingerprint=FINGERPRINT, stages={"secure": protocol.name}, max_update_bytes=1 << 20,
            chunk_size=1 << 12, poll_interval=0.01, weights_in_clear=False,
        )
        for c in self.cohort:
            self.coordinator.join(pb.JoinRequest(
                envelope=serde.envelope("", 0, c), protocol_version=PROTOCOL_VERSION, model_fingerprint=FINGERPRINT,
                num_examples=1,
            ))

    def begin(self, number: int) -> None:
        """Open round ``number`` with fresh client sessions and its first phase."""
        self.number = number
        self.server = self.protocol.server_round(RoundContext(RUN, number, self.cohort, self.buckets, SPEC, 30.0))
        self.clients = _clients(self.protocol, number, self.cohort)
        self.quantised: dict[str, dict[str, np.ndarray]] = {}
        self.errors: dict[str, ProtocolError] = {}
        self.answers: dict[tuple[str, str], PhaseData] = {}  # (phase, client) -> what its half answered
        manifest, payload = serde.pack_tensors({})
        self.coordinator.begin_round(number, self.cohort, manifest, payload, {})
        self._open(self.server.first_phase())

    def _open(self, phase: Phase | None) -> None:
        self.phase = phase
        if phase is None:
            self.coordinator.end_round()
        else:
            self.state = self.coordinator.open_phase(phase, 30.0)

    def answer(self, client: str) -> PhaseData | None:
        """``client`` pulls its task and its half answers (None, with the error recorded, if it refuses)."""
        request = pb.PullTaskRequest(envelope=serde.envelope(RUN, 0, client))
        header, payload = serde.read_task_stream(self.coordinator.pull_task(request), max_bytes=1 << 20)
        assert self.phase is not None and header.phase == self.phase.name, header
        try:
            if self.phase.trains:
                quantised = self.clients[client].quantise(self.updates[client])
                self.quantised[client] = quantised
                out = self.clients[client].mask(quantised, weight=self.weights[client], data=PhaseData(blobs=dict(header.blobs)))
            else:
                tensors = serde.unpack_tensors(header.manifest, payload, who="server")
                out = self.clients[client].on_phase(header.phase, PhaseData(tensors, dict(header.blobs)))
        except ProtocolError as exc:
            self.errors[client] = exc
            return None
        self.answers[self.phase.name, client] = out
        return out

    def push(self, client: str, data: PhaseData, *, phase: str | None = None, number: int | None = None) -> pb.PushReply:
        """Send ``data`` as ``client``'s answer, labelled with ``phase`` and round ``number`` (default: the open ones)."""
        assert self.phase is not None or phase is not None
        manifest, body = serde.pack_tensors(dict(data.tensors))
        header = pb.UpdateHeader(
            envelope=serde.envelope(RUN, self.number if number is None else number, client,
                                    phase if phase is not None else self.phase.name),  # type: ignore[union-attr]
            manifest=manifest, encoding=self.protocol.name, blobs=dict(data.blobs),
        )
        return self.coordinator.push_update(serde.update_stream(header, body, 1 << 12))

    def step(self) -> None:
        """Every participant that still owes the open phase answers; the phase closes, the next opens."""
        assert self.phase is not None
        for c in self.phase.participants:
            if c not in self.state.received and (out := self.answer(c)) is not None:
                assert self.push(c, out).accepted
        with self.coordinator._cond:  # end the phase now instead of at its deadline
            self.state.deadline = 0.0
        done = self.coordinator.wait_phase()
        try:
            following = self.server.next_phase(PhaseResult(done.phase, dict(done.received)))
        except ProtocolAbort:
            self.coordinator.end_round()
            raise
        self._open(following)

    def finish(self):  # type: ignore[no-untyped-def]
        while self.phase is not None:
            self.step()
        return self.server.result()

    def check_exact(self, sums, without: tuple[str, ...] = ()) -> None:  # type: ignore[no-untyped-def]
        assert _members(sums) == sorted(set(self.cohort) - set(without))
        _check_exact(self.protocol, sums, self.quantised, self.weights, self.buckets)


@pytest.mark.parametrize(
    ("open_index", "kind_index"),
    [pytest.param(i, j, id=f"{st.PHASES[i]}-open-gets-{st.PHASES[j]}") for i, j in product(range(len(st.PHASES)), repeat=2)],
)
def test_coordinator_stores_only_answers_to_the_open_phase(open_index: int, kind_index: int) -> None:
    """Open phase x answer kind through the coordinator. An answer shaped for another phase (c0's own
    earlier answer: a replay; or a later one from another instance) is refused twice: labelled
    honestly (StaleMessage: closed / not open) and relabelled as the open phase (MalformedMessage
    naming the blob or tensor). Neither is stored: c0's real answer is then accepted."""
    open_name, kind = st.PHASES[open_index], st.PHASES[kind_index]
    federation = Federation(SecAggPlus())
    federation.begin(1)
    for _ in range(open_index):
        federation.step()
    assert federation.phase is not None and federation.phase.name == open_name
    mine = federation.answer("c0")
    assert mine is not None
    if kind != open_name:
        _, reference = _reference()
        other = federation.answers.get((kind, "c0")) or _answer_of(reference[kind], "c0")
        when = "which is closed" if kind_index < open_index else f"which is not open \\(open phase: {open_name}\\)"
        with pytest.raises(StaleMessage, match=f"answer from client 'c0' is for phase '{kind}' of round 1, {when}"):
            federation.push("c0", other, phase=kind)
        with pytest.raises(MalformedMessage) as info:
            federation.push("c0", other)
        message = str(info.value)  # it names one of the blobs (or the tensor) the open phase does not take
        offending = [st.MASKED] if other.tensors else list(other.blobs)
        assert "client 'c0'" in message and f"phase {open_name!r}" in message, message
        assert any(repr(name) in message for name in offending), message
        assert "c0" not in federation.state.received
    assert federation.push("c0", mine).accepted
    federation.check_exact(federation.finish())


@pytest.mark.parametrize("phase", st.PHASES)
def test_a_duplicate_answer_in_the_same_phase_is_refused(phase: str) -> None:
    """A second answer to the same phase (identical, or different) gets ALREADY_EXISTS; the first stands."""
    federation = Federation(SecAggPlus())
    federation.begin(1)
    while federation.phase is not None and federation.phase.name != phase:
        federation.step()
    first = federation.answer("c0")
    assert first is not None and federation.push("c0", first).accepted
    _, reference = _reference()
    for again in (first, _answer_of(reference[phase], "c0")):
        with pytest.raises(Refused, match=f"client 'c0' already answered phase '{phase}' of round 1") as info:
            federation.push("c0", again)
        assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    federation.check_exact(federation.finish())


@pytest.mark.parametrize("phase", st.PHASES)
def test_a_previous_round_answer_with_its_own_envelope_is_refused(phase: str) -> None:
    """c0's round-1 answer replayed into round 2 as it was sent (round 1 in the envelope): StaleMessage."""
    federation = Federation(SecAggPlus())
    federation.begin(1)
    federation.finish()
    old = federation.answers[phase, "c0"]
    federation.begin(2)
    while federation.phase is not None and federation.phase.name != phase:
        federation.step()
    with pytest.raises(StaleMessage, match="update from client 'c0' is for round 1, which is closed \\(current round: 2\\)"):
        federation.push("c0", old, number=1)
    federation.check_exact(federation.finish())


@pytest.mark.parametrize(("phase", "reason", "victims"), [
    (st.ADVERTISE_KEYS, "after masked-input: no masked input arrived", COHORT),  # nobody can open c0's ciphertexts, nor c0 theirs
    (st.SHARE_KEYS, "after masked-input: only 0 of c0's neighbours remain", ("c1", "c2", "c3")),
    (st.MASKED_INPUT, None, ()),  # round-1 masks do not cancel: WrapAround (checked below)
    (st.UNMASK, "cannot reconstruct c\\d's self-mask seed", ()),  # round-1 shares fit no round-2 polynomial
], ids=list(st.PHASES))
def test_a_previous_round_answer_relabelled_for_this_round_aborts_it_cleanly(
    phase: str, reason: str | None, victims: tuple[str, ...]
) -> None:
    """c0's round-1 answer with a forged round-2 envelope is well-formed, so the coordinator stores it;
    its keys, ciphertexts, masks or shares belong to round 1, so the round aborts with a reason and
    releases no sum. Stale ciphertexts are refused by their receivers, naming the route."""
    federation = Federation(SecAggPlus())
    federation.begin(1)
    federation.finish()
    old = federation.answers[phase, "c0"]
    federation.begin(2)
    while federation.phase is not None and federation.phase.name != phase:
        federation.step()
    assert federation.answer("c0") is not None  # c0's half answers round 2 ...
    assert federation.push("c0", old).accepted  # ... but what arrives is its round-1 answer
    with pytest.raises(ProtocolAbort, match=reason) as info:
        federation.finish()
    assert "bucket 0" in str(info.value)
    if phase == st.MASKED_INPUT:
        assert isinstance(info.value, WrapAround)
    assert sorted(federation.errors) == list(victims)
    for c, error in federation.errors.items():
        assert isinstance(error, InvalidShare) and "'c0'" in str(error), error
        assert f"to '{c}' (run '{RUN}', round 2, bucket 0) does not authenticate" in str(error), error
    with pytest.raises(StageTransitionError, match="has not finished"):
        federation.server.result()


def _wrong_masked_inputs(length: int) -> dict[str, tuple[PhaseData, str]]:
    """Masked-input answers that are not ``length`` packed bytes, with the coordinator's refusal."""
    def masked(tensor: np.ndarray) -> PhaseData:
        return PhaseData(tensors={st.MASKED: tensor})

    shape = f"tensor 'masked' has shape \\(%s\\), expected \\({length},\\)"
    return {
        "one-byte-short": (masked(np.zeros(length - 1, np.uint8)), shape % f"{length - 1},"),
        "one-byte-long": (masked(np.zeros(length + 1, np.uint8)), shape % f"{length + 1},"),
        "two-dimensional": (masked(np.zeros((1, length), np.uint8)), shape % f"1, {length}"),
        "float32": (masked(np.zeros(length, np.float32)), "tensor 'masked' has dtype float32, expected uint8"),
        "missing": (PhaseData(), "missing tensor\\(s\\) 'masked'"),
    }


@pytest.mark.parametrize("variant", list(_wrong_masked_inputs(8)))
def test_a_masked_input_of_the_wrong_length_or_type_is_refused(variant: str) -> None:
    """One bucket (one word size): the coordinator refuses a wrong masked tensor naming the client,
    the phase and what is wrong; the client's real answer is then accepted and the sum is exact."""
    protocol = SecAggPlus()
    federation = Federation(protocol)
    federation.begin(1)
    federation.step()
    federation.step()
    length = packed_size(WORDS, protocol.plan(len(COHORT)).bits)
    wrong, refusal = _wrong_masked_inputs(length)[variant]
    mine = federation.answer("c0")
    assert mine is not None and mine.tensors[st.MASKED].shape == (length,)
    with pytest.raises(MalformedMessage, match=f"client 'c0' in phase 'masked-input': {refusal}"):
        federation.push("c0", wrong)
    assert federation.push("c0", mine).accepted
    federation.check_exact(federation.finish())


def test_a_masked_input_that_fits_another_bucket_counts_as_a_drop() -> None:
    """Buckets of 5 and 4 clients use 30- and 29-bit words, so the coordinator can only bound the
    upload; a client of the small bucket that sends the large bucket's length is dropped by the
    server half (its pairwise masks removed like a drop's), and both sums stay exact."""
    protocol = SecAggPlus(bucket_size=5)
    big, small = ("c0", "c1", "c2", "c3", "c4"), ("c5", "c6", "c7", "c8")
    federation = Federation(protocol, buckets=(big, small))
    federation.begin(1)
    federation.step()
    federation.step()
    lengths = {size: packed_size(WORDS, protocol.plan(size).bits) for size in (5, 4)}
    assert lengths[5] > lengths[4]
    assert federation.answer("c5") is not None
    assert federation.push("c5", PhaseData(tensors={st.MASKED: np.zeros(lengths[5], np.uint8)})).accepted
    with pytest.raises(MalformedMessage, match="client 'c6' in phase 'masked-input': tensor 'masked' has shape"):
        federation.push("c6", PhaseData(tensors={st.MASKED: np.zeros(lengths[5] + 1, np.uint8)}))
    sums = federation.finish()
    federation.check_exact(sums, without=("c5",))
    assert {b.members for b in sums} == {big, ("c6", "c7", "c8")}


# ---------------------------------------------------------------------------------- routed shares
def _routed(store: dict[str, Mapping[str, bytes]]) -> Callable[[Phase, str, PhaseData], PhaseData]:
    """Record the share blobs each client receives in masked-input."""
    def alter(phase: Phase, client: str, data: PhaseData) -> PhaseData:
        if phase.trains:
            store[client] = dict(data.blobs)
        return data
    return alter


TWO_BUCKETS = (COHORT, ("c4", "c5", "c6", "c7"))


@pytest.mark.parametrize("route", ["sender", "receiver", "round", "bucket", "another-bucket-client"])
def test_a_share_routed_elsewhere_is_refused_and_the_round_goes_on(route: str) -> None:
    """AES-GCM binds run, round, bucket, sender and receiver. The server hands c1, as "the share from
    c3", a ciphertext encrypted for another sender, receiver, round or bucket (for round and bucket
    with the very same keys: clients that reused them, so only that field differs), or hands c3's
    share for c1 to a client of the other bucket. The receiver refuses it with InvalidShare naming
    the route, counts as a drop, and every sum is still exact."""
    protocol = SecAggPlus(bucket_size=4)
    number, buckets, receiver, sender = 1, (COHORT,), "c1", "c3"
    keys_from: Mapping[str, SecAggPlusClient] | None = None
    earlier: dict[str, Mapping[str, bytes]] = {}
    if route in ("round", "bucket"):  # an earlier instance: the ciphertexts c1 received in it
        recorder, keys_from = _halves(protocol, buckets=TWO_BUCKETS if route == "bucket" else (COHORT,))
        _play(recorder, keys_from, alter=_routed(earlier))
        number, buckets = (2, (COHORT,)) if route == "round" else (1, (TWO_BUCKETS[1], TWO_BUCKETS[0]))  # c0..c3: bucket 1
    elif route == "another-bucket-client":
        buckets, receiver, sender = TWO_BUCKETS, "c5", "c7"

    def ciphertext(phase: Phase) -> bytes:
        if route == "sender":
            return phase.payloads["c1"].blobs[st.SHARE + "c2"]  # c2 -> c1, presented as c3 -> c1
        if route == "receiver":
            return phase.payloads["c2"].blobs[st.SHARE + "c3"]  # c3 -> c2, handed to c1
        if route == "another-bucket-client":
            return phase.payloads["c1"].blobs[st.SHARE + "c3"]  # c3 -> c1 in bucket 0, handed to c5 as from c7
        return earlier["c1"][st.SHARE + "c3"]  # c3 -> c1 of the other round or bucket

    def tamper(phase: Phase, client: str, data: PhaseData) -> PhaseData:
        if not (phase.trains and client == receiver):
            return data
        assert st.SHARE + sender in data.blobs
        return PhaseData(blobs={**data.blobs, st.SHARE + sender: ciphertext(phase)})

    recorder, clients = _halves(protocol, number=number, buckets=buckets, keys_from=keys_from)
    quantised, errors, weights = _play(recorder, clients, alter=tamper)
    bucket = next(i for i, b in enumerate(buckets) if receiver in b)
    assert sorted(errors) == [receiver], errors
    assert isinstance(errors[receiver], InvalidShare), errors[receiver]
    route_named = f"share from '{sender}' to '{receiver}' (run '{RUN}', round {number}, bucket {bucket}) does not authenticate"
    assert route_named in str(errors[receiver])
    sums = recorder.result()
    assert _members(sums) == sorted({c for b in buckets for c in b} - {receiver})
    _check_exact(protocol, sums, {c: q for c, q in quantised.items() if c != receiver}, weights, buckets)
