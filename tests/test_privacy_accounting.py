"""Accountants (known answers, conformance over the registry), the ledger and its replay."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from privacy.accounting import Accountant, GaussianEvent, available, create_accountant, register_accountant
from privacy.errors import PrivacyError
from privacy.ledger import LedgerError, PrivacyLedger, ReleaseAccounting

DELTA = 1e-5


def _spent(name: str, *events: GaussianEvent, delta: float = DELTA) -> float:
    accountant = create_accountant(name)
    for event in events:
        accountant.compose(event)
    return accountant.epsilon(delta)


# --- known answers (values published with opacus / the privacy issue) -----------------------

def test_rdp_known_answers() -> None:
    assert _spent("rdp", GaussianEvent(1.0, 0.01, 1000)) == pytest.approx(2.1014, rel=1e-3)
    assert _spent("rdp", GaussianEvent(1.0, 1.0, 1)) == pytest.approx(4.7285, rel=1e-3)


def test_prv_is_tighter_than_rdp_and_close_to_the_exact_gaussian() -> None:
    prv = _spent("prv", GaussianEvent(1.0, 0.01, 1000))
    assert 1.7 < prv < _spent("rdp", GaussianEvent(1.0, 0.01, 1000))
    # one full-batch Gaussian release at z=1: the exact (analytic) epsilon is about 4.38
    assert _spent("prv", GaussianEvent(1.0, 1.0, 1)) == pytest.approx(4.38, abs=0.03)


# --- conformance: every registered accountant -----------------------------------------------

@pytest.mark.parametrize("name", available())
def test_accountant_conformance(name: str) -> None:
    accountant = create_accountant(name)
    assert accountant.name == name and accountant.epsilon(DELTA) == 0.0  # nothing spent yet
    event = GaussianEvent(1.5, 0.1)
    previous = 0.0
    for _ in range(3):  # composition never decreases the spend
        accountant.compose(event, 10)
        now = accountant.epsilon(DELTA)
        assert math.isfinite(now) and now > previous
        previous = now
    # more noise costs less; a larger delta reports a smaller epsilon
    assert _spent(name, GaussianEvent(3.0, 0.1, 30)) < previous
    assert accountant.epsilon(1e-3) < previous
    # a noiseless release has no guarantee, whatever came before or after
    accountant.compose(GaussianEvent(0.0, 0.1))
    accountant.compose(event)
    assert accountant.epsilon(DELTA) == math.inf
    # state round trip; would_exceed has no side effect
    state = json.loads(json.dumps(accountant.state_dict()))
    fresh = create_accountant(name)
    fresh.load_state_dict(state)
    assert fresh.history == accountant.history
    probe = create_accountant(name)
    probe.compose(event)
    before = probe.history
    assert probe.would_exceed(GaussianEvent(0.5, 1.0), epsilon_budget=1.0, delta=DELTA)
    assert not probe.would_exceed(GaussianEvent(50.0, 0.01), epsilon_budget=100.0, delta=DELTA)
    assert probe.history == before


def test_split_and_merged_histories_agree() -> None:
    for name in available():
        assert _spent(name, *[GaussianEvent(1.2, 0.05)] * 40) == pytest.approx(_spent(name, GaussianEvent(1.2, 0.05, 40)), rel=1e-9)


def test_bad_events_and_arguments_are_refused() -> None:
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        GaussianEvent(-1.0, 0.5)
    with pytest.raises(PrivacyError, match="sample_rate"):
        GaussianEvent(1.0, 0.0)
    with pytest.raises(PrivacyError, match="steps"):
        GaussianEvent(1.0, 0.5, 0)
    with pytest.raises(PrivacyError, match="delta"):
        create_accountant("rdp").epsilon(0.0)
    with pytest.raises(PrivacyError, match="belongs to accountant 'rdp'"):
        create_accountant("prv").load_state_dict(create_accountant("rdp").state_dict())
    with pytest.raises(ValueError, match="unknown privacy accountant 'pld'.*allowed: prv, rdp"):
        create_accountant("pld")


def test_a_user_accountant_registers_in_one_call() -> None:
    class Linear(Accountant):
        """Deliberately naive: epsilon = total steps / z (for the registry test only)."""

        name = "linear-test"

        def _epsilon(self, events, delta):  # type: ignore[no-untyped-def]
            return sum(e.steps / e.noise_multiplier for e in events)

    register_accountant("linear-test", Linear)
    assert "linear-test" in available()
    assert _spent("linear-test", GaussianEvent(2.0, 1.0, 4)) == 2.0
    with pytest.raises(ValueError, match="already registered"):
        register_accountant("linear-test", Linear)


# --- ledger -----------------------------------------------------------------------------------

def _accounting(path: Path, *names: str) -> ReleaseAccounting:
    return ReleaseAccounting(PrivacyLedger(path), {n: create_accountant(n) for n in names or ("rdp", "prv")}, delta=DELTA)


def test_ledger_lines_carry_the_contract_keys_and_replay_exactly(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    books = _accounting(path)
    mechanism = {"mode": "test", "guarantee": "client-level", "clip_norm": 1.0}
    for round_number in (1, 2, 4):  # round 3 failed: nothing released, no line
        entry = books.record(round=round_number, event=GaussianEvent(1.1, 0.2), mechanism=mechanism,
                             details={"contributors": ["a", "b"]})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2, 4]
    for key in ("round", "mechanism", "noise_multiplier", "sample_rate", "delta", "epsilon"):
        assert key in lines[-1]
    assert set(lines[-1]["epsilon"]) == {"rdp", "prv"} and lines[-1] == entry
    assert lines[-1]["contributors"] == ["a", "b"] and lines[-1]["mechanism"] == "test"
    # a restarted server rebuilds the spend from the ledger: the same numbers, nothing re-spent
    again = _accounting(path)
    assert again.releases == 3
    assert again.epsilon() == pytest.approx(books.epsilon())
    assert again.epsilon()["rdp"] == pytest.approx(_spent("rdp", GaussianEvent(1.1, 0.2, 3)))


def test_unbounded_epsilon_is_null_in_json(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    _accounting(path).record(round=1, event=GaussianEvent(0.0, 1.0), mechanism={"mode": "none"})
    assert json.loads(path.read_text())["epsilon"] == {"rdp": None, "prv": None}
    assert _accounting(path).epsilon() == {"rdp": math.inf, "prv": math.inf}


def test_ledger_refuses_going_backwards_and_damage_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    books = _accounting(path, "rdp")
    books.record(round=2, event=GaussianEvent(1.0, 0.5), mechanism={"mode": "m"})
    with pytest.raises(LedgerError, match="round 2 does not follow round 2"):
        books.record(round=2, event=GaussianEvent(1.0, 0.5), mechanism={"mode": "m"})
    assert books.releases == 1 and len(books.accountants["rdp"].history) == 1  # refused: nothing spent
    with path.open("a") as handle:
        handle.write('{"round": 3, "mechanism": "m", "noise_mult')  # a torn write
    with pytest.raises(LedgerError, match=r"line 2 is not valid JSON"):
        PrivacyLedger(path).entries()
    path.write_text(json.dumps({"round": 1, "mechanism": "m"}) + "\n")
    with pytest.raises(LedgerError, match="line 1: missing key"):
        PrivacyLedger(path).entries()
    line = {"round": 1, "mechanism": "m", "noise_multiplier": -2, "sample_rate": 1, "steps": 1, "delta": DELTA, "epsilon": {}}
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(LedgerError, match="line 1: privacy event: noise_multiplier"):
        _accounting(path)


def test_a_failed_append_spends_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Injected fault: the disk refuses the write; the accountants must not keep the event."""
    books = _accounting(tmp_path / "ledger.jsonl")
    books.record(round=1, event=GaussianEvent(1.0, 0.5), mechanism={"mode": "m"})
    before = books.epsilon()

    def refuse(self: PrivacyLedger, entry: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(PrivacyLedger, "append", refuse)
    with pytest.raises(OSError, match="disk full"):
        books.record(round=2, event=GaussianEvent(1.0, 0.5), mechanism={"mode": "m"})
    assert books.epsilon() == before and books.releases == 1
