"""Console progress: a tqdm bar per round (one tick per update received) and a metrics line.

The bar is drawn only where someone watches it: on a terminal (stderr is a TTY) or in a
notebook. Piped or redirected output (CI logs, ``2> log``) gets the metrics lines alone, as
tqdm's ``disable=None`` convention has it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm


def format_size(num_bytes: float) -> str:
    """A byte count for people: ``B`` below 1 kB, ``kB`` below 1 MB, else ``MB`` (powers of 1000)."""
    if num_bytes < 1e3:
        return f"{num_bytes:.0f} B"
    if num_bytes < 1e6:
        return f"{num_bytes / 1e3:.1f} kB"
    return f"{num_bytes / 1e6:.2f} MB"


def format_record(record: dict[str, Any], rounds: int) -> str:
    """One human-readable line for a round's metrics record (missing keys are left out)."""
    parts = [f"round {record['round']}/{rounds}"]
    if record.get("clients") is not None and record.get("cohort") is not None:
        parts.append(f"clients {record['clients']}/{record['cohort']}")
        if record.get("cohort_target") is not None and record["cohort_target"] > record["cohort"]:
            parts[-1] += f" ({record['cohort_target']} wanted: too few clients available)"
    status = record.get("status", "ok")
    if status != "ok":
        parts.append(f"{'INTERRUPTED' if status == 'interrupted' else 'FAILED'}: {record.get('reason', '')}")
    for key, label in (("accuracy", "acc"), ("loss", "loss"), ("perplexity", "ppl"), ("train_loss", "train_loss"),
                       ("fed_eval_accuracy", "fed_acc"), ("fed_eval_perplexity", "fed_ppl")):
        if record.get(key) is not None:
            parts.append(f"{label} {record[key]:.4g}" if "perplexity" in key else f"{label} {record[key]:.4f}")
    for key, label in (("bytes_up", "up"), ("bytes_down", "down")):
        if record.get(key) is not None:
            parts.append(f"{label} {format_size(record[key])}")
    if record.get("seconds") is not None:
        parts.append(f"{record['seconds']:.1f} s")
    if record.get("dropped"):
        parts.append(f"dropped {','.join(record['dropped'])}")
    return " | ".join(parts)


def bar_wanted(stream: Any = None) -> bool:
    """Whether to draw a progress bar: in a notebook, or when ``stream`` (default stderr) is a TTY."""
    if any(cls.__module__ == "tqdm.notebook" for cls in tqdm.__mro__):  # tqdm.auto picked the notebook widget
        return True
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # closed or detached stream
        return False


class ProgressObserver:
    """Round observer that draws a tqdm bar per round and prints one metrics line per round."""

    def __init__(self, rounds: int, *, enabled: bool = True) -> None:
        self.rounds = rounds
        self.enabled = enabled
        self._bar: Any = None

    def on_round_start(self, round_number: int, cohort: Sequence[str]) -> None:
        """Open the round's bar (not when stderr is piped: see the module docstring)."""
        if self.enabled and bar_wanted():
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
