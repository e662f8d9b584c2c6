"""Per-round hooks: log to your tracker, stop early, watch cohorts.

Pass callbacks to `secure_fl.simulate` or `secure_fl.Server`. A callback is either a
`Callback` subclass or a plain function ``fn(record) -> bool | None`` called after every
round with that round's metrics record (the same dict as a ``metrics.jsonl`` line). Returning
``True`` from ``on_round_end`` stops the run after that round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

from secure_fl.errors import ConfigError


class Callback:
    """Base class for round hooks; override what you need."""

    def on_round_start(self, round_number: int, cohort: Sequence[str]) -> None:
        """Called when a round opens, with the sampled client ids."""

    def on_update(self, client_id: str, round_number: int) -> None:
        """Called when a client's update was accepted (from a server thread)."""

    def on_round_end(self, record: dict[str, Any]) -> bool | None:
        """Called with the round's metrics record; return ``True`` to stop the run."""
        return None


RoundCallback = Union[Callback, Callable[[dict[str, Any]], Union[bool, None]]]


class EarlyStopping(Callback):
    """Stop when ``metric`` has not improved by ``min_delta`` for ``patience`` rounds.

    Parameters
    ----------
    metric:
        Key of the metrics record to watch (e.g. ``"accuracy"`` or ``"loss"``).
    patience:
        Rounds without improvement before stopping.
    min_delta:
        Smallest change that counts as an improvement.
    mode:
        ``"max"`` (higher is better) or ``"min"``.
    """

    def __init__(self, metric: str = "accuracy", *, patience: int = 2, min_delta: float = 0.0, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ConfigError(f"EarlyStopping mode must be 'max' or 'min', got {mode!r}")
        if patience < 1:
            raise ConfigError(f"EarlyStopping patience must be >= 1, got {patience}")
        self.metric, self.patience, self.min_delta, self.mode = metric, patience, min_delta, mode
        self.best = -math.inf if mode == "max" else math.inf
        self.stale = 0

    def on_round_end(self, record: dict[str, Any]) -> bool | None:
        """Track the best value; ask to stop after ``patience`` stale rounds."""
        value = record.get(self.metric)
        if value is None:
            return None
        improved = value > self.best + self.min_delta if self.mode == "max" else value < self.best - self.min_delta
        if improved:
            self.best, self.stale = float(value), 0
        else:
            self.stale += 1
        return self.stale >= self.patience


class CallbackObserver:
    """A round observer that forwards to a display observer and to user callbacks."""

    def __init__(self, display: Any, callbacks: Sequence[RoundCallback]) -> None:
        self.display = display
        self.callbacks = list(callbacks)

    def on_round_start(self, round_number: int, cohort: Sequence[str]) -> None:
        """Forward to everyone."""
        self.display.on_round_start(round_number, cohort)
        for cb in self.callbacks:
            if isinstance(cb, Callback):
                cb.on_round_start(round_number, cohort)

    def on_update(self, client_id: str, round_number: int) -> None:
        """Forward to everyone."""
        self.display.on_update(client_id, round_number)
        for cb in self.callbacks:
            if isinstance(cb, Callback):
                cb.on_update(client_id, round_number)

    def on_round_end(self, record: dict[str, Any]) -> bool | None:
        """Forward to everyone; stop if any callback asks to."""
        self.display.on_round_end(record)
        stop = False
        for cb in self.callbacks:
            answer = cb.on_round_end(record) if isinstance(cb, Callback) else cb(record)
            stop = stop or answer is True
        return stop
