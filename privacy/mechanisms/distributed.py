"""``distributed``: client-level DP where the clients add discrete Gaussian noise under SecAgg+.

The distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021): every client clips its
update to L2 norm ``clip_norm`` = C, the secure-aggregation protocol quantises it to integers,
and the client adds its **share** of integer noise before masking. The server only ever unmasks
bucket sums that already carry the full noise; it never sees a noise-free sum, nor one update.

Integer domain. SecAgg+ maps a coordinate x to ``q = round_stoch((x + c) / gamma)`` with step
``gamma = 2c / Q`` (``c`` the clip range, a power of two, so ``c / gamma = Q / 2`` is an integer
and a zero update quantises exactly). Under zero-out adjacency (one client's update replaced by
0) the integer sum moves by ``round_stoch(x / gamma)``, whose L2 norm is at most

    D2 = C / gamma + sqrt(d)

(``d`` values, stochastic rounding moves each by less than 1): the deterministic inflated bound,
used for every release (no conditional rounding is claimed). An integer vector's L1 norm is at
most ``sqrt(d)`` times and at most the square of its L2 norm: ``D1 = min(sqrt(d) D2, D2^2)``.

Noise. Each bucket sum must carry noise of std ``sigma = z * D2`` (integer units), ``z`` =
``noise_multiplier``. A bucket of n clients may lose up to D of them (the SecAgg+ tolerated
dropouts, ``ceil(dropout_fraction * n)``) and still be unmasked, so each client adds
``N_Z(0, sigma^2 / n_min)`` per coordinate with ``n_min = n - D``: any ``n' >= n_min`` survivors
carry variance ``n' sigma^2 / n_min >= sigma^2``. SecAgg+ enforces ``n' >= n_min`` (the server
aborts and each client refuses to unmask a bucket with fewer survivors), so nothing with less noise
is ever released. Noise is sized per bucket, so every bucket sum carries the full noise.

Headroom. The summed noise of a bucket is subgaussian with variance proxy at most
``sigma^2 n / n_min`` (a discrete Gaussian N_Z(0, s^2) is s^2-subgaussian, Canonne, Kamath,
Steinke 2020), so a coordinate exceeds ``H = ceil(k sigma sqrt(n / n_min))`` with probability at
most ``2 exp(-k^2 / 2)``; `noise_headroom` takes ``k = sqrt(2 ln(2 d 2^40))``, so that any of the
d coordinates leaves the headroom with probability below 2^-40. The protocol's plan reserves
``[-H, n Q + H]`` (`protocols.secagg.quantize.QuantizationPlan`); a sum outside still aborts.

Accounting. Each release is one `DiscreteGaussianEvent` (local std s, n_min, n_max, D2, D1, d),
accounted by RDP with the bound of Kairouz et al. (`privacy.accounting.ddgauss`), conservative
over the survivor counts and over the bucket sizes of the round. Cohorts are fixed-size draws
from a seeded generator, so ``sample_rate = 1`` (no amplification by sampling is claimed).

Sampler. `sample_discrete_gaussian` is the rejection sampler of Canonne, Kamath and Steinke
(discrete Laplace proposal, Gaussian acceptance), vectorised in NumPy batches. It uses floating
point for the acceptance probability (not the exact rational arithmetic of their Algorithm 3), so
its distribution matches N_Z(0, s^2) up to floating-point rounding of that probability.
Randomness: a NumPy generator seeded from `secrets.randbits(128)` on every call, or, with
``insecure_seed`` (tests only, warns), one seeded from the seed, the client and the round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from privacy.accounting import DiscreteGaussianEvent, GaussianEvent, PrivacyEvent
from privacy.errors import PrivacyError
from privacy.mechanisms.base import MechanismContext, PrivacyMechanism
from privacy.mechanisms.central import check_client_level_settings, clip_update

PAPER = "https://arxiv.org/abs/2102.06387"
#: Chance (log2) that any coordinate of a bucket's summed noise leaves the plan's headroom.
HEADROOM_FAILURE_BITS = 40
#: ``cohort_size -> [(bucket size, min_survivors), ...]``: the protocol's bucket split, bound by ``secure_fl.stages``.
BucketPlan = Callable[[int], Sequence[tuple[int, int]]]


def sample_discrete_gaussian(size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``size`` independent draws of the discrete Gaussian N_Z(0, sigma^2), as int64.

    Canonne, Kamath, Steinke (NeurIPS 2020), Algorithm 3, vectorised: with ``t = floor(sigma) + 1``
    draw Y from the discrete Laplace ``P(y) ~ exp(-|y| / t)`` (the difference of two geometric
    variables) and keep it with probability ``exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2))``; batches
    are drawn until ``size`` are kept. The acceptance probability is computed in floating point.

    >>> sample_discrete_gaussian(3, 0.0, np.random.default_rng(0)).tolist()
    [0, 0, 0]
    """
    if sigma < 0 or not math.isfinite(sigma):
        raise ValueError(f"the discrete Gaussian needs a finite sigma >= 0, got {sigma!r}")
    out = np.zeros(size, dtype=np.int64)
    if sigma == 0 or size == 0:
        return out
    t = math.floor(sigma) + 1
    success = -math.expm1(-1.0 / t)  # P(G = k) = (1 - r) r^k with r = exp(-1 / t)
    shift, scale = sigma * sigma / t, 2.0 * sigma * sigma
    filled = 0
    while filled < size:
        need = size - filled
        batch = int(need * 1.6) + 64  # the acceptance rate is above 0.6 for every sigma
        laplace = rng.geometric(success, batch) - rng.geometric(success, batch)
        keep = rng.random(batch) < np.exp(-((np.abs(laplace) - shift) ** 2) / scale)
        accepted = laplace[keep][:need]
        out[filled : filled + accepted.size] = accepted
        filled += accepted.size
    return out


def l2_sensitivity(clip_norm: float, step: float, num_values: int) -> float:
    """``D2 = C / gamma + sqrt(d)``: one client's L2 influence on the integer sum after stochastic rounding."""
    return clip_norm / step + math.sqrt(num_values)


def l1_sensitivity(l2: float, num_values: int) -> float:
    """``D1 = min(sqrt(d) D2, D2^2)`` (for an integer vector, ``|v|_1 <= |v|_2^2``)."""
    return min(math.sqrt(num_values) * l2, l2 * l2)


def headroom_multiplier(num_values: int, failure_bits: int = HEADROOM_FAILURE_BITS) -> float:
    """k with ``2 d exp(-k^2 / 2) = 2^-failure_bits``: headroom k standard deviations is left with that chance."""
    return math.sqrt(2.0 * (math.log(2.0 * num_values) + failure_bits * math.log(2.0)))


class DistributedDP(PrivacyMechanism):
    """Client-level DP with distributed discrete Gaussian noise under SecAgg+ (clients add the noise).

    Parameters
    ----------
    clip_norm:
        C, the L2 bound on each client's update (> 0).
    noise_multiplier:
        z (>= 0): every bucket sum carries discrete Gaussian noise of std z * D2 in integer
        units, D2 = C / gamma + sqrt(d) the inflated sensitivity; 0 means no guarantee.
    clip:
        "flat" (one norm over the whole update) or "per-tensor" (each of k tensors to C / sqrt(k)).
    insecure_seed:
        Testing only: draw the noise from a NumPy generator seeded with this seed (and the client
        and round) instead of `secrets` (warns).
    """

    name = "distributed"
    guarantee = (
        "client-level (epsilon, delta)-DP against the server and anyone who sees the released adapter, "
        "given an honest-but-curious server"
    )
    paper = PAPER
    server_noise: ClassVar[bool] = False
    uniform_weights: ClassVar[bool] = True
    #: The clients add the noise inside the secure-aggregation protocol (``secure_fl.stages`` wires it).
    client_noise: ClassVar[bool] = True

    def __init__(
        self,
        *,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        clip: str = "flat",
        insecure_seed: int | None = None,
    ) -> None:
        check_client_level_settings(clip_norm, noise_multiplier, clip, insecure_seed)
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.clip_mode = clip
        self.insecure_seed = insecure_seed
        if insecure_seed is not None:
            warnings.warn(
                "privacy.params.insecure_seed is set: the DP noise is reproducible by anyone who knows the seed, "
                "so the run has no privacy guarantee; use it for tests in simulation only",
                stacklevel=2,
            )
        self._step: float | None = None
        self._buckets: BucketPlan | None = None
        self._num_values: int | None = None
        self._cohort_size: int | None = None

    # ------------------------------------------------------------------ the noise plan (pure)
    def target_std(self, step: float, num_values: int) -> float:
        """sigma = z * D2: the std every bucket sum carries on each coordinate, in integer units."""
        return self.noise_multiplier * l2_sensitivity(self.clip_norm, step, num_values)

    def local_std(self, step: float, num_values: int, min_survivors: int) -> float:
        """s = sigma / sqrt(n_min): one client's noise share, so n_min survivors carry sigma^2."""
        if min_survivors < 1:
            raise ValueError(f"distributed DP needs at least one surviving client per bucket, got n_min={min_survivors}")
        return self.target_std(step, num_values) / math.sqrt(min_survivors)

    def noise_headroom(self, bucket_size: int, min_survivors: int, num_values: int, step: float) -> int:
        """H = ceil(k sigma sqrt(n / n_min)): the summed noise of a bucket stays in [-H, H] but with chance < 2^-40.

        This is the protocol's `protocols.secagg.secaggplus.NoiseHeadroom` hook.
        """
        if self.noise_multiplier == 0:
            return 0
        if min_survivors < 1:
            raise ValueError(f"a bucket of {bucket_size} leaves n_min={min_survivors} survivors for its noise")
        std = self.target_std(step, num_values) * math.sqrt(bucket_size / min_survivors)
        return math.ceil(headroom_multiplier(num_values) * std)

    # ------------------------------------------------------------------ server binding
    def bind(self, *, step: float, buckets: BucketPlan, num_values: int | None = None, cohort_size: int | None = None) -> None:
        """Server side: the protocol's quantisation step and bucket split, and (once known) the update size.

        ``secure_fl.stages`` binds ``step`` and ``buckets`` when it builds the stages; the server
        adds ``num_values`` and its planned ``cohort_size`` once the model is built. `privacy_event`
        and `describe` need them; the client side reads the same facts from `MechanismContext`.
        """
        self._step, self._buckets = float(step), buckets
        if num_values is not None:
            self._num_values = int(num_values)
        if cohort_size is not None:
            self._cohort_size = int(cohort_size)

    # ------------------------------------------------------------------ client steps
    def client_transform(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Clip ``update`` to the configured bound (`clip` calls the same function)."""
        return clip_update(update, clip_norm=self.clip_norm, per_tensor=self.clip_mode == "per-tensor")

    def clip(self, update: Mapping[str, np.ndarray], context: MechanismContext) -> dict[str, np.ndarray]:
        """Client step 2: clip the float update to L2 norm <= C (flat) or C / sqrt(k) per tensor."""
        return self.client_transform(update)

    def add_noise_share(self, quantised: Mapping[str, np.ndarray], context: MechanismContext) -> dict[str, np.ndarray]:
        """Client step 5: add N_Z(0, s^2) to every quantised integer, s = z D2 / sqrt(n_min) (int64 out).

        Raises
        ------
        PrivacyError
            If the protocol did not quantise to integers (``context.quantisation_step`` unset) or
            the context's sizes do not match the update.
        """
        if context.quantisation_step is None or not context.num_values:
            raise PrivacyError(
                "privacy.mode='distributed' adds integer noise after quantisation, but the secure-aggregation "
                "session did not report a quantisation step and update size; use secure.mode='secagg+'"
            )
        names = list(quantised)
        arrays = [np.asarray(quantised[name]) for name in names]
        sizes = [a.size for a in arrays]
        if sum(sizes) != context.num_values:
            raise PrivacyError(f"distributed DP: the update has {sum(sizes)} values, the context says {context.num_values}")
        if any(a.dtype.kind not in "iu" for a in arrays):
            raise PrivacyError("distributed DP: the quantised update must hold integers")
        n_min = context.bucket_size - context.worst_case_dropouts
        std = self.local_std(context.quantisation_step, context.num_values, n_min)
        noise = sample_discrete_gaussian(sum(sizes), std, self._generator(context))
        out, offset = {}, 0
        for name, array, size in zip(names, arrays, sizes):
            out[name] = (array.astype(np.int64).reshape(-1) + noise[offset : offset + size]).reshape(array.shape)
            offset += size
        return out

    def _generator(self, context: MechanismContext) -> np.random.Generator:
        if self.insecure_seed is None:
            return np.random.default_rng(secrets.randbits(128))
        key = hashlib.sha256(f"{self.insecure_seed}/{context.client_id}/{context.round}".encode()).digest()
        return np.random.default_rng(int.from_bytes(key[:16], "little"))

    # ------------------------------------------------------------------ server steps
    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: float) -> dict[str, np.ndarray]:
        """Nothing to add: the bucket sums already carry the clients' noise."""
        return {name: np.asarray(value, dtype=np.float32) for name, value in delta.items()}

    def event_for(self, cohort_size: int) -> DiscreteGaussianEvent:
        """The release of a round with ``cohort_size`` clients, conservative over its buckets and survivors.

        Bucket b of size n_b with n_min_b = n_b - D_b gets local std s_b = sigma / sqrt(n_min_b), so
        n' s_b^2 >= sigma^2 for every allowed survivor count n'. The event takes the smallest s_b
        and its n_min (so n_min s^2 = sigma^2) and the largest n_b for tau, which grows with n and
        falls with s: a bound for every bucket of the round.
        """
        if self._step is None or self._buckets is None or self._num_values is None:
            raise PrivacyError(
                "distributed DP: the server has not bound the protocol's quantisation step, bucket split and "
                "update size (secure_fl.stages.Stages.bind_update), so the release cannot be accounted"
            )
        plans = list(self._buckets(cohort_size))
        n_max = max(n for n, _ in plans)
        n_min = max(m for _, m in plans)
        d = self._num_values
        l2 = l2_sensitivity(self.clip_norm, self._step, d)
        return DiscreteGaussianEvent(
            local_std=self.local_std(self._step, d, n_min), min_clients=n_min, max_clients=n_max,
            l2_sensitivity=l2, l1_sensitivity=l1_sensitivity(l2, d), dimension=d, sample_rate=1.0, steps=1,
        )

    def privacy_event(
        self, *, cohort_size: int, population: int, contributions: int, sample_rate: float = 1.0
    ) -> DiscreteGaussianEvent:
        """One distributed discrete Gaussian release of this cohort's bucket sums, ``sample_rate = 1``.

        With fixed-size cohorts (a seeded generator, neither Poisson nor secret) no amplification
        is claimed; ``sample_rate`` is ignored (``run.sampling = "poisson"`` is refused with this
        mode by `secure_fl.budget.prepare_privacy`: the event follows the actual buckets).
        """
        return self.event_for(cohort_size)

    calibratable: ClassVar[bool] = True

    def calibration_event(self, *, noise_multiplier: float, sample_rate: float) -> PrivacyEvent:
        """What one release costs at noise multiplier ``noise_multiplier`` (for ``privacy.target_epsilon``).

        Once the server bound the update size and buckets (`bind`), the exact
        `DiscreteGaussianEvent` of the planned cohort. Before that (on the clients, and on the
        server inside ``Stages.from_config``) the update size is unknown, and the event is the
        Gaussian ``GaussianEvent(z, q)``: every bucket sum carries std ``z * D2`` for sensitivity
        ``D2``, so the discrete curve is the Gaussian ``alpha / (2 z^2)`` plus the tau terms, which
        vanish in double precision for useful noise (s above a few integer steps). The server
        re-checks the calibrated z with the exact event once it is bound and refuses the run if
        the planned rounds would then pass the target (`secure_fl.server.engine`), and the budget
        check before every round composes the exact event.
        """
        if self._step is not None and self._buckets is not None and self._num_values is not None \
                and self._cohort_size is not None:
            saved = self.noise_multiplier
            self.noise_multiplier = float(noise_multiplier)
            try:
                event = self.event_for(self._cohort_size)
            finally:
                self.noise_multiplier = saved
            return dataclasses.replace(event, sample_rate=float(sample_rate))
        return GaussianEvent(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate), steps=1)

    def set_noise_multiplier(self, noise_multiplier: float) -> None:
        """Use the calibrated z from now on (server and clients compute the same value from the config)."""
        if isinstance(noise_multiplier, bool) or not (0 <= noise_multiplier < math.inf):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")
        self.noise_multiplier = float(noise_multiplier)

    def describe(self) -> dict[str, Any]:
        """Settings plus what the report needs: who adds the noise, its size per bucket, what the server sees."""
        facts: dict[str, Any] = {
            "mode": self.name,
            "guarantee": self.guarantee if self.noise_multiplier > 0 else "none",
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip_mode,
            "noise_added_by": "clients",
            "noise": "distributed discrete Gaussian (Kairouz, Liu, Steinke 2021), each client's share after quantisation",
            "sampler": "Canonne-Kamath-Steinke rejection sampler, floating-point acceptance (not exact rational)",
            "rounding": "unconditional stochastic rounding; sensitivity inflated to C / gamma + sqrt(d)",
            "server_sees": "each bucket sum with the full noise (never a noise-free sum, never one update)",
            "weights": "uniform (every client's weight is 1)",
            "sampling_amplification": "none claimed (fixed-size cohorts from a seeded generator): sample_rate = 1",
            "randomness": "numpy Generator seeded from secrets.randbits(128) (CSPRNG seed)" if self.insecure_seed is None
            else f"INSECURE: seeded NumPy generator (insecure_seed={self.insecure_seed}), testing only",
            "insecure_seed": self.insecure_seed,
        }
        if self._step is not None:
            facts["quantisation_step"] = self._step
        if self._step is not None and self._num_values is not None:
            d = self._num_values
            l2 = l2_sensitivity(self.clip_norm, self._step, d)
            sigma = self.target_std(self._step, d)
            facts.update({
                "num_values": d,
                "l2_sensitivity": l2,
                "l1_sensitivity": l1_sensitivity(l2, d),
                "inflated_sensitivity": f"D2 = C / gamma + sqrt(d) = {l2:.6g} integer steps ({l2 * self._step:.6g} in update units)",
                "noise_std_on_each_sum": sigma,
                "noise_std_on_each_sum_in_update_units": sigma * self._step,
            })
            if self._buckets is not None and self._cohort_size is not None:
                facts["buckets"] = [
                    {"n": n, "n_min": m, "local_std": self.local_std(self._step, d, m),
                     "headroom": self.noise_headroom(n, m, d, self._step)}
                    for n, m in self._buckets(self._cohort_size)
                ]
        return facts
