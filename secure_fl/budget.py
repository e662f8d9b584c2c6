"""Privacy budgets and cohort sampling: calibration before round 1, the budget checks, secret Poisson sampling.

* **Calibration** (`prepare_privacy`): with ``[privacy] target_epsilon`` and no explicit
  ``privacy.params.noise_multiplier``, the noise multiplier z is bisected
  (`privacy.accounting.calibration`, over the mechanism's
  `calibration_event`) so that ``run.rounds`` releases at the run-level sampling
  rate spend at most the target with the first accountant of ``privacy.accountants``. Server and
  clients run the same calculation from the same config (a distributed mechanism's clients need
  z), so the result is cached per setting. With an explicit ``noise_multiplier`` the target is a
  cap only: z is kept and the run stops when the next release would pass the target.
* **Budget checks** (`BudgetGuard`): before each round, the run-level event of the next release is
  tried on a copy of the budget accountant (`Accountant.would_exceed`); a round that would pass
  ``target_epsilon`` is not run. With ``client_target_epsilon``, a client whose own (per-client,
  ``q = 1``) epsilon would pass it with one more release is not selected.
* **Sampling** (`SamplingPlan`, `poisson_cohort`): ``[run] sampling = "poisson"`` selects every
  connected client independently with probability q from `secrets` (the OS CSPRNG), so the
  run-level view may use amplification by sampling; ``"fixed"`` keeps fixed-size cohorts from
  the seeded generator and the run-level view at ``q = 1``.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from privacy.accounting import Accountant, create_accountant
from privacy.accounting.calibration import calibrate_noise_multiplier, planned_epsilon
from privacy.errors import PrivacyError
from privacy.mechanisms import PrivacyMechanism
from secure_fl.config import Config
from secure_fl.errors import ConfigError

__all__ = ["BudgetGuard", "Calibration", "SamplingPlan", "poisson_cohort", "prepare_privacy", "skip_probability"]


@dataclass(frozen=True)
class SamplingPlan:
    """How cohorts are drawn, and the sampling rate the run-level accounting may use.

    ``sample_rate`` is q for Poisson sampling and 1 for fixed-size cohorts (no amplification);
    ``expected_cohort`` is ``q * num_clients`` (Poisson) or ``clients_per_round`` (fixed).
    """

    mode: str
    sample_rate: float
    expected_cohort: float
    population: int

    @classmethod
    def from_config(cls, config: Config) -> SamplingPlan:
        """The plan ``[run] sampling`` / ``sample_rate`` / ``clients_per_round`` describe."""
        run = config.run
        if run.sampling == "poisson":
            q = run.sample_rate or run.clients_per_round / run.num_clients
            return cls("poisson", float(q), float(q * run.num_clients), run.num_clients)
        return cls("fixed", 1.0, float(min(run.clients_per_round, run.num_clients)), run.num_clients)

    @property
    def amplified(self) -> bool:
        """Whether the run-level view claims amplification by sampling (secret Poisson, q < 1)."""
        return self.mode == "poisson" and self.sample_rate < 1

    def describe(self) -> dict[str, Any]:
        """For ``run.json`` and the report."""
        return {
            "mode": self.mode,
            "sample_rate": self.sample_rate,
            "expected_cohort": self.expected_cohort,
            "population": self.population,
            "amplified": self.amplified,
            "randomness": "secrets (OS CSPRNG)" if self.mode == "poisson" else "seeded generator (run.seed)",
        }


def poisson_cohort(clients: Sequence[str], sample_rate: float) -> list[str]:
    """Each of ``clients`` independently with probability ``sample_rate``, from the OS CSPRNG (sorted).

    One 53-bit uniform per client from `secrets.token_bytes`; a client is selected when its
    uniform is below q. Vectorised: no Python loop over clients.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if not clients:
        return []
    bits = np.frombuffer(secrets.token_bytes(8 * len(clients)), dtype=np.uint64) >> np.uint64(11)
    uniform = bits.astype(np.float64) * 2.0**-53
    chosen = np.flatnonzero(uniform < sample_rate)
    return sorted(str(clients[int(i)]) for i in chosen)


def skip_probability(population: int, sample_rate: float, runnable: Callable[[int], bool]) -> float:
    """Largest chance, over populations ``N - 1``, ``N``, ``N + 1``, that a Poisson cohort has a size ``runnable`` refuses.

    A skipped round releases nothing, but whether it is skipped depends on the secret cohort
    size. Coupling the run with one that never skips gives (epsilon, delta + T p (1 + e^epsilon))
    over T rounds (see docs/privacy.md), where p is this probability.
    """
    sizes = np.arange(population + 2)
    refused = np.array([not runnable(int(s)) for s in sizes])
    if not refused.any():
        return 0.0
    if sample_rate >= 1:
        return float(max(refused[n] for n in (population - 1, population, population + 1) if n >= 0))
    worst = 0.0
    for n in (population - 1, population, population + 1):
        if n < 0:
            continue
        s = sizes[: n + 1]
        log_pmf = (
            np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in s])
            + s * math.log(sample_rate) + (n - s) * math.log1p(-sample_rate)
        )
        worst = max(worst, float(np.exp(log_pmf[refused[: n + 1]]).sum()))
    return min(worst, 1.0)


@dataclass(frozen=True)
class Calibration:
    """The noise multiplier calibrated for a target (or kept from the config when the target is a cap)."""

    target_epsilon: float
    delta: float
    accountant: str
    rounds: int
    sample_rate: float
    noise_multiplier: float
    planned_epsilon: float | None
    calibrated: bool

    def describe(self) -> dict[str, Any]:
        """For ``run.json``, the ledger's mechanism description and the report."""
        return {
            **dataclasses.asdict(self),
            "noise_multiplier_source": (
                f"calibrated before round 1 for {self.rounds} round(s) at q = {self.sample_rate:g} to "
                f"epsilon <= {self.target_epsilon:g} ({self.accountant}, delta = {self.delta:g})"
                if self.calibrated else
                "privacy.params.noise_multiplier (set in the config; privacy.target_epsilon is a cap, not calibrated)"
            ),
        }


_CACHE: dict[tuple[Any, ...], tuple[float, float | None]] = {}


def prepare_privacy(config: Config, mechanism: PrivacyMechanism) -> Calibration | None:
    """Tell ``mechanism`` the run's sampling and, with a target epsilon, calibrate its z (server and clients).

    Returns the calibration (``None`` without ``privacy.target_epsilon``). Raises `ConfigError`
    naming ``privacy.target_epsilon`` when the mechanism cannot be calibrated or the target is
    out of reach.
    """
    plan = SamplingPlan.from_config(config)
    privacy = config.privacy
    if plan.mode == "poisson" and getattr(mechanism, "adaptive_clip", False):
        raise ConfigError(
            "run.sampling = 'poisson' with privacy.params.adaptive_clip = true: adaptive clipping divides its noised "
            "unclipped count by the actual (secret) cohort size, which Poisson accounting does not cover; "
            "use run.sampling = 'fixed' or a fixed clip norm", key="run.sampling",
        )
    if plan.mode == "poisson" and getattr(mechanism, "client_noise", False):
        raise ConfigError(
            f"run.sampling = 'poisson' with privacy.mode = {privacy.mode!r}: the clients' noise shares and the "
            "release's accounted event follow the actual buckets, whose sizes depend on the secret cohort; an "
            "event conservative over every cohort size is not built yet, so use run.sampling = 'fixed'",
            key="run.sampling",
        )
    mechanism.set_sampling(sample_rate=plan.sample_rate, expected_cohort=plan.expected_cohort)
    if not privacy.target_epsilon:
        return None
    accountant = privacy.accountants[0]
    explicit = "noise_multiplier" in privacy.params
    calibratable = bool(getattr(mechanism, "calibratable", False))
    if not explicit and not calibratable:
        raise ConfigError(
            f"privacy.target_epsilon: privacy.mode={privacy.mode!r} cannot calibrate its noise multiplier to a target "
            "yet (its mechanism has no calibration_event / set_noise_multiplier); set privacy.params.noise_multiplier "
            "and the target becomes a cap (the run stops before the round that would pass it)",
            key="privacy.target_epsilon",
        )
    key = (privacy.mode, privacy.params, privacy.target_epsilon, privacy.delta, accountant, config.run.rounds, plan.sample_rate)

    def event_for(z: float) -> Any:
        return mechanism.calibration_event(noise_multiplier=z, sample_rate=plan.sample_rate)

    def factory() -> Accountant:
        return create_accountant(accountant)

    if key not in _CACHE:
        try:
            if explicit:
                z = float(getattr(mechanism, "noise_multiplier"))
            else:
                z = calibrate_noise_multiplier(event_for, accountant_factory=factory, target_epsilon=privacy.target_epsilon,
                                               delta=privacy.delta, steps=config.run.rounds)
                # Rounded up to 1e-6: more noise, never less, and the same value on machines whose
                # floating-point libraries differ in the last bits (the stage fingerprint holds z).
                z = math.ceil(z * 1e6) / 1e6
            spent = (planned_epsilon(event_for, z, accountant_factory=factory, delta=privacy.delta, steps=config.run.rounds)
                     if calibratable else None)  # not known before round 1 (checked before each round)
        except PrivacyError as exc:
            raise ConfigError(f"privacy.target_epsilon: {exc}", key="privacy.target_epsilon") from None
        _CACHE[key] = (z, spent)
    z, spent = _CACHE[key]
    if not explicit:
        try:
            mechanism.set_noise_multiplier(z)
        except ValueError as exc:  # e.g. adaptive clipping: z must stay below 2 clip_count_stddev
            raise ConfigError(f"privacy.target_epsilon: the calibrated noise_multiplier {z:g} is refused: {exc}",
                              key="privacy.target_epsilon") from None
    return Calibration(float(privacy.target_epsilon), float(privacy.delta), accountant, config.run.rounds,
                       plan.sample_rate, z, spent, calibrated=not explicit)


def confirm_calibration(calibration: Calibration | None, mechanism: PrivacyMechanism) -> Calibration | None:
    """Re-check a calibrated z with the mechanism's exact event, once the server bound it (distributed DP).

    Before the update size is known, distributed DP is calibrated on the Gaussian curve its discrete
    event equals up to the tau terms (`privacy.mechanisms.distributed.DistributedDP.calibration_event`).
    Once bound, the planned rounds are composed with the exact event: a target they would pass is
    refused (`ConfigError` naming ``privacy.target_epsilon``) instead of stopping the run early.
    Returns the calibration with the exact planned epsilon.
    """
    if calibration is None or not calibration.calibrated:
        return calibration

    def exact(z: float) -> Any:
        return mechanism.calibration_event(noise_multiplier=z, sample_rate=calibration.sample_rate)

    try:
        spent = planned_epsilon(exact, calibration.noise_multiplier, accountant_factory=lambda: create_accountant(
            calibration.accountant), delta=calibration.delta, steps=calibration.rounds)
    except PrivacyError as exc:
        raise ConfigError(f"privacy.target_epsilon: {exc}", key="privacy.target_epsilon") from None
    if spent > calibration.target_epsilon:
        raise ConfigError(
            f"privacy.target_epsilon = {calibration.target_epsilon:g}: the calibrated noise_multiplier "
            f"{calibration.noise_multiplier:g} spends {spent:.6g} over {calibration.rounds} round(s) with the exact "
            f"{mechanism.name} event (the discrete noise is too small for the Gaussian calibration to hold); "
            "set privacy.params.noise_multiplier explicitly, or lower secure.params.precision",
            key="privacy.target_epsilon",
        )
    return dataclasses.replace(calibration, planned_epsilon=spent)


def unamplified(event: Any) -> Any:
    """The per-client (participation known) view of a run-level event: the same release at ``q = 1``."""
    if (dataclasses.is_dataclass(event) and not isinstance(event, type)
            and any(f.name == "sample_rate" for f in dataclasses.fields(event))):
        return dataclasses.replace(event, sample_rate=1.0)
    return event


class BudgetGuard:
    """The run's budget checks: the run-level target and the per-client target.

    Parameters
    ----------
    accountant:
        Name of the budget accountant (the first of ``privacy.accountants``).
    delta:
        The run's delta.
    target_epsilon, client_target_epsilon:
        0 means no budget of that kind.
    """

    def __init__(self, accountant: str, *, delta: float, target_epsilon: float, client_target_epsilon: float) -> None:
        self.accountant = accountant
        self.delta = float(delta)
        self.target_epsilon = float(target_epsilon)
        self.client_target_epsilon = float(client_target_epsilon)
        #: Per client: how many times each (unamplified) event was released with its update.
        self.client_events: dict[str, Counter[Any]] = {}
        self._cache: dict[tuple[Any, ...], tuple[bool, float]] = {}

    def record_release(self, event: Any, contributors: Sequence[str]) -> None:
        """Count ``event`` (at ``q = 1``) for every contributor of a release."""
        per_client = unamplified(event)
        for client in contributors:
            self.client_events.setdefault(str(client), Counter())[per_client] += 1

    def replay(self, ledger: Sequence[Mapping[str, Any]]) -> None:
        """Rebuild the per-client counts from ledger lines (a reopened run directory)."""
        from privacy.ledger import event_of

        for entry in ledger:
            self.record_release(event_of(entry), [str(c) for c in entry.get("contributors", [])])

    def run_stop(self, accountant: Accountant, event: Any, round_number: int) -> str | None:
        """Why round ``round_number`` must not run (its release ``event`` would pass the target), else ``None``."""
        if not self.target_epsilon:
            return None
        if not accountant.would_exceed(event, epsilon_budget=self.target_epsilon, delta=self.delta):
            return None
        after = accountant.composed_with(event).epsilon(self.delta)
        spent = accountant.epsilon(self.delta)
        return (
            f"stopped at round {round_number}: the next release would spend epsilon {after:.4g} > "
            f"privacy.target_epsilon = {self.target_epsilon:g} ({self.accountant}, delta = {self.delta:g}); "
            f"spent {spent:.4g}, remaining {self.target_epsilon - spent:.4g}; round {round_number} was not run"
        )

    def client_spent(self, client: str, extra: Any | None = None) -> float:
        """Client ``client``'s own epsilon (per-client view), with one more release of ``extra`` if given."""
        return self._client_check(client, extra)[1]

    def eligible(self, clients: Sequence[str], event: Any) -> list[str]:
        """The clients of ``clients`` whose own epsilon stays within the per-client target after ``event``."""
        if not self.client_target_epsilon:
            return list(clients)
        return [c for c in clients if not self._client_check(str(c), event)[0]]

    def _client_check(self, client: str, extra: Any | None) -> tuple[bool, float]:
        counts = Counter(self.client_events.get(client, Counter()))
        if extra is not None:
            counts[unamplified(extra)] += 1
        key = tuple(sorted(counts.items(), key=repr))
        if key not in self._cache:
            trial = create_accountant(self.accountant)
            for event, count in key:
                trial.compose(event, count)
            spent = trial.epsilon(self.delta) if key else 0.0
            self._cache[key] = (bool(self.client_target_epsilon) and spent > self.client_target_epsilon, spent)
        return self._cache[key]
