"""Console progress: a tqdm bar per round (one tick per update received) and a metrics line."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm


def format_record(record: dict[str, Any], rounds: int) -> str:
    """One human-readable line for a round's metrics record."""
    parts = [f"round {record['round']}/{rounds}", f"clients {record['clients']}/{record['cohort']}"]
    if record.get("status") != "ok":
        parts.append(f"FAILED: {record.get('reason', '')}")
    for key, label in (("accuracy", "acc"), ("loss", "loss"), ("train_loss", "train_loss"), ("fed_eval_accuracy", "fed_acc")):
        if record.get(key) is not None:
            parts.append(f"{label} {record[key]:.4f}")
    parts.append(f"up {record['bytes_up'] / 1e6:.2f} MB")
    parts.append(f"down {record['bytes_down'] / 1e6:.2f} MB")
    parts.append(f"{record['seconds']:.1f} s")
    if record.get("dropped"):
        parts.append(f"dropped {','.join(record['dropped'])}")
    return " | ".join(parts)


class ProgressObserver:
    """Round observer that draws a tqdm bar per round and prints one metrics line per round."""

    def __init__(self, rounds: int, *, enabled: bool = True) -> None:
        self.rounds = rounds
        self.enabled = enabled
        self._bar: Any = None

    def on_round_start(self, round_number: int, cohort: Sequence[str]) -> None:
        """Open the round's bar."""
        if self.enabled:
            self._bar = tqdm(total=len(cohort), desc=f"round {round_number}/{self.rounds}", unit="client", leave=False, file=sys.stderr)

    def on_update(self, client_id: str, round_number: int) -> None:
        """Tick the bar for one received update."""
        if self._bar is not None:
            self._bar.update(1)

    def on_round_end(self, record: dict[str, Any]) -> bool | None:
        """Close the bar and print the metrics line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.enabled:
            tqdm.write(format_record(record, self.rounds), file=sys.stdout)
        return None
