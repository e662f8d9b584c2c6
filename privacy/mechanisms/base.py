"""The interface of a differential-privacy mechanism in the round.

A mechanism acts at three points. On the client it clips the float update (`clip`) before the
secure-aggregation protocol quantises it, and adds its integer noise share (`add_noise_share`, the
distributed mode) after quantisation and before masking; the order is fixed by
`secure_fl.client.mods`. On the server it transforms the aggregate (`server_transform`: central
noise). `privacy_event` says what one release costs as a
`GaussianEvent`; the server composes it into the configured accountants
and writes the result to the privacy ledger before the new global adapter is released.

A mechanism may also keep state across rounds (adaptive clipping's clip norm). Then it sends the
clients what they need in the task plan (`round_plan`, read back into `MechanismContext`), each
client reports a few numbers with its metrics (`client_report`, plain mode only), the server
updates the state once the round is accounted (`end_round`), and the state is saved with every
checkpoint (`state_dict`, `load_state_dict`).

Budgets and sampling (`secure_fl.budget`): a mechanism that can be calibrated to
``[privacy] target_epsilon`` implements `PrivacyMechanism.calibration_event` (what one release costs at
noise multiplier z and sampling rate q, whatever its event type) and
`PrivacyMechanism.set_noise_multiplier`; the engine tells it the run's sampling with
`PrivacyMechanism.set_sampling` before round 1 and passes the run-level ``sample_rate`` to
`privacy_event` (a mechanism whose ``privacy_event`` has no ``sample_rate`` keyword keeps its
own, conservative, rate).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from privacy.accounting import GaussianEvent, PrivacyEvent

#: Task-plan key carrying the round's clip norm to the clients (adaptive clipping).
CLIP_NORM_PLAN_KEY = "privacy.clip_norm"
#: Metric a client reports under adaptive clipping: 1.0 if its update was not clipped, else 0.0.
UNCLIPPED_METRIC = "privacy.unclipped"


@dataclass(frozen=True)
class MechanismContext:
    """What a client-side mechanism knows about the release its update is part of.

    Attributes
    ----------
    round:
        The round number.
    cohort_size:
        Clients selected for the round.
    bucket_size:
        Clients per sum the server learns (1 in plain mode); distributed noise must give every
        bucket sum the full noise.
    worst_case_dropouts:
        Most clients of a bucket that may drop without the round aborting; noise shares are sized
        so the survivors' shares still add up to the accounted noise.
    clip_norm:
        The clip norm the server announced for this round in the task plan (adaptive clipping);
        ``None``: the mechanism's configured one.
    quantisation_step:
        Input units of one integer step of the protocol's quantisation (SecAgg+'s ``gamma = 2c /
        Q``); ``None`` when the protocol does not quantise to integers.
    num_values:
        Number of values in the update the protocol quantises (0: unknown).
    client_id:
        The client (a seeded test generator uses it, so clients draw different noise).
    """

    round: int
    cohort_size: int
    bucket_size: int
    worst_case_dropouts: int = 0
    clip_norm: float | None = None
    quantisation_step: float | None = None
    num_values: int = 0
    client_id: str = ""


class PrivacyMechanism(ABC):
    """Base class of every privacy mechanism; ``name`` is its ``[privacy] mode`` value.

    ``guarantee`` names what holds when the mechanism is used as configured (e.g.
    ``"client-level (epsilon, delta)-DP"``); ``"none"`` makes the audit report warn loudly.
    ``server_noise`` says the server adds the noise to the aggregate (central DP: the server sees
    the noise-free sum), which `secure_fl.stages.Stages.from_config` refuses under a secure mode
    that only reveals sums and with a defense that drops rows. ``uniform_weights`` makes the server
    pipeline give every revealed row weight 1 (so one client's influence on the sum is bounded by
    the clip norm, whatever example count it declares).
    """

    name: ClassVar[str]
    guarantee: ClassVar[str] = "none"
    server_noise: ClassVar[bool] = False
    uniform_weights: ClassVar[bool] = False
    #: Whether clients send `client_report` values with their metrics (needs a mode that reveals them).
    sends_client_reports: bool = False

    def client_transform(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """v0.1 hook: transform a client's float update before it is encoded (default: unchanged).

        New mechanisms implement `clip` and `add_noise_share` instead; `clip` calls this by default
        so a v0.1 mechanism keeps working.
        """
        return dict(update)

    def clip(self, update: Mapping[str, np.ndarray], context: MechanismContext) -> dict[str, np.ndarray]:
        """Client step 2 (after training, before quantisation): bound the float update."""
        return self.client_transform(update)

    def add_noise_share(self, quantised: Mapping[str, np.ndarray], context: MechanismContext) -> dict[str, np.ndarray]:
        """Client step 5 (after quantisation, before masking): add this client's share of the noise.

        Works on the protocol's quantised values (integers under SecAgg+), so distributed
        discrete noise is added where the protocol cannot round it away. Default: unchanged.
        """
        return dict(quantised)

    @abstractmethod
    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: float) -> dict[str, np.ndarray]:
        """Transform the aggregated update on the server before it is applied.

        ``delta`` is a mean with denominator ``num_contributions``: under client-level DP
        (``uniform_weights``) the server pipeline divides the sum by the planned cohort size, a
        public constant, so a mechanism that noises the mean scales its noise by the same number.
        """

    @abstractmethod
    def privacy_event(
        self, *, cohort_size: int, population: int, contributions: int, sample_rate: float = 1.0
    ) -> PrivacyEvent:
        """What releasing this round's aggregate costs (a `GaussianEvent`, or another `PrivacyEvent` kind).

        ``cohort_size`` clients were selected out of ``population`` connected ones and
        ``contributions`` updates arrived. ``sample_rate`` is the run-level rate the engine's
        sampling justifies: q of secret Poisson sampling (``[run] sampling = "poisson"``), else 1
        (fixed-size cohorts claim no amplification). A release without noise returns an event
        with ``noise_multiplier=0``, which every accountant reports as an unbounded epsilon.
        """

    #: Whether `calibration_event` and `set_noise_multiplier` are implemented (``[privacy] target_epsilon``
    #: without an explicit ``noise_multiplier`` needs them).
    calibratable: ClassVar[bool] = False

    def calibration_event(self, *, noise_multiplier: float, sample_rate: float) -> PrivacyEvent:
        """The event one release would cost at noise multiplier ``noise_multiplier`` and rate ``sample_rate``.

        Used by the calibration (`privacy.accounting.calibration`) before round 1; the event type
        is the mechanism's own (any event its accountants compose). Default: not calibratable.
        """
        raise NotImplementedError(f"privacy mode {self.name!r} cannot be calibrated to a target epsilon")

    def set_noise_multiplier(self, noise_multiplier: float) -> None:
        """Replace z by the calibrated value (before round 1, on server and clients alike)."""
        raise NotImplementedError(f"privacy mode {self.name!r} cannot be calibrated to a target epsilon")

    def set_sampling(self, *, sample_rate: float, expected_cohort: float) -> None:
        """Called once before round 1: the run-level sampling rate and the expected cohort size.

        The pipeline already divides the sum of a ``uniform_weights`` mechanism by the fixed
        ``expected_cohort`` (not the secret, data-dependent count), so the release is a
        post-processing of the noisy sum; a mechanism may record the sampling here. Default: ignored.
        """

    def describe(self) -> dict[str, Any]:
        """Mechanism parameters for the ledger and the audit report (JSON-serialisable).

        The keys ``clip_norm`` and ``noise_multiplier`` are shown in the report's mechanism table.
        By default: mode, guarantee and the mechanism's settings (its ``__init__`` keyword
        arguments, read back from the attributes of the same name), so the ledger records the
        configured values, not the defaults.
        """
        settings = {
            name: getattr(self, name)
            for name, parameter in inspect.signature(type(self)).parameters.items()
            if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
            and isinstance(getattr(self, name, None), (bool, int, float, str))
        }
        return {"mode": self.name, "guarantee": self.guarantee, **settings}

    def check_cohort(self, expected_cohort: float) -> None:
        """Fix cohort-dependent settings and refuse a planned cohort the mechanism cannot serve.

        Called once, when the stages are built, with the expected number of clients per round.
        Raises `ValueError` with the reason (turned into a configuration error). Default: nothing.
        """

    def round_plan(self) -> dict[str, float]:
        """Server: what the clients need from the mechanism this round, sent in the task plan (default: nothing)."""
        return {}

    def client_report(self, update: Mapping[str, np.ndarray], context: MechanismContext) -> dict[str, float]:
        """Client: values about the (unclipped) ``update`` the server's mechanism needs, sent with the metrics.

        Default: nothing. A mechanism that reports sets ``sends_client_reports``, so a secure mode
        that hides per-client metrics is refused at start.
        """
        return {}

    def end_round(
        self, reports: Sequence[Mapping[str, float]], *, num_contributions: int, denominator: float | None = None
    ) -> dict[str, Any]:
        """Server, once the round's release is in the ledger: update the state from the contributors' reports.

        ``reports`` are the metrics of the ``num_contributions`` clients whose updates were
        released; ``denominator`` is the fixed mean denominator of client-level DP (the planned
        cohort size), ``None`` outside it. Returns what goes into the round's metrics line (default: nothing).
        """
        return {}

    def ledger_details(self) -> dict[str, Any]:
        """Server: what the round's ledger line records about the mechanism beyond the Gaussian event.

        Called before `end_round`, so it describes the round being released. Default: nothing.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State kept across rounds, saved with every round's checkpoint (default: none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (default: only the empty state is accepted)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given {sorted(state)}")
