"""``central``: client-level DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018) with server noise.

Every client clips its update (the delta it uploads) to L2 norm ``clip_norm`` = C on the client;
the server adds Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` = z * C to
the **sum** of the clipped updates, then divides by the number of contributions. One release
costs one Gaussian mechanism of noise multiplier z (sensitivity C under add/remove of a client).

Where the noise goes: the server pipeline averages the rows the secure-aggregation stage revealed
(one clipped update per client in ``plain`` mode) with the PEFT rule, then calls
`CentralDP.server_transform` on that mean with ``num_contributions`` = n. The mean of n clipped
updates is ``sum / n``, so adding noise of std ``z * C / n`` to each coordinate of the mean is
exactly noise of std ``z * C`` on the sum. Two conditions make this exact, and the stages check
both at start (`secure_fl.stages.Stages.from_config`):

* **Uniform weights** (``uniform_weights = True``): the pipeline gives every row weight 1. With
  example-count weights, one client's influence on the mean is ``w_k C / sum w``, unbounded for a
  client that declares many examples, and the weights themselves are private data; DP-FedAvg's
  fixed-denominator estimator would need every client's weight in advance. Equal weights keep the
  sensitivity of the sum at C and the mean's denominator at n.
* **Every revealed row reaches the mean**: a defense that drops or re-weights rows makes the
  sum's sensitivity depend on the other clients, so only ``robustness.defense = "none"`` is
  accepted; a secure mode that only reveals (weighted) bucket sums is refused, since the server
  adds the noise and would see the noise-free sum anyway (SecAgg+ needs a distributed mechanism,
  where clients add the noise).

The PEFT rule must average the rows (``fedit`` does); a rule with state across rounds or another
combination is not covered by the accounting.

What it guarantees: client-level (epsilon, delta)-DP for anyone who sees the released adapters
(other clients, whoever gets the final adapter). It does **not** protect against the server, which
sees every clipped update and the noise-free sum before it adds the noise.

Accounting: with fixed-size cohorts (``[run] sampling = "fixed"``, drawn from a seeded generator,
neither Poisson nor secret) no amplification by sampling is claimed: every release is a
``GaussianEvent(noise_multiplier=z, sample_rate=1.0, steps=1)``. With secret Poisson sampling
(``[run] sampling = "poisson"``, each client selected independently with probability q from the
OS CSPRNG) the engine passes ``sample_rate=q`` and the release is the sampled Gaussian mechanism
``GaussianEvent(z, q, 1)``, provided the released mean does not depend on the secret cohort size:
the pipeline divides by the expected cohort size ``m = q N`` (DP-FedAvg's fixed-denominator
estimator; `secure_fl.server.pipeline`), so the server releases ``(sum + N(0, (z C)^2)) / m``, a
post-processing of the noisy sum. ``target_epsilon`` calibrates z (`event_for`, `set_noise_multiplier`).

Adaptive clipping (``adaptive_clip = true``; Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021,
math in `privacy.mechanisms.adaptive`): ``clip_norm`` is only the first round's C. The server
sends each round's C in the task plan (`round_plan`); every client clips to it and reports the
bit ``1[update not clipped]`` with its metrics (`client_report`); once the round is in the ledger
the server noises the count with sigma_b (``clip_count_stddev``, default expected cohort / 20)
and moves C towards the ``target_unclipped_quantile`` of the norms (`end_round`). The update sum
is noised with ``z_delta * C`` instead of ``z * C``, so update plus count cost one Gaussian
mechanism of multiplier z and the ledger event is unchanged. C is state: `state_dict` saves it
with each checkpoint. The bit travels in the clear with the metrics, which only a secure mode that
reveals individual updates allows (central DP already trusts the server with every update).

Randomness: the noise comes from the operating system's CSPRNG (``os.urandom``, Box-Muller on
53-bit uniforms). ``insecure_seed`` replaces it with a seeded NumPy generator for reproducible
tests only; it warns, and the report shows it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeGuard

import numpy as np

from privacy.accounting import GaussianEvent
from privacy.mechanisms.adaptive import (
    DEFAULT_CLIP_LEARNING_RATE, DEFAULT_TARGET_QUANTILE, default_count_stddev, next_clip_norm,
    noised_unclipped_fraction, update_noise_multiplier,
)
from privacy.mechanisms.base import CLIP_NORM_PLAN_KEY, UNCLIPPED_METRIC, MechanismContext, PrivacyMechanism

#: Clipped updates are scaled by ``C / norm`` times this, so float32 rounding never lifts a norm above C.
CLIP_MARGIN = 1.0 - 1e-6
PAPER = "https://arxiv.org/abs/1710.06963"
ADAPTIVE_PAPER = "https://arxiv.org/abs/1905.03871"


def tensor_clip_norms(clip_norm: float, num_tensors: int, *, per_tensor: bool) -> np.ndarray:
    """The L2 bound of each tensor: ``C`` for the whole update, or ``C / sqrt(k)`` for each of k tensors.

    With per-tensor bounds ``C_i = C / sqrt(k)`` the whole update's norm is at most
    ``sqrt(sum_i C_i^2) = C``, so the accounted sensitivity stays C.

    >>> tensor_clip_norms(2.0, 4, per_tensor=True).tolist()
    [1.0, 1.0, 1.0, 1.0]
    """
    if per_tensor:
        return np.full(num_tensors, clip_norm / math.sqrt(num_tensors))
    return np.full(1, clip_norm)


def clip_update(update: Mapping[str, np.ndarray], *, clip_norm: float, per_tensor: bool) -> dict[str, np.ndarray]:
    """Scale ``update`` so its L2 norm is at most ``clip_norm`` (flat) or each tensor's at most ``C / sqrt(k)``.

    An update already within its bound is returned unchanged (as float32); a clipped one is scaled
    by ``bound / norm * CLIP_MARGIN``. Vectorised: one flat float64 vector, segment norms with
    ``np.add.reduceat``. A non-finite update is refused (its norm cannot be bounded).

    >>> out = clip_update({"a": np.array([3.0, 4.0])}, clip_norm=1.0, per_tensor=False)
    >>> round(float(np.linalg.norm(out["a"])), 5)
    1.0
    """
    names = list(update)
    if not names:
        return {}
    arrays = [np.asarray(update[name]) for name in names]
    sizes = np.array([a.size for a in arrays])
    flat, norms = _flat_and_norms(arrays, per_tensor=per_tensor)
    bounds = tensor_clip_norms(clip_norm, len(names), per_tensor=per_tensor)
    over = norms > bounds
    scales = np.ones_like(norms)
    scales[over] = bounds[over] / norms[over] * CLIP_MARGIN
    factors = np.repeat(scales, sizes) if per_tensor else scales[0]
    clipped = (flat * factors).astype(np.float32)
    pieces = np.split(clipped, np.cumsum(sizes)[:-1])
    return {name: piece.reshape(a.shape) for name, piece, a in zip(names, pieces, arrays)}


def is_unclipped(update: Mapping[str, np.ndarray], *, clip_norm: float, per_tensor: bool) -> bool:
    """Whether `clip_update` would leave ``update`` unchanged: its norm (flat) or every tensor's
    norm (per tensor) is within its bound. The bit a client reports under adaptive clipping.

    >>> is_unclipped({"a": np.array([3.0, 4.0])}, clip_norm=5.0, per_tensor=False)
    True
    """
    arrays = [np.asarray(value) for value in update.values()]
    if not arrays:
        return True
    _, norms = _flat_and_norms(arrays, per_tensor=per_tensor)
    return bool((norms <= tensor_clip_norms(clip_norm, len(arrays), per_tensor=per_tensor)).all())


def _flat_and_norms(arrays: Sequence[np.ndarray], *, per_tensor: bool) -> tuple[np.ndarray, np.ndarray]:
    """The arrays as one float64 vector and their L2 norm (one, or one per tensor); non-finite refused."""
    sizes = np.array([a.size for a in arrays])
    flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64)
    if not np.isfinite(flat).all():
        raise ValueError("the update is not finite, so it cannot be clipped")
    squares = flat * flat
    if per_tensor:
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        nonempty = sizes > 0
        segment = np.zeros(len(arrays))
        segment[nonempty] = np.add.reduceat(squares, starts[nonempty])
        return flat, np.sqrt(segment)
    return flat, np.array([math.sqrt(float(squares.sum()))])


def check_client_level_settings(clip_norm: object, noise_multiplier: object, clip: object, insecure_seed: object) -> None:
    """Refuse (ValueError naming the setting) what no client-level mechanism (central, distributed) accepts."""
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not (0 < clip_norm < math.inf):
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) or not (
        0 <= noise_multiplier < math.inf
    ):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
    if clip not in ("flat", "per-tensor"):
        raise ValueError(f"clip must be 'flat' or 'per-tensor', got {clip!r}")
    if insecure_seed is not None and (isinstance(insecure_seed, bool) or not isinstance(insecure_seed, int)):
        raise ValueError(f"insecure_seed must be an integer or unset, got {insecure_seed!r}")


def secure_standard_normal(size: int) -> np.ndarray:
    """``size`` independent N(0, 1) draws from the OS CSPRNG (Box-Muller on 53-bit uniforms in (0, 1))."""
    pairs = (size + 1) // 2
    bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64) >> np.uint64(11)
    uniform = (bits.astype(np.float64) + 0.5) * 2.0**-53
    radius = np.sqrt(-2.0 * np.log(uniform[:pairs]))
    angle = 2.0 * math.pi * uniform[pairs:]
    return np.concatenate((radius * np.cos(angle), radius * np.sin(angle)))[:size]


class CentralDP(PrivacyMechanism):
    """Client-level DP-FedAvg: clip on the client, Gaussian noise z * C on the sum at the server.

    Parameters
    ----------
    clip_norm:
        C, the L2 bound on each client's update (> 0); the sensitivity of the sum. With
        ``adaptive_clip`` it is the first round's C, C0.
    noise_multiplier:
        z (>= 0): the server adds N(0, (z * C)^2) to each coordinate of the sum; 0 means no guarantee.
    clip:
        "flat" (one norm over the whole update) or "per-tensor" (each of k tensors to C / sqrt(k)).
    insecure_seed:
        Testing only: draw the noise from a NumPy generator with this seed instead of the OS CSPRNG (warns).
    adaptive_clip:
        Track a quantile of the update norms instead of a fixed C (Andrew et al. 2021).
    target_unclipped_quantile:
        gamma in (0, 1): the fraction of clients whose update C should leave unclipped (0.5: the median norm).
    clip_learning_rate:
        eta_C > 0: the geometric step, C <- C * exp(-eta_C * (b~ - gamma)).
    clip_count_stddev:
        sigma_b > 0: the noise on the count of unclipped clients; unset, the expected clients per
        round / 20. Must exceed z / 2; the update noise becomes z_delta * C with
        z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), so a round still costs one Gaussian mechanism of z.
    """

    name = "central"
    guarantee = (
        "client-level (epsilon, delta)-DP against anyone who sees the released adapter; "
        "not against the server, which sees every clipped update and the noise-free sum"
    )
    paper = PAPER
    server_noise: ClassVar[bool] = True
    uniform_weights: ClassVar[bool] = True

    def __init__(
        self,
        *,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        clip: str = "flat",
        insecure_seed: int | None = None,
        adaptive_clip: bool = False,
        target_unclipped_quantile: float = DEFAULT_TARGET_QUANTILE,
        clip_learning_rate: float = DEFAULT_CLIP_LEARNING_RATE,
        clip_count_stddev: float | None = None,
    ) -> None:
        check_client_level_settings(clip_norm, noise_multiplier, clip, insecure_seed)
        if not isinstance(adaptive_clip, bool):
            raise ValueError(f"adaptive_clip must be true or false, got {adaptive_clip!r}")
        if not _number(target_unclipped_quantile) or not 0 < target_unclipped_quantile < 1:
            raise ValueError(f"target_unclipped_quantile must be a number in (0, 1), got {target_unclipped_quantile!r}")
        if not _number(clip_learning_rate) or not 0 < clip_learning_rate < math.inf:
            raise ValueError(f"clip_learning_rate must be a finite number > 0, got {clip_learning_rate!r}")
        if clip_count_stddev is not None:
            if not _number(clip_count_stddev) or not 0 < clip_count_stddev < math.inf:
                raise ValueError(f"clip_count_stddev must be a finite number > 0 or unset, got {clip_count_stddev!r}")
            if not adaptive_clip:
                raise ValueError("clip_count_stddev is set but adaptive_clip is false; set adaptive_clip = true or remove it")
            update_noise_multiplier(float(noise_multiplier), float(clip_count_stddev))  # refuses z >= 2 sigma_b
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.clip_mode = clip  # not ``self.clip``: that is the client step of the base class
        self.insecure_seed = insecure_seed
        self.adaptive_clip = adaptive_clip
        self.target_unclipped_quantile = float(target_unclipped_quantile)
        self.clip_learning_rate = float(clip_learning_rate)
        self.clip_count_stddev = None if clip_count_stddev is None else float(clip_count_stddev)
        #: C0, the configured ``clip_norm``; ``clip_norm`` is the current round's C.
        self.initial_clip_norm = self.clip_norm
        #: Rounds whose count has moved C (saved with the checkpoints, with C).
        self.clip_updates = 0
        self.sends_client_reports = adaptive_clip
        self._rng: np.random.Generator | None = None
        self.sample_rate = 1.0
        #: The expected Poisson cohort (``None``: fixed-size cohorts), shown by `describe`.
        self.expected_cohort: float | None = None
        if insecure_seed is not None:
            warnings.warn(
                "privacy.params.insecure_seed is set: the DP noise is reproducible by anyone who knows the seed, "
                "so the run has no privacy guarantee; use it for tests in simulation only",
                stacklevel=2,
            )
            self._rng = np.random.default_rng(insecure_seed)

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier on the update sum: z, or z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) when adaptive."""
        if not self.adaptive_clip:
            return self.noise_multiplier
        return update_noise_multiplier(self.noise_multiplier, self._count_stddev())

    @property
    def noise_std(self) -> float:
        """The standard deviation of the noise on each coordinate of the sum: ``z * C`` (``z_delta * C`` when adaptive)."""
        return self.update_noise_multiplier * self.clip_norm

    def _count_stddev(self) -> float:
        if self.clip_count_stddev is None:
            raise ValueError(
                "adaptive clipping: clip_count_stddev is unset and no cohort was given to derive it from; "
                "call check_cohort(expected clients per round) first (the stages do when they are built)"
            )
        return self.clip_count_stddev

    def check_cohort(self, expected_cohort: float) -> None:
        """Adaptive clipping: default sigma_b to ``expected_cohort / 20`` and refuse ``z >= 2 sigma_b``."""
        if not self.adaptive_clip:
            return
        if self.clip_count_stddev is None:
            self.clip_count_stddev = default_count_stddev(expected_cohort)
        try:
            update_noise_multiplier(self.noise_multiplier, self.clip_count_stddev)
        except ValueError as exc:
            raise ValueError(f"{exc} (expected clients per round: {expected_cohort:g})") from None

    def client_transform(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Clip ``update`` to the configured bound (the v0.1 hook; `clip` calls the same function)."""
        return clip_update(update, clip_norm=self.clip_norm, per_tensor=self.clip_mode == "per-tensor")

    def round_clip_norm(self, context: MechanismContext) -> float:
        """The C a client clips to: the configured one, or with adaptive clipping the one the server announced."""
        if not self.adaptive_clip:
            return self.clip_norm
        announced = context.clip_norm
        if announced is None or isinstance(announced, bool) or not (0 < announced < math.inf):
            raise ValueError(
                f"round {context.round}: adaptive clipping needs the round's clip norm from the server's task plan "
                f"(a finite number > 0), got {announced!r}; server and client must both set adaptive_clip"
            )
        return float(announced)

    def clip(self, update: Mapping[str, np.ndarray], context: MechanismContext) -> dict[str, np.ndarray]:
        """Client step 2: clip the float update to L2 norm <= C (flat) or C / sqrt(k) per tensor."""
        return clip_update(update, clip_norm=self.round_clip_norm(context), per_tensor=self.clip_mode == "per-tensor")

    def client_report(self, update: Mapping[str, np.ndarray], context: MechanismContext) -> dict[str, float]:
        """Adaptive clipping: the bit ``1.0`` if the unclipped ``update`` is within the round's C, else ``0.0``."""
        if not self.adaptive_clip:
            return {}
        inside = is_unclipped(update, clip_norm=self.round_clip_norm(context), per_tensor=self.clip_mode == "per-tensor")
        return {UNCLIPPED_METRIC: 1.0 if inside else 0.0}

    def round_plan(self) -> dict[str, float]:
        """Adaptive clipping: this round's C for the clients' task plan."""
        return {CLIP_NORM_PLAN_KEY: self.clip_norm} if self.adaptive_clip else {}

    def standard_normal(self, size: int) -> np.ndarray:
        """``size`` N(0, 1) draws: the OS CSPRNG, or the seeded generator when ``insecure_seed`` is set."""
        if self._rng is not None:
            return self._rng.standard_normal(size)
        return secure_standard_normal(size)

    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: float) -> dict[str, np.ndarray]:
        """Add N(0, (z C / n)^2) to each coordinate of the mean of n clipped updates (= N(0, (z C)^2) on the sum).

        With adaptive clipping the multiplier is z_delta (`update_noise_multiplier`) and C the round's.
        ``num_contributions`` is the mean's denominator: the pipeline's fixed, public m (the planned
        cohort, or q N under Poisson sampling), so the release is ``(sum + noise) / m``.
        """
        if (isinstance(num_contributions, bool) or not isinstance(num_contributions, (int, float))
                or not math.isfinite(num_contributions) or num_contributions <= 0):
            raise ValueError(f"central DP needs a positive denominator, got num_contributions={num_contributions!r}")
        names = list(delta)
        std = self.noise_std
        if not names or std == 0:
            return {name: np.asarray(value, dtype=np.float32) for name, value in delta.items()}
        arrays = [np.asarray(delta[name]) for name in names]
        sizes = np.array([a.size for a in arrays])
        flat = np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float64)
        noised = (flat + self.standard_normal(flat.size) * (std / num_contributions)).astype(np.float32)
        pieces = np.split(noised, np.cumsum(sizes)[:-1])
        return {name: piece.reshape(a.shape) for name, piece, a in zip(names, pieces, arrays)}

    def end_round(
        self, reports: Sequence[Mapping[str, float]], *, num_contributions: int, denominator: float | None = None
    ) -> dict[str, Any]:
        """Adaptive clipping, once the round is accounted: noise the unclipped count, move C for the next round.

        ``denominator`` is the fixed, planned cohort size the fraction is taken over (as the
        released mean's), so the next C does not reveal how many clients contributed.

        A contributor's bit is clamped to [0, 1]; one that sent none counts 1/2 (it adds nothing to
        the centred count, so the sensitivity stays 1/2). Returns the round's C, the noised
        unclipped fraction b~ and the next C, for the metrics line.
        """
        if not self.adaptive_clip:
            return {}
        if len(reports) > num_contributions:
            raise ValueError(f"{len(reports)} reports for {num_contributions} contributions")
        bits = np.full(num_contributions, 0.5)
        given = [float(r[UNCLIPPED_METRIC]) for r in reports if UNCLIPPED_METRIC in r]
        bits[: len(given)] = given
        noise = float(self.standard_normal(1)[0]) * self._count_stddev()
        fraction = noised_unclipped_fraction(bits, noise, contributions=num_contributions, denominator=denominator)
        used = self.clip_norm
        self.clip_norm = next_clip_norm(
            used, fraction, target_quantile=self.target_unclipped_quantile, learning_rate=self.clip_learning_rate
        )
        self.clip_updates += 1
        return {
            "clip_norm": used,
            "unclipped_fraction": fraction,
            "next_clip_norm": self.clip_norm,
            "clip_reports_missing": num_contributions - len(given),
        }

    def ledger_details(self) -> dict[str, Any]:
        """Adaptive clipping: the round's C and the noise that paid for update and count (nothing otherwise)."""
        if not self.adaptive_clip:
            return {}
        return {"adaptive_clip": {
            "clip_norm": self.clip_norm,
            "update_noise_multiplier": self.update_noise_multiplier,
            "clip_count_stddev": self._count_stddev(),
            "target_unclipped_quantile": self.target_unclipped_quantile,
            "clip_learning_rate": self.clip_learning_rate,
        }}

    def state_dict(self) -> dict[str, Any]:
        """Adaptive clipping: the current C and how many rounds moved it (nothing otherwise)."""
        if not self.adaptive_clip:
            return {}
        return {"clip_norm": self.clip_norm, "clip_updates": self.clip_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put back the saved C (adaptive clipping); an empty state keeps C0."""
        if not state:
            return
        if not self.adaptive_clip:
            raise ValueError(f"the saved privacy state {sorted(state)} is adaptive clipping's, but adaptive_clip is false")
        clip_norm, updates = state.get("clip_norm"), state.get("clip_updates", 0)
        if not _number(clip_norm) or not 0 < clip_norm < math.inf:
            raise ValueError(f"the saved clip_norm must be a finite number > 0, got {clip_norm!r}")
        if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
            raise ValueError(f"the saved clip_updates must be an integer >= 0, got {updates!r}")
        self.clip_norm, self.clip_updates = float(clip_norm), updates

    def privacy_event(
        self, *, cohort_size: int, population: int, contributions: int, sample_rate: float = 1.0
    ) -> GaussianEvent:
        """One Gaussian release of noise multiplier z at the engine's run-level ``sample_rate``.

        ``sample_rate`` is 1 for fixed-size cohorts (drawn from a seeded generator, neither Poisson
        nor secret, so claiming ``q = cohort_size / population`` would overstate the guarantee)
        and q for secret Poisson sampling. With adaptive clipping the update (z_delta) and the
        count (2 sigma_b) together cost exactly z.
        """
        return self.calibration_event(noise_multiplier=self.noise_multiplier, sample_rate=sample_rate)

    calibratable: ClassVar[bool] = True

    def calibration_event(self, *, noise_multiplier: float, sample_rate: float) -> GaussianEvent:
        """``GaussianEvent(z, q, 1)``: one release of the (sampled) Gaussian mechanism."""
        return GaussianEvent(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate), steps=1)

    def set_noise_multiplier(self, noise_multiplier: float) -> None:
        """Use the calibrated z from now on (the server adds N(0, (z C)^2) to the sum; with adaptive
        clipping z is the total, split into z_delta and the count's noise as configured)."""
        if not (0 <= noise_multiplier < math.inf):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        if self.adaptive_clip and self.clip_count_stddev is not None:
            update_noise_multiplier(float(noise_multiplier), self.clip_count_stddev)  # refuses z >= 2 sigma_b
        self.noise_multiplier = float(noise_multiplier)

    def set_sampling(self, *, sample_rate: float, expected_cohort: float) -> None:
        """Record the run's sampling for `describe` (the pipeline divides by the fixed ``expected_cohort``)."""
        if not (0 < sample_rate <= 1) or not expected_cohort > 0:
            raise ValueError(
                f"sampling needs 0 < sample_rate <= 1 and expected_cohort > 0, got {sample_rate!r}, {expected_cohort!r}"
            )
        self.sample_rate = float(sample_rate)
        self.expected_cohort = float(expected_cohort) if sample_rate < 1 else None

    def describe(self) -> dict[str, Any]:
        """Settings plus the facts the report needs: who adds the noise and what the server sees.

        ``clip_norm`` is the current round's C (called before `end_round`, it is the C the round's
        clients clipped to); with adaptive clipping the rule's settings and z_delta follow.
        """
        out: dict[str, Any] = {
            "mode": self.name,
            "guarantee": self.guarantee if self.noise_multiplier > 0 else "none",
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip_mode,
            "noise_std_on_sum": self.noise_std if not self.adaptive_clip or self.clip_count_stddev else None,
            "noise_added_by": "server",
            "server_sees": "every clipped update and the noise-free sum (central DP: the server is trusted)",
            "weights": "uniform (each client's clipped update counts once)",
            "sampling_amplification": (
                "none claimed (fixed-size cohorts from a seeded generator): sample_rate = 1" if self.expected_cohort is None
                else f"secret Poisson sampling, q = {self.sample_rate:g}; the noisy sum is divided by the expected "
                     f"cohort size {self.expected_cohort:g}, not the actual count"
            ),
            "randomness": "os.urandom (CSPRNG)" if self.insecure_seed is None
            else f"INSECURE: seeded NumPy generator (insecure_seed={self.insecure_seed}), testing only",
            "insecure_seed": self.insecure_seed,
            "adaptive_clip": self.adaptive_clip,
        }
        if self.adaptive_clip:
            out.update({
                "adaptive_clip_paper": ADAPTIVE_PAPER,
                "initial_clip_norm": self.initial_clip_norm,
                "target_unclipped_quantile": self.target_unclipped_quantile,
                "clip_learning_rate": self.clip_learning_rate,
                "clip_count_stddev": self.clip_count_stddev,
                "update_noise_multiplier": self.update_noise_multiplier if self.clip_count_stddev else None,
                "clip_rule": "C <- C * exp(-clip_learning_rate * (noised unclipped fraction - target_unclipped_quantile))",
                "clients_report": "1[update norm <= C] with their metrics, in the clear (the server is trusted)",
            })
        return out


def _number(value: object) -> TypeGuard[int | float]:
    """A real int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
