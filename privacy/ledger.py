"""The privacy ledger: an append-only ``ledger.jsonl``, one fsynced JSON line per release.

The server writes a round's line *before* the new global adapter leaves it (checkpoint, adapter
directory, next task), so a crash can lose a model but never a spend. Each line records the
release as a Gaussian event (``noise_multiplier``, ``sample_rate``, ``steps``) plus who took part,
and ``epsilon``: the cumulative spend after this round per accountant at ``delta``. ``null``
means unbounded: the release had no differential-privacy guarantee.

Replaying the events of a ledger (`PrivacyLedger.replay`) rebuilds every accountant, so
the ledger alone is the source of truth; the epsilons in it are there for humans and reports.
When an accountant reported a fallback bound (PRV -> RDP), ``epsilon_notes`` names it per accountant.
A distributed discrete Gaussian release (`DiscreteGaussianEvent`) adds ``event`` (its kind) and its
fields (``local_std``, ``min_clients``, ``max_clients``, ``l2_sensitivity``, ``l1_sensitivity``,
``dimension``); its ``noise_multiplier`` is the effective ``sqrt(n_min) s / D2``, for humans only.
A line without ``event`` is a Gaussian release (every line written before the kind existed).

With sample-level DP-SGD a line also holds ``sample_level``: client id -> ``{noise_multiplier,
sample_rate, steps}``, the DP-SGD steps of this round of every client whose output the server saw
(optional: ledgers without it read as before). Each client's sample-level spend is the composition
of its own events (`sample_level_events`); they do not enter the line's run-level ``epsilon``.

The lines form a hash chain: each holds ``prev_sha256``, the SHA-256 of the previous line's text
(`GENESIS` for the first), so an edited, deleted or reordered line breaks the chain and is refused
naming the line. A ledger written before the chain (no ``prev_sha256``) cannot be checked and is
refused. Truncation at the end (or an emptied ledger) does not break the chain: `PrivacyLedger.verify`
catches it by cross-checking the released rounds of ``metrics.jsonl``, and checks every line's
``delta``. The chain makes damage evident, not impossible: whoever can rewrite both files
consistently (the server operator) is trusted, as the report says.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from privacy.accounting import Accountant, DiscreteGaussianEvent, GaussianEvent, PrivacyEvent
from privacy.accounting.base import discrete_gaussian_event_of
from privacy.errors import PrivacyError

#: Keys every ledger line carries.
REQUIRED_KEYS: tuple[str, ...] = ("round", "mechanism", "noise_multiplier", "sample_rate", "steps", "delta", "epsilon")


#: ``prev_sha256`` of the first line.
GENESIS = "0" * 64
#: The key holding the previous line's SHA-256.
CHAIN_KEY = "prev_sha256"


def line_hash(text: str) -> str:
    """SHA-256 (hex) of one ledger line's text, without its newline."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chain_lines(entries: Iterable[Mapping[str, Any]]) -> str:
    """The text of a ledger holding ``entries``, each chained to the one before (for tools and tests)."""
    out, previous = [], GENESIS
    for entry in entries:
        line = json.dumps({**dict(entry), CHAIN_KEY: previous}, allow_nan=False)
        out.append(line + "\n")
        previous = line_hash(line)
    return "".join(out)


class LedgerError(PrivacyError):
    """The ledger file is unreadable or a line breaks its rules; the message names the line."""


def epsilon_to_json(value: float) -> float | None:
    """Epsilon as stored in JSON: ``None`` for an unbounded (infinite) spend."""
    return None if math.isinf(value) else float(value)


def epsilon_from_json(value: float | None) -> float:
    """Inverse of `epsilon_to_json`."""
    return math.inf if value is None else float(value)


class PrivacyLedger:
    """Reads and appends ``ledger.jsonl``; round numbers must strictly increase."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._last: dict[str, Any] | None = None  # the newest line, once read or written
        self._last_hash = GENESIS  # SHA-256 of the newest line's text
        self._loaded = False
        #: File line number of each entry of the last `entries` call (blank lines are skipped).
        self.line_numbers: list[int] = []

    def entries(self) -> list[dict[str, Any]]:
        """Every line, parsed and checked (chain included); an empty list if the file does not exist yet."""
        self.line_numbers = []
        if not self.path.exists():
            self._last, self._last_hash, self._loaded = None, GENESIS, True
            return []
        out: list[dict[str, Any]] = []
        previous_hash = GENESIS
        with self.path.open(encoding="utf-8") as handle:
            for number, raw in enumerate(handle, start=1):
                text = raw.rstrip("\n")
                if not text.strip():
                    continue
                where = f"{self.path} line {number}"
                try:
                    entry = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise LedgerError(
                        f"{where} is not valid JSON ({exc.msg}); the ledger was edited or truncated, "
                        "so the spent budget cannot be trusted: restore it from a backup"
                    ) from None
                self._check(entry, where=where, previous=out[-1] if out else None)
                self._check_chain(entry, where=where, expected=previous_hash, first=not out)
                out.append(entry)
                self.line_numbers.append(number)
                previous_hash = line_hash(text)
        self._last, self._last_hash, self._loaded = (out[-1] if out else None), previous_hash, True
        return out

    @staticmethod
    def _check_chain(entry: Mapping[str, Any], *, where: str, expected: str, first: bool) -> None:
        if CHAIN_KEY not in entry:
            raise LedgerError(
                f"{where} has no {CHAIN_KEY!r}: the ledger was written before secure-fl chained its lines "
                "(or the key was removed), so deleted or edited lines cannot be detected and its spend "
                "cannot be trusted; it is refused (rerun, or re-chain a copy you have verified by other means)"
            )
        if entry[CHAIN_KEY] != expected:
            what = "the first line must chain to the genesis value" if first else "it does not match the line before"
            raise LedgerError(
                f"{where}: {CHAIN_KEY} breaks the hash chain ({what}); a line before it was edited, deleted "
                "or reordered, so the spent budget cannot be trusted: restore the ledger from a backup"
            )

    def verify(self, *, metrics: Sequence[Mapping[str, Any]], delta: float) -> list[int]:
        """Cross-check the ledger with the run's ``metrics.jsonl`` records and its ``delta``.

        Raises `LedgerError` naming the line or round when a line's delta is not ``delta``, a
        round released according to the metrics (status ``ok``) has no line, or a line's round
        is recorded as not released (failed, aborted, interrupted). Returns the rounds of lines
        with no metrics record at all, which is only accepted for the newest line(s) after the
        last metrics record (the server stopped between writing the ledger and the metrics): their
        spend counts, and the report flags them.
        """
        entries = self.entries()
        numbers = self.line_numbers
        status = {int(m["round"]): str(m.get("status", "ok")) for m in metrics if "round" in m}
        lines = {int(e["round"]): n for e, n in zip(entries, numbers)}
        last_metric = max(status, default=0)
        unconfirmed: list[int] = []
        for entry, number in zip(entries, numbers):
            where, round_number = f"{self.path} line {number} (round {entry['round']})", int(entry["round"])
            if not _same_delta(entry["delta"], delta):
                raise LedgerError(f"{where}: delta {entry['delta']!r} is not the run's privacy.delta = {delta!r}")
            if round_number not in status:
                if round_number < last_metric:
                    raise LedgerError(f"{where}: metrics.jsonl has no record of round {round_number}, "
                                      "though it records later rounds; metrics.jsonl or the ledger was edited")
                unconfirmed.append(round_number)
            elif status[round_number] != "ok":
                raise LedgerError(f"{where}: metrics.jsonl says round {round_number} {status[round_number]} "
                                  "and released nothing, yet the ledger records a release; one of them was edited")
        missing = sorted(r for r, s in status.items() if s == "ok" and r not in lines)
        if missing:
            raise LedgerError(
                f"{self.path}: round(s) {', '.join(map(str, missing))} released according to metrics.jsonl "
                "(status ok) have no ledger line; the ledger was truncated, emptied or edited, so the "
                "spent budget cannot be trusted: restore it from a backup"
            )
        return unconfirmed

    def append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``entry`` against the ledger so far, chain it, append it as one line and fsync;
        return the line as written.

        The file is read and checked once per ledger object; later appends compare with the line
        this object wrote last, so a run's appends stay O(1) instead of re-reading the file.
        """
        if not self._loaded:
            self.entries()
        line_entry = {**dict(entry), CHAIN_KEY: self._last_hash}
        self._check(line_entry, where="new ledger line", previous=self._last)
        text = json.dumps(line_entry, allow_nan=False)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._last, self._last_hash = line_entry, line_hash(text)
        return line_entry

    def events(self) -> list[PrivacyEvent]:
        """The releases recorded so far, in order."""
        return [event_of(entry) for entry in self.entries()]

    def replay(self, accountants: Iterable[Accountant]) -> int:
        """Compose every recorded release into each accountant; returns the number of releases."""
        events = self.events()
        for accountant in accountants:
            for event in events:
                accountant.compose(event)
        return len(events)

    @staticmethod
    def _check(entry: Any, *, where: str, previous: Mapping[str, Any] | None) -> None:
        if not isinstance(entry, dict):
            raise LedgerError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        missing = [key for key in REQUIRED_KEYS if key not in entry]
        if missing:
            raise LedgerError(f"{where}: missing key(s) {', '.join(missing)}")
        if not isinstance(entry["epsilon"], dict):
            raise LedgerError(f"{where}: 'epsilon' must be an object mapping accountant name to epsilon (or null)")
        try:
            event_of(entry)
            sample_level_events(entry)
        except (PrivacyError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise LedgerError(f"{where}: {exc}") from None
        round_number = entry["round"]
        if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 1:
            raise LedgerError(f"{where}: 'round' must be an integer >= 1, got {round_number!r}")
        if previous is not None and round_number <= previous["round"]:
            raise LedgerError(
                f"{where}: round {round_number} does not follow round {previous['round']}; "
                "a ledger only grows, one line per release"
            )


def _same_delta(value: Any, delta: float) -> bool:
    try:
        return math.isclose(float(value), float(delta), rel_tol=1e-12, abs_tol=0.0)
    except (TypeError, ValueError):
        return False


#: The ``event`` value of a Gaussian line (the default when a line has no ``event``).
GAUSSIAN_KIND = "gaussian"


def event_of(entry: Mapping[str, Any]) -> PrivacyEvent:
    """The event a ledger line records: Gaussian unless its ``event`` names another kind."""
    kind = entry.get("event", GAUSSIAN_KIND)
    if kind == DiscreteGaussianEvent.KIND:
        return discrete_gaussian_event_of(entry)
    if kind != GAUSSIAN_KIND:
        raise PrivacyError(f"unknown privacy event kind {kind!r}")
    return GaussianEvent(float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"]))


def event_entry(event: PrivacyEvent) -> dict[str, Any]:
    """The ledger keys that record ``event`` (``noise_multiplier``, ``sample_rate``, ``steps``, and more for other kinds)."""
    if isinstance(event, GaussianEvent):
        return {"noise_multiplier": event.noise_multiplier, "sample_rate": event.sample_rate, "steps": event.steps}
    return {
        "noise_multiplier": event.effective_noise_multiplier, "sample_rate": event.sample_rate, "steps": event.steps,
        "event": event.KIND, **event.fields(),
    }


def sample_level_events(entry: Mapping[str, Any]) -> dict[str, GaussianEvent]:
    """Client id -> the DP-SGD event a ledger line (or metrics record) holds in ``sample_level`` (``{}`` if none)."""
    table = entry.get("sample_level") or {}
    if not isinstance(table, Mapping):
        raise ValueError("'sample_level' must map client id to {noise_multiplier, sample_rate, steps}")
    return {
        str(client): GaussianEvent(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
        for client, e in table.items()
    }


class ReleaseAccounting:
    """Accountants plus the ledger: compose each release and write its line before it is released.

    On construction the accountants are rebuilt from the ledger's events, so a server that reopens
    a run directory continues the spend instead of starting from zero.

    Parameters
    ----------
    ledger:
        The run's ledger.
    accountants:
        Accountant name -> fresh accountant (each is fed the ledger's history here).
    delta:
        The delta every epsilon is reported at.
    """

    def __init__(self, ledger: PrivacyLedger, accountants: Mapping[str, Accountant], *, delta: float) -> None:
        if not 0 < delta < 1:
            raise PrivacyError(f"privacy.delta must be in (0, 1), got {delta!r}")
        if not accountants:
            raise PrivacyError("privacy.accountants is empty; name at least one accountant (e.g. 'rdp')")
        self.ledger = ledger
        self.accountants = dict(accountants)
        self.delta = float(delta)
        for entry, number in zip(ledger.entries(), ledger.line_numbers):
            if not _same_delta(entry["delta"], self.delta):
                raise LedgerError(f"{ledger.path} line {number} (round {entry['round']}): delta {entry['delta']!r} "
                                  f"is not privacy.delta = {self.delta!r}; one ledger states every epsilon at one delta")
        self.releases = ledger.replay(self.accountants.values())

    def epsilon(self) -> dict[str, float]:
        """Cumulative epsilon per accountant at `delta` (``math.inf``: unbounded)."""
        return {name: accountant.epsilon(self.delta) for name, accountant in self.accountants.items()}

    def record(
        self,
        *,
        round: int,
        event: PrivacyEvent,
        mechanism: Mapping[str, Any],
        details: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Append the ledger line for ``event``, then compose it into every accountant; return the line.

        The line's epsilons come from copies of the accountants that include ``event``; they replace
        the accountants only once the line is on disk, so a failed write spends nothing.

        ``mechanism`` is the mechanism's `describe` output (its ``mode`` becomes the line's
        ``mechanism``); ``details`` adds who took part (cohort, contributors, dropouts...).
        """
        after = {name: accountant.composed_with(event) for name, accountant in self.accountants.items()}
        spent = {name: accountant.get_privacy_spent(self.delta) for name, accountant in after.items()}
        notes = {name: s.note for name, s in spent.items() if s.note}
        entry: dict[str, Any] = {
            "round": round,
            "mechanism": str(mechanism.get("mode", "unknown")),
            "guarantee": mechanism.get("guarantee", "none"),
            **event_entry(event),
            "clip_norm": mechanism.get("clip_norm"),
            "delta": self.delta,
            "epsilon": {name: epsilon_to_json(s.epsilon) for name, s in spent.items()},
            **({"epsilon_notes": notes} if notes else {}),
            **dict(details or {}),
        }
        entry = self.ledger.append(entry)  # if this raises, the release does not happen and nothing is spent
        self.accountants = after
        self.releases += 1
        return entry
