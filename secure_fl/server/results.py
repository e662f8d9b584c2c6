"""What a run hands back: the result object, the observer hooks, and the thread that runs rounds.

Kept apart from the round engine (`secure_fl.server.engine`) so that code reading a finished run
(the API, the CLI, tests) does not need the engine's machinery.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from privacy.ledger import PrivacyLedger, epsilon_from_json
from secure_fl.errors import RunError

__all__ = ["BackgroundRun", "RoundObserver", "RunInterrupted", "RunResult", "SilentObserver", "new_run_id"]


class _Runnable(Protocol):
    def run(self) -> RunResult: ...


class RoundObserver(Protocol):
    """Hooks the engine calls as a round progresses (progress bars, user callbacks)."""

    def on_round_start(self, round_number: int, cohort: Sequence[str]) -> None: ...

    def on_update(self, client_id: str, round_number: int) -> None: ...

    def on_round_end(self, record: dict[str, Any]) -> bool | None: ...


class SilentObserver:
    """An observer that does nothing."""

    def on_round_start(self, round_number: int, cohort: Sequence[str]) -> None:
        """Do nothing."""

    def on_update(self, client_id: str, round_number: int) -> None:
        """Do nothing."""

    def on_round_end(self, record: dict[str, Any]) -> bool | None:
        """Do nothing."""
        return None


@dataclass
class RunResult:
    """What a finished run produced."""

    run_id: str
    run_dir: Path
    metrics: list[dict[str, Any]]
    adapter_dir: Path
    global_state: dict[str, np.ndarray] = field(repr=False)
    report_json: Path | None = None
    report_html: Path | None = None
    #: ``True`` when a callback's ``on_round_end`` returned ``True`` before ``run.rounds`` rounds ran.
    stopped_early: bool = False
    #: Why the run ended before ``run.rounds`` (e.g. "stopped early by a callback after round 2 of 5"), else ``None``.
    stop_reason: str | None = None
    #: ``empirical_audit.json`` when ``privacy.audit = true`` ran the empirical audit after the run, else ``None``.
    empirical_audit: Path | None = None

    @property
    def ledger_path(self) -> Path:
        """The run's privacy ledger (``ledger.jsonl``)."""
        return self.run_dir / "ledger.jsonl"

    @property
    def ledger(self) -> list[dict[str, Any]]:
        """Every privacy-ledger line: one per released round (epsilon ``None`` means unbounded)."""
        return PrivacyLedger(self.ledger_path).entries()

    @property
    def report(self) -> dict[str, Any] | None:
        """The privacy audit report as a dict, or ``None`` if it was not written."""
        if self.report_json is None or not self.report_json.exists():
            return None
        data: dict[str, Any] = json.loads(self.report_json.read_text(encoding="utf-8"))
        return data

    @property
    def epsilon(self) -> dict[str, float]:
        """Final epsilon per accountant at the configured delta (``math.inf``: no guarantee)."""
        entries = self.ledger
        return {k: epsilon_from_json(v) for k, v in entries[-1]["epsilon"].items()} if entries else {}

    @property
    def final_accuracy(self) -> float | None:
        """Accuracy after the last successful round, if evaluated (``None`` for a causal-LM run)."""
        return self.final_metric("accuracy")

    @property
    def final_perplexity(self) -> float | None:
        """Perplexity of the held-out set after the last successful round (causal-LM runs), if evaluated."""
        return self.final_metric("perplexity")

    def final_metric(self, name: str) -> float | None:
        """The server's metric ``name`` after the last round that evaluated it (``None`` if none did)."""
        for record in reversed(self.metrics):
            if record.get(name) is not None:
                return float(record[name])
        return None

    @property
    def headline(self) -> str:
        """The run's headline metric for a summary line: ``"accuracy 0.9123"``, ``"perplexity 12.34"``, ``"accuracy n/a"``."""
        if any("perplexity" in record for record in self.metrics):
            perplexity = self.final_perplexity
            return f"perplexity {'n/a' if perplexity is None else f'{perplexity:.4g}'}"
        accuracy = self.final_accuracy
        return f"accuracy {'n/a' if accuracy is None else f'{accuracy:.4f}'}"


def new_run_id() -> str:
    """A fresh run id: UTC time plus random hex, unique across servers."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class RunInterrupted(RunError):
    """The run was stopped while a round was open; that round released nothing."""


class BackgroundRun:
    """`FederatedServer.run` in a daemon thread, started at construction.

    `result` hands the outcome to the caller's thread: the `RunResult`, or the run's
    own exception re-raised, so a failed run is never mistaken for a finished one.
    """

    def __init__(self, server: _Runnable, *, name: str = "secure-fl-rounds") -> None:
        self._server = server
        self._result: RunResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._server.run()
        except BaseException as exc:  # handed to result()
            self._error = exc

    def is_alive(self) -> bool:
        """Whether the rounds are still running."""
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the rounds to end (at most ``timeout`` seconds)."""
        self._thread.join(timeout)

    def result(self) -> RunResult:
        """The run's result; re-raises the run's exception. Call after the thread ended."""
        if self._thread.is_alive():
            raise RunError("the run is still going; join() it first")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result
