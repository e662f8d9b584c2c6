"""The accountant interface: immutable privacy events in, (epsilon, delta) out.

A release of the sampled Gaussian mechanism is a `GaussianEvent` (noise multiplier z,
sampling rate q, number of steps); a release of the distributed discrete Gaussian (clients add
integer noise under secure aggregation) is a `DiscreteGaussianEvent`. `PrivacyEvent` is either. An accountant composes events and answers "how much has been
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
import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeAlias

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


def _check_steps_and_rate(steps: object, sample_rate: object) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PrivacyError(f"privacy event: steps must be an integer >= 1, got {steps!r}")
    q = float(sample_rate)  # type: ignore[arg-type]
    if not math.isfinite(q) or not 0 < q <= 1:
        raise PrivacyError(f"privacy event: sample_rate must be in (0, 1], got {sample_rate!r}")


@dataclass(frozen=True)
class DiscreteGaussianEvent:
    """``steps`` releases of the distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021).

    Every one of between ``min_clients`` and ``max_clients`` clients adds N_Z(0, ``local_std``^2)
    to each of ``dimension`` integer coordinates; the sum changes by at most ``l2_sensitivity``
    (L2) and ``l1_sensitivity`` (L1) when one client's update is replaced by zero (integer units).
    ``sample_rate`` is the probability a client takes part (``1.0``: no amplification claimed).
    The accountant is conservative over the survivors: the variance term uses ``min_clients``, the
    term for the sum of discrete Gaussians not being one uses ``max_clients``
    (`privacy.accounting.ddgauss`).
    """

    KIND: ClassVar[str] = "distributed-discrete-gaussian"
    #: The fields a ledger line stores besides ``sample_rate`` and ``steps``.
    FIELDS: ClassVar[tuple[str, ...]] = (
        "local_std", "min_clients", "max_clients", "l2_sensitivity", "l1_sensitivity", "dimension",
    )

    local_std: float
    min_clients: int
    max_clients: int
    l2_sensitivity: float
    l1_sensitivity: float
    dimension: int
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        _check_steps_and_rate(self.steps, self.sample_rate)
        for name in ("min_clients", "max_clients", "dimension"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrivacyError(f"privacy event: {name} must be an integer >= 1, got {value!r}")
        if self.max_clients < self.min_clients:
            raise PrivacyError(f"privacy event: max_clients={self.max_clients} < min_clients={self.min_clients}")
        for name in ("local_std", "l2_sensitivity", "l1_sensitivity"):
            value = float(getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise PrivacyError(f"privacy event: {name} must be finite and >= 0, got {getattr(self, name)!r}")
        if self.l2_sensitivity <= 0 or self.l1_sensitivity <= 0:
            raise PrivacyError("privacy event: the sensitivities of a discrete Gaussian release must be > 0")

    @property
    def noiseless(self) -> bool:
        """True when no client adds noise, so no (epsilon, delta) guarantee holds."""
        return self.local_std == 0

    @property
    def effective_noise_multiplier(self) -> float:
        """For humans: the std of the survivors' summed noise over the L2 sensitivity, ``sqrt(n_min) s / D2``.

        Not what the accountant uses (the sum of discrete Gaussians is not a discrete Gaussian).
        """
        return math.sqrt(self.min_clients) * self.local_std / self.l2_sensitivity

    def fields(self) -> dict[str, Any]:
        """The event's defining fields (without ``sample_rate`` and ``steps``), JSON-safe."""
        return {name: getattr(self, name) for name in self.FIELDS}


#: Every kind of release an accountant composes.
PrivacyEvent: TypeAlias = GaussianEvent | DiscreteGaussianEvent


def event_to_json(event: PrivacyEvent) -> list[Any] | dict[str, Any]:
    """A Gaussian event as ``[z, q, steps]`` (the layout older snapshots use), any other as a dict with ``event``."""
    if isinstance(event, GaussianEvent):
        return [event.noise_multiplier, event.sample_rate, event.steps]
    return {"event": event.KIND, **event.fields(), "sample_rate": event.sample_rate, "steps": event.steps}


def event_from_json(value: Any) -> PrivacyEvent:
    """Inverse of `event_to_json`."""
    if isinstance(value, Mapping):
        if value.get("event") != DiscreteGaussianEvent.KIND:
            raise PrivacyError(f"unknown privacy event kind {value.get('event')!r}")
        return discrete_gaussian_event_of(value)
    z, q, steps = value
    return GaussianEvent(float(z), float(q), int(steps))


def discrete_gaussian_event_of(values: Mapping[str, Any]) -> DiscreteGaussianEvent:
    """Build a `DiscreteGaussianEvent` from a mapping holding its fields, ``sample_rate`` and ``steps``."""
    try:
        return DiscreteGaussianEvent(
            local_std=float(values["local_std"]), min_clients=int(values["min_clients"]),
            max_clients=int(values["max_clients"]), l2_sensitivity=float(values["l2_sensitivity"]),
            l1_sensitivity=float(values["l1_sensitivity"]), dimension=int(values["dimension"]),
            sample_rate=float(values["sample_rate"]), steps=int(values["steps"]),
        )
    except KeyError as exc:
        raise PrivacyError(f"a {DiscreteGaussianEvent.KIND} event needs the field {exc.args[0]!r}") from None


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
        self._history: list[PrivacyEvent] = []

    @property
    def history(self) -> tuple[PrivacyEvent, ...]:
        """Every event composed so far, in order."""
        return tuple(self._history)

    def compose(self, event: PrivacyEvent, count: int = 1) -> None:
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

    def composed_with(self, event: PrivacyEvent) -> Self:
        """A copy with the same settings whose history also holds ``event``; ``self`` is unchanged."""
        trial = copy.copy(self)
        trial._history = [*self._history, event]
        return trial

    def would_exceed(self, event: PrivacyEvent, *, epsilon_budget: float, delta: float) -> bool:
        """Whether composing ``event`` would push epsilon above ``epsilon_budget`` (no side effect)."""
        return self.composed_with(event).epsilon(delta) > epsilon_budget

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot of the history."""
        return {
            "schema_version": STATE_SCHEMA_VERSION,
            "accountant": self.name,
            "history": [event_to_json(e) for e in self._history],
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
        self._history = [event_from_json(e) for e in state["history"]]

    def _bound(self, events: Sequence[PrivacyEvent], delta: float) -> tuple[float, str | None]:
        """Epsilon and an optional note for a non-empty noisy history; by default `_epsilon`, no note.

        Override to fall back to another valid bound (and say which in the note) when the
        accountant's own computation cannot give a finite answer for a noisy history.
        """
        return self._epsilon(events, delta), None

    @abstractmethod
    def _epsilon(self, events: Sequence[PrivacyEvent], delta: float) -> float:
        """Epsilon at ``delta`` for a non-empty history of noisy events (consecutive equal events merged)."""


def _merged(events: Sequence[PrivacyEvent]) -> list[PrivacyEvent]:
    """Merge consecutive events of one kind that differ only in ``steps`` into one (same composition)."""
    out: list[PrivacyEvent] = []
    for event in events:
        last = out[-1] if out else None
        if last is not None and type(last) is type(event) and dataclasses.replace(last, steps=1) == dataclasses.replace(event, steps=1):
            out[-1] = dataclasses.replace(last, steps=last.steps + event.steps)
        else:
            out.append(event)
    return out
