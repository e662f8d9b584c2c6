"""The privacy ledger: an append-only ``ledger.jsonl``, one fsynced JSON line per release.

The server writes a round's line *before* the new global adapter leaves it (checkpoint, adapter
directory, next task), so a crash can lose a model but never a spend. Each line records the
release as a Gaussian event (``noise_multiplier``, ``sample_rate``, ``steps``) plus who took part,
and ``epsilon``: the cumulative spend after this round per accountant at ``delta``. ``null``
means unbounded: the release had no differential-privacy guarantee.

Replaying the events of a ledger (`PrivacyLedger.replay`) rebuilds every accountant, so
the ledger alone is the source of truth; the epsilons in it are there for humans and reports.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from privacy.accounting import Accountant, GaussianEvent
from privacy.errors import PrivacyError

#: Keys every ledger line carries.
REQUIRED_KEYS: tuple[str, ...] = ("round", "mechanism", "noise_multiplier", "sample_rate", "steps", "delta", "epsilon")


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
        self._loaded = False

    def entries(self) -> list[dict[str, Any]]:
        """Every line, parsed and checked; an empty list if the file does not exist yet."""
        if not self.path.exists():
            self._last, self._loaded = None, True
            return []
        out: list[dict[str, Any]] = []
        with self.path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LedgerError(
                        f"{self.path} line {number} is not valid JSON ({exc.msg}); the ledger was edited or truncated, "
                        "so the spent budget cannot be trusted: restore it from a backup"
                    ) from None
                self._check(entry, where=f"{self.path} line {number}", previous=out[-1] if out else None)
                out.append(entry)
        self._last, self._loaded = (out[-1] if out else None), True
        return out

    def append(self, entry: Mapping[str, Any]) -> None:
        """Check ``entry`` against the ledger so far, append it as one line and fsync.

        The file is read and checked once per ledger object; later appends compare with the line
        this object wrote last, so a run's appends stay O(1) instead of re-reading the file.
        """
        if not self._loaded:
            self.entries()
        line_entry = dict(entry)
        self._check(line_entry, where="new ledger line", previous=self._last)
        line = json.dumps(line_entry, allow_nan=False) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._last = line_entry

    def events(self) -> list[GaussianEvent]:
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
        except (PrivacyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{where}: {exc}") from None
        round_number = entry["round"]
        if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 1:
            raise LedgerError(f"{where}: 'round' must be an integer >= 1, got {round_number!r}")
        if previous is not None and round_number <= previous["round"]:
            raise LedgerError(
                f"{where}: round {round_number} does not follow round {previous['round']}; "
                "a ledger only grows, one line per release"
            )


def event_of(entry: Mapping[str, Any]) -> GaussianEvent:
    """The Gaussian event a ledger line records."""
    return GaussianEvent(float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"]))


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
        self.releases = ledger.replay(self.accountants.values())

    def epsilon(self) -> dict[str, float]:
        """Cumulative epsilon per accountant at `delta` (``math.inf``: unbounded)."""
        return {name: accountant.epsilon(self.delta) for name, accountant in self.accountants.items()}

    def record(
        self,
        *,
        round: int,
        event: GaussianEvent,
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
        entry: dict[str, Any] = {
            "round": round,
            "mechanism": str(mechanism.get("mode", "unknown")),
            "guarantee": mechanism.get("guarantee", "none"),
            "noise_multiplier": event.noise_multiplier,
            "sample_rate": event.sample_rate,
            "steps": event.steps,
            "clip_norm": mechanism.get("clip_norm"),
            "delta": self.delta,
            "epsilon": {name: epsilon_to_json(accountant.epsilon(self.delta)) for name, accountant in after.items()},
            **dict(details or {}),
        }
        self.ledger.append(entry)  # if this raises, the release does not happen and nothing is spent
        self.accountants = after
        self.releases += 1
        return entry
