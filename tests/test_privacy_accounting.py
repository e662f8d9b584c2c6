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


# --- cross-checks against independent computations (issue 10, "also fix") ---------------------

def _opacus_rdp(z: float, q: float, steps: int, orders: list[float]) -> float:
    """opacus's analysis functions called directly, no secure-fl code in between."""
    from opacus.accountants.analysis import rdp as analysis

    rdp = analysis.compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=orders)
    return float(analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=DELTA)[0])


def _dp_accounting_rdp(z: float, q: float, steps: int) -> float:
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant = rdp_privacy_accountant.RdpAccountant()  # dp_accounting's default orders (to 1024)
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(DELTA))


def test_rdp_orders_reach_the_optimum_of_small_budgets() -> None:
    """Orders stopping at 63 overstated z=50, q=1, one step as 0.1155; the optimum is near order 176."""
    from privacy.accounting.rdp import DEFAULT_ORDERS

    assert max(DEFAULT_ORDERS) >= 1024
    small = _spent("rdp", GaussianEvent(50.0, 1.0))
    assert small < 0.07 and small == pytest.approx(_opacus_rdp(50.0, 1.0, 1, [float(a) for a in range(2, 2049)]), rel=0.02)
    for z, q, steps in ((50.0, 1.0, 1), (100.0, 1.0, 1), (1.0, 0.01, 1000), (1.0, 1.0, 1), (8.0, 0.1, 200)):
        ours = _spent("rdp", GaussianEvent(z, q, steps))
        # our orders are a superset of dp_accounting's defaults: never looser, and close
        reference = _dp_accounting_rdp(z, q, steps)
        assert ours <= reference * (1 + 1e-6) and ours == pytest.approx(reference, rel=0.1), (z, q, steps)


def test_prv_falls_back_to_rdp_for_noisy_histories_it_cannot_bound() -> None:
    """z=0.8, q=1, 1000 steps: opacus's PRV answered inf (PLD: about 950); 1e5 steps: MemoryError."""
    for event in (GaussianEvent(0.8, 1.0, 1000), GaussianEvent(1.0, 1.0, 100_000)):
        accountant = create_accountant("prv")
        accountant.compose(event)
        spent = accountant.get_privacy_spent(DELTA)
        assert math.isfinite(spent.epsilon) and spent.epsilon == pytest.approx(_spent("rdp", event), rel=1e-9)
        assert spent.note is not None and "RDP bound" in spent.note and "max_domain_points" in spent.note
    assert _spent("prv", GaussianEvent(0.8, 1.0, 1000)) == pytest.approx(971.15, rel=1e-3)
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import pld_privacy_accountant

    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)  # 949.835 either way, 10x faster
    pld.compose(dp_accounting.GaussianDpEvent(0.8), 1000)
    assert 900 < pld.get_epsilon(DELTA) <= _spent("prv", GaussianEvent(0.8, 1.0, 1000))  # valid: not below PLD


@pytest.mark.parametrize("failure", ["inf", "memory"])
def test_prv_inf_or_memory_error_is_never_reported_as_no_guarantee(
    failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opacus.accountants import PRVAccountant as OpacusPRV

    def broken(self: object, delta: float, **kwargs: object) -> float:
        if failure == "memory":
            raise MemoryError("injected")
        return math.inf

    monkeypatch.setattr(OpacusPRV, "get_epsilon", broken)
    event = GaussianEvent(1.0, 0.5, 3)
    books = _accounting(tmp_path / "ledger.jsonl")
    entry = books.record(round=1, event=event, mechanism={"mode": "m", "guarantee": "client-level"})
    assert entry["epsilon"]["prv"] == pytest.approx(_spent("rdp", event)) and entry["epsilon"]["prv"] is not None
    assert "RDP bound" in entry["epsilon_notes"]["prv"] and "rdp" not in entry["epsilon_notes"]
    # a noiseless release is still unbounded, without a note
    assert create_accountant("prv").get_privacy_spent(DELTA).note is None


def test_per_client_epsilon_counts_steps_not_ledger_lines() -> None:
    """Two lines of 10 steps each at z=1, q=1: the client in both spent 20 steps (30.13), not 2 (7.08)."""
    from privacy.audit import build_report

    lines = [{"round": r, "mechanism": "m", "guarantee": "client-level", "noise_multiplier": 1.0, "sample_rate": 1.0,
              "steps": 10, "clip_norm": 1.0, "delta": DELTA, "epsilon": {"rdp": None}, "contributors": ["a"]}
             for r in (1, 2)]
    report = build_report(run={"clients": ["a"]}, config={"privacy": {"delta": DELTA, "accountants": ["rdp"]}},
                          metrics=[{"round": r, "status": "ok", "selected": ["a"]} for r in (1, 2)], ledger=lines)
    client = report["clients"][0]["epsilon"]["rdp"]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
    assert client == pytest.approx(_opacus_rdp(1.0, 1.0, 20, orders), rel=1e-6)
    assert client == pytest.approx(30.1266, rel=1e-4) and client == pytest.approx(_dp_accounting_rdp(1.0, 1.0, 20), rel=1e-6)


# --- the hash-chained ledger and its cross-check with metrics.jsonl ---------------------------

def _three_releases(path: Path) -> list[str]:
    books = _accounting(path, "rdp")
    for round_number in (1, 2, 3):
        books.record(round=round_number, event=GaussianEvent(1.0, 0.5), mechanism={"mode": "m"})
    return path.read_text().splitlines()


def test_ledger_lines_are_hash_chained(tmp_path: Path) -> None:
    import hashlib

    from privacy.ledger import GENESIS

    path = tmp_path / "ledger.jsonl"
    lines = _three_releases(path)
    previous = GENESIS
    for line in lines:
        assert json.loads(line)["prev_sha256"] == previous
        previous = hashlib.sha256(line.encode()).hexdigest()
    assert len(PrivacyLedger(path).entries()) == 3
    # a reopened ledger keeps chaining
    _accounting(path, "rdp").record(round=4, event=GaussianEvent(1.0, 0.5), mechanism={"mode": "m"})
    assert json.loads(path.read_text().splitlines()[3])["prev_sha256"] == previous


@pytest.mark.parametrize("damage, message", [
    ("edit", "line 2: prev_sha256 breaks the hash chain"),
    ("delete-middle", "line 2: prev_sha256 breaks the hash chain"),
    ("delete-first", "line 1: prev_sha256 breaks the hash chain .the first line"),
    ("swap", "line 1: prev_sha256 breaks the hash chain"),
    ("unchained", "line 1 has no 'prev_sha256'.*refused"),
])
def test_an_edited_or_unchained_ledger_is_refused_naming_the_line(tmp_path: Path, damage: str, message: str) -> None:
    path = tmp_path / "ledger.jsonl"
    lines = _three_releases(path)
    if damage == "edit":  # lower the recorded spend of round 1
        first = json.loads(lines[0])
        lines[0] = json.dumps({**first, "noise_multiplier": 5.0})
    elif damage == "delete-middle":
        del lines[1]
    elif damage == "delete-first":
        del lines[0]
    elif damage == "swap":
        lines[0], lines[1] = lines[1], lines[0]
    else:
        lines = [json.dumps({k: v for k, v in json.loads(line).items() if k != "prev_sha256"}) for line in lines]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match=message):
        PrivacyLedger(path).entries()
    with pytest.raises(LedgerError, match=message):
        _accounting(path, "rdp")  # a server never continues a damaged ledger


def _ok(*rounds: int) -> list[dict[str, object]]:
    return [{"round": r, "status": "ok"} for r in rounds]


def test_ledger_verify_cross_checks_metrics_and_delta(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    lines = _three_releases(path)
    ledger = PrivacyLedger(path)
    assert ledger.verify(metrics=_ok(1, 2, 3), delta=DELTA) == []
    with pytest.raises(LedgerError, match=r"line 1 \(round 1\): delta 1e-05 is not the run's privacy.delta = 1e-06"):
        ledger.verify(metrics=_ok(1, 2, 3), delta=1e-6)
    with pytest.raises(LedgerError, match="line 1 .round 1.: delta"):
        ReleaseAccounting(PrivacyLedger(path), {"rdp": create_accountant("rdp")}, delta=1e-6)
    failed = [{"round": 1, "status": "ok"}, {"round": 2, "status": "failed"}, {"round": 3, "status": "ok"}]
    with pytest.raises(LedgerError, match=r"line 2 \(round 2\): metrics.jsonl says round 2 failed"):
        ledger.verify(metrics=failed, delta=DELTA)
    with pytest.raises(LedgerError, match=r"line 2 \(round 2\): metrics.jsonl has no record of round 2"):
        ledger.verify(metrics=_ok(1, 3), delta=DELTA)
    # the newest line without its metrics record: the server stopped between the two writes
    assert ledger.verify(metrics=_ok(1, 2), delta=DELTA) == [3]
    path.write_text("\n".join(lines[:2]) + "\n")  # the last line deleted: the chain cannot tell ...
    with pytest.raises(LedgerError, match=r"round\(s\) 3 released according to metrics.jsonl .status ok. have no ledger line"):
        ledger.verify(metrics=_ok(1, 2, 3), delta=DELTA)  # ... metrics.jsonl can
    path.write_text("")  # emptied: no longer epsilon 0
    with pytest.raises(LedgerError, match=r"round\(s\) 1, 2, 3 released"):
        ledger.verify(metrics=_ok(1, 2, 3), delta=DELTA)
