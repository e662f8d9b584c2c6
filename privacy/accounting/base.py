"""The accountant interface: immutable privacy events in, (epsilon, delta) out.

A release of the sampled Gaussian mechanism is a `GaussianEvent` (noise multiplier z,
sampling rate q, number of steps). An accountant composes events and answers "how much has been
spent at this delta?". An event with ``noise_multiplier == 0`` is a release without noise: it has
no differential-privacy guarantee, and every accountant then reports an unbounded epsilon
(``math.inf``) from that point on, instead of a misleading finite number.

Accountants are small and stateful; the math lives in opacus's analysis functions, which each
subclass wraps. ``state_dict``/``load_state_dict`` let a restarted server resume from its ledger.
`Accountant.get_privacy_spent` returns a `PrivacySpent` whose ``note`` says when the accountant
could not compute its own bound for a noisy history and reported another valid (looser) one
instead (PRV falls back to RDP): a noisy release is never reported as "no guarantee".
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from privacy.errors import PrivacyError

#: Version of `Accountant.state_dict`; bumped when its layout changes.
STATE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class GaussianEvent:
    """One kind of release: ``steps`` rounds of the Gaussian mechanism with noise std ``z * C``
    on a cohort drawn with probability ``sample_rate`` (``1.0``: everybody, no amplification)."""

    noise_multiplier: float
    sample_rate: float
    steps: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise PrivacyError(f"privacy event: steps must be an integer >= 1, got {self.steps!r}")
        z, q = float(self.noise_multiplier), float(self.sample_rate)
        if not math.isfinite(z) or z < 0:
            raise PrivacyError(f"privacy event: noise_multiplier must be finite and >= 0, got {self.noise_multiplier!r}")
        if not math.isfinite(q) or not 0 < q <= 1:
            raise PrivacyError(f"privacy event: sample_rate must be in (0, 1], got {self.sample_rate!r}")

    @property
    def noiseless(self) -> bool:
        """True when the release carries no noise, so no (epsilon, delta) guarantee holds."""
        return self.noise_multiplier == 0


@dataclass(frozen=True)
class PrivacySpent:
    """The spend at ``delta``: ``epsilon`` (``math.inf``: unbounded) and, when the accountant
    reported another valid bound than its own (e.g. PRV falling back to RDP), a ``note`` saying so."""

    epsilon: float
    delta: float
    note: str | None = None


class Accountant(ABC):
    """Composes `GaussianEvent` releases and reports epsilon at a given delta.

    Subclasses implement `_epsilon` for a non-empty history of noisy events; the base class
    handles the empty history (epsilon 0) and noiseless releases (epsilon infinite).
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self._history: list[GaussianEvent] = []

    @property
    def history(self) -> tuple[GaussianEvent, ...]:
        """Every event composed so far, in order."""
        return tuple(self._history)

    def compose(self, event: GaussianEvent, count: int = 1) -> None:
        """Add ``count`` repetitions of ``event`` to the history."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise PrivacyError(f"accountant {self.name!r}: count must be an integer >= 1, got {count!r}")
        self._history.extend([event] * count)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta``; ``math.inf`` after any noiseless release."""
        return self.get_privacy_spent(delta).epsilon

    def get_privacy_spent(self, delta: float) -> PrivacySpent:
        """The spend so far at ``delta``, with a note when a fallback bound was reported."""
        if not 0 < delta < 1:
            raise PrivacyError(f"accountant {self.name!r}: delta must be in (0, 1), got {delta!r}")
        if not self._history:
            return PrivacySpent(0.0, delta)
        if any(e.noiseless for e in self._history):
            return PrivacySpent(math.inf, delta)
        eps, note = self._bound(_merged(self._history), delta)
        return PrivacySpent(float(eps), delta, note)

    def composed_with(self, event: GaussianEvent) -> Self:
        """A copy with the same settings whose history also holds ``event``; ``self`` is unchanged."""
        trial = copy.copy(self)
        trial._history = [*self._history, event]
        return trial

    def would_exceed(self, event: GaussianEvent, *, epsilon_budget: float, delta: float) -> bool:
        """Whether composing ``event`` would push epsilon above ``epsilon_budget`` (no side effect)."""
        return self.composed_with(event).epsilon(delta) > epsilon_budget

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the history."""
        return {
            "schema_version": STATE_SCHEMA_VERSION,
            "accountant": self.name,
            "history": [[e.noise_multiplier, e.sample_rate, e.steps] for e in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with a snapshot from `state_dict`."""
        if state.get("schema_version") != STATE_SCHEMA_VERSION:
            raise PrivacyError(
                f"accountant {self.name!r}: state schema_version {state.get('schema_version')!r} is not "
                f"{STATE_SCHEMA_VERSION}; it was written by another secure-fl version"
            )
        if state.get("accountant") != self.name:
            raise PrivacyError(f"accountant {self.name!r}: state belongs to accountant {state.get('accountant')!r}")
        self._history = [GaussianEvent(float(z), float(q), int(s)) for z, q, s in state["history"]]

    def _bound(self, events: Sequence[GaussianEvent], delta: float) -> tuple[float, str | None]:
        """Epsilon and an optional note for a non-empty noisy history; by default `_epsilon`, no note.

        Override to fall back to another valid bound (and say which in the note) when the
        accountant's own computation cannot give a finite answer for a noisy history.
        """
        return self._epsilon(events, delta), None

    @abstractmethod
    def _epsilon(self, events: Sequence[GaussianEvent], delta: float) -> float:
        """Epsilon at ``delta`` for a non-empty history of noisy events (consecutive equal events merged)."""


def _merged(events: Sequence[GaussianEvent]) -> list[GaussianEvent]:
    """Merge consecutive events with equal (z, q) into one with summed steps (same composition)."""
    out: list[GaussianEvent] = []
    for event in events:
        last = out[-1] if out else None
        if last and (last.noise_multiplier, last.sample_rate) == (event.noise_multiplier, event.sample_rate):
            out[-1] = GaussianEvent(last.noise_multiplier, last.sample_rate, last.steps + event.steps)
        else:
            out.append(event)
    return out
