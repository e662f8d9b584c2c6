"""Quantisation of float updates into the ring Z_(2^b) for masked secure aggregation.

Building blocks for SecAgg+ (issue 9); the protocol itself (keys, masks, shares) is not here.
A client clips its update to ``[-c, c]``, maps it affinely onto ``[0, Q]``, rounds stochastically
to an integer, multiplies by its integer weight ``w <= W`` and masks the words mod ``2^b``. The
server adds the unmasked words mod ``2^b`` (`modular_sum`), checks that the sum is one honest
inputs can reach (`check_no_wrap`) and maps it back to floats (`dequantize_sum`).

Pure functions only, vectorised over flat arrays; no state. Words are at most 32 bits
(`MAX_BITS`), held as ``uint32`` and summed in ``uint64``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from protocols.errors import WrapAround

#: Largest word size a plan may use. Words then fit ``uint32``, so a tightly packed upload is never
#: larger than the float32 update it replaces (1.0x), and sums of any number of words stay exact in
#: ``uint64`` before the final reduction mod ``2^b``.
MAX_BITS = 32


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def required_bits(*, bucket_size: int, max_weight: int, levels: int, noise_headroom: int = 0) -> int:
    """Smallest word size ``b`` for which ``bucket_size`` weighted inputs cannot wrap mod ``2^b``.

    Parameters
    ----------
    bucket_size
        Number ``n`` of clients whose words are summed.
    max_weight
        Largest integer weight ``W`` a client may multiply its quantised input by.
    levels
        Quantisation levels ``Q``: a quantised input lies in ``[0, Q]``.
    noise_headroom
        ``H >= 0``: integer noise added by the clients (distributed DP) may move the sum by up to
        ``H`` either way, so the exact sum lies in ``[-H, n * W * Q + H]``.

    Returns
    -------
    int
        ``ceil(log2(n * W * Q + 2H)) + 1``; see `QuantizationPlan` for the derivation.

    Examples
    --------
    >>> required_bits(bucket_size=100, max_weight=1, levels=2**22)
    30
    """
    worst = bucket_size * max_weight * levels + 2 * noise_headroom
    return (worst - 1).bit_length() + 1  # (m - 1).bit_length() == ceil(log2(m)) for m >= 1


@dataclass(frozen=True)
class QuantizationPlan:
    """Clip range, levels and word size for one bucket of a masked sum.

    The bit rule. A client's weighted input is ``w * q`` with ``q`` in ``[0, Q]`` and ``w`` in
    ``[1, W]``, so the exact sum of ``n`` of them lies in ``[0, n * W * Q]``. It is recovered from
    its residue mod ``2^b`` exactly when ``2^b > n * W * Q``. The plan takes
    ``b = ceil(log2(n * W * Q)) + 1``, so ``2^(b - 1) >= n * W * Q``: honest sums never wrap, and at
    least half of the ring is out of reach of honest inputs, which is the room `check_no_wrap`
    uses to report a sum that wrapped or was pushed out of range by a client sending words above
    ``W * Q``. Plans that need ``b > 32`` are refused (see `MAX_BITS`): lower ``levels`` (coarser
    precision), the bucket size or the weight bound.

    Noise headroom. Under distributed DP every client adds integer noise to its quantised words
    before masking (a negative word wraps into the ring), so the exact sum is
    ``sum(w * q) + noise`` with ``|noise| <= H`` except with negligible probability. The plan then
    covers ``[-H, n * W * Q + H]``: ``b = ceil(log2(n * W * Q + 2H)) + 1``, and `check_no_wrap` /
    `dequantize_sum` read a residue above ``total_weight * Q + H`` as the negative value
    ``residue - 2^b``. ``H = 0`` (the default) is the plan without noise, bit for bit.

    Parameters
    ----------
    clip_range
        ``c > 0``: every coordinate is clipped to ``[-c, c]`` before quantisation.
    levels
        ``Q >= 1``: ``[-c, c]`` is mapped onto ``[0, Q]``, a step of ``2c / Q``. Powers of two
        (and a power-of-two ``c``) make the affine maps exact in float64.
    bucket_size
        ``n >= 1``: the most clients whose words are summed together.
    max_weight
        ``W >= 1``: the largest integer weight a client pre-multiplies its words by (1 for an
        unweighted mean).
    modulus_bits
        Word size to use instead of the minimum, for interoperability (Flower uses 32); must lie in
        ``[required_bits, 32]``. ``None`` (the default) takes the minimum, the tightest upload.
    noise_headroom
        ``H >= 0``: the most the clients' summed integer noise may move the sum either way (0: no
        noise).

    Raises
    ------
    ValueError
        Naming the parameter that is invalid, or ``c``, ``Q``, ``n`` and ``W`` when they need more
        than 32 bits.
    """

    clip_range: float = field(metadata={"help": "c: coordinates are clipped to [-c, c]"})
    levels: int = field(metadata={"help": "Q: quantisation levels, [-c, c] maps onto [0, Q]"})
    bucket_size: int = field(metadata={"help": "n: most clients summed in one bucket"})
    max_weight: int = field(default=1, metadata={"help": "W: largest integer client weight"})
    modulus_bits: int | None = field(default=None, metadata={"help": "b override (None: minimum)"})
    noise_headroom: int = field(default=0, metadata={"help": "H: the summed noise lies in [-H, H]"})

    def __post_init__(self) -> None:
        """Validate every field and the bit budget."""
        c = self.clip_range
        if isinstance(c, bool) or not isinstance(c, (int, float, np.floating, np.integer)):
            raise ValueError(f"clip_range must be a number, got {c!r}")
        if not (math.isfinite(float(c)) and c > 0):
            raise ValueError(f"clip_range must be finite and > 0, got {c!r}")
        _check_int("levels", self.levels, minimum=1)
        _check_int("bucket_size", self.bucket_size, minimum=1)
        _check_int("max_weight", self.max_weight, minimum=1)
        _check_int("noise_headroom", self.noise_headroom, minimum=0)
        need = self.required_bits
        if need > MAX_BITS and self.noise_headroom:
            raise ValueError(
                f"clip_range={c}, levels={self.levels}, bucket_size={self.bucket_size}, "
                f"max_weight={self.max_weight} with noise_headroom={self.noise_headroom} need {need} bits "
                f"(ceil(log2(n*W*Q + 2H)) + 1) so the noised sum cannot wrap; at most {MAX_BITS} are supported"
            )
        if need > MAX_BITS:
            most = (1 << (MAX_BITS - 1)) // (self.bucket_size * self.max_weight)
            raise ValueError(
                f"clip_range={c}, levels={self.levels}, bucket_size={self.bucket_size}, "
                f"max_weight={self.max_weight} need {need} bits (ceil(log2(n*W*Q)) + 1) so the sum "
                f"cannot wrap; at most {MAX_BITS} are supported. Use levels <= {most}"
                + ("" if most >= 1 else " (impossible: lower bucket_size or max_weight)")
                + ", a smaller bucket_size or a smaller max_weight."
            )
        if self.modulus_bits is not None:
            _check_int("modulus_bits", self.modulus_bits, minimum=1)
            if not need <= self.modulus_bits <= MAX_BITS:
                raise ValueError(
                    f"modulus_bits={self.modulus_bits} must lie in [{need}, {MAX_BITS}] for "
                    f"levels={self.levels}, bucket_size={self.bucket_size}, "
                    f"max_weight={self.max_weight}"
                )

    @classmethod
    def for_precision(
        cls, *, clip_range: float, precision: float, bucket_size: int, max_weight: int = 1, noise_headroom: int = 0
    ) -> QuantizationPlan:
        """Plan with the fewest power-of-two levels whose step ``2c / Q`` is at most ``precision``.

        Parameters
        ----------
        clip_range
            ``c > 0``.
        precision
            Largest acceptable quantisation step (> 0); one input's rounding error is below it.
        bucket_size
            ``n >= 1``.
        max_weight
            ``W >= 1``.
        noise_headroom
            ``H >= 0`` (see the class docstring).

        Returns
        -------
        QuantizationPlan
            With ``levels = 2^ceil(log2(2c / precision))`` and the minimal word size.

        Raises
        ------
        ValueError
            If ``precision`` is not finite and positive, or the plan needs more than 32 bits.

        Examples
        --------
        >>> plan = QuantizationPlan.for_precision(clip_range=8.0, precision=2**-18, bucket_size=100)
        >>> plan.levels == 2**22, plan.bits
        (True, 30)
        """
        if isinstance(precision, bool) or not (math.isfinite(precision) and precision > 0):
            raise ValueError(f"precision must be finite and > 0, got {precision!r}")
        if isinstance(clip_range, bool) or not (math.isfinite(clip_range) and clip_range > 0):
            raise ValueError(f"clip_range must be finite and > 0, got {clip_range!r}")
        exponent = max(0, math.ceil(math.log2(2.0 * clip_range / precision)))
        if 2.0 * clip_range / 2.0**exponent > precision:  # guard log2 rounding
            exponent += 1
        return cls(
            clip_range=clip_range, levels=1 << exponent, bucket_size=bucket_size, max_weight=max_weight,
            noise_headroom=noise_headroom,
        )

    @property
    def required_bits(self) -> int:
        """Minimal word size ``ceil(log2(n * W * Q + 2H)) + 1`` for this plan."""
        return required_bits(
            bucket_size=self.bucket_size, max_weight=self.max_weight, levels=self.levels,
            noise_headroom=self.noise_headroom,
        )

    @property
    def bits(self) -> int:
        """Word size ``b`` in use: ``modulus_bits`` when given, else `required_bits`."""
        return self.required_bits if self.modulus_bits is None else self.modulus_bits

    @property
    def modulus(self) -> int:
        """``2^b``, the ring the masked words live in."""
        return 1 << self.bits

    @property
    def step(self) -> float:
        """Quantisation step ``2c / Q`` in input units."""
        return 2.0 * float(self.clip_range) / self.levels


def quantize(
    x: ArrayLike, plan: QuantizationPlan, rng: np.random.Generator | None, *, weight: int = 1
) -> NDArray[np.uint32]:
    """Clip, shift, scale and round a flat float array into weighted words of ``plan.bits`` bits.

    ``q = round((clip(x, -c, c) + c) * Q / (2c))`` in ``[0, Q]``; the word is ``weight * q``.

    Parameters
    ----------
    x
        Flat array of finite floats (the client's update, or one bucket of it).
    plan
        The bucket's `QuantizationPlan`.
    rng
        Source of the stochastic rounding: ``floor(y) + [u < frac(y)]`` with ``u`` uniform in
        ``[0, 1)``, so ``E[q] = y`` exactly (unbiased) and ``q`` is ``floor(y)`` or ``ceil(y)``. The
        protocol passes a generator seeded from `secrets`. ``None`` selects deterministic
        round-half-up, ``floor(y + 1/2)``, for known-answer tests; it is biased and not for
        training.
    weight
        Integer in ``[1, plan.max_weight]`` the quantised value is multiplied by.

    Returns
    -------
    numpy.ndarray
        ``uint32`` words, each at most ``weight * Q < 2^b``.

    Raises
    ------
    ValueError
        If ``x`` is not one-dimensional, holds NaN, or ``weight`` is out of range.

    Examples
    --------
    >>> plan = QuantizationPlan(clip_range=8.0, levels=2**22, bucket_size=3)
    >>> quantize([0.5, -1.0, 2.0], plan, None).tolist()
    [2228224, 1835008, 2621440]
    """
    values = np.array(x, dtype=np.float64)  # a private copy: every step below works in place
    if values.ndim != 1:
        raise ValueError(f"quantize takes a flat array, got shape {values.shape}")
    if np.isnan(values).any():
        raise ValueError(f"quantize: {int(np.isnan(values).sum())} NaN value(s) in the update")
    w = _check_int("weight", weight, minimum=1)
    if w > plan.max_weight:
        raise ValueError(f"weight={w} exceeds the plan's max_weight={plan.max_weight}")
    c, levels = float(plan.clip_range), float(plan.levels)
    np.clip(values, -c, c, out=values)
    values += c
    values *= plan.levels / (2.0 * c)
    np.clip(values, 0.0, levels, out=values)  # float rounding must not leave [0, Q]
    if rng is None:
        values += 0.5
        rounded = np.floor(values, out=values)
    else:
        rounded = np.floor(values)
        values -= rounded  # the fractional part
        rounded += rng.random(values.shape[0]) < values
    np.minimum(rounded, levels, out=rounded)
    words = rounded.astype(np.uint32)  # w * Q < 2^b <= 2^32: the product below cannot wrap
    if w != 1:
        words *= np.uint32(w)
    return words


def modular_sum(words: ArrayLike, bits: int) -> NDArray[np.uint32]:
    """Sum ``(k, d)`` stacked words over clients mod ``2^bits`` (after unpacking, never packed).

    Adds in ``uint64``, whose wrap-around mod ``2^64`` is a multiple of ``2^bits``, so the result
    is exact for any ``k``; then reduces mod ``2^bits``.

    Parameters
    ----------
    words
        Array of shape ``(k, d)`` (or ``(d,)``) of unsigned words below ``2^bits``.
    bits
        Word size ``b`` in ``[1, 32]``.

    Returns
    -------
    numpy.ndarray
        ``uint32`` array of shape ``(d,)``.
    """
    b = _check_int("bits", bits, minimum=1)
    if b > MAX_BITS:
        raise ValueError(f"bits must be <= {MAX_BITS}, got {b}")
    stack = np.atleast_2d(np.asarray(words))
    if stack.dtype.kind not in "ui":
        raise ValueError(f"modular_sum takes integer words, got dtype {stack.dtype}")
    total: NDArray[np.uint64] = stack.astype(np.uint64).sum(axis=0, dtype=np.uint64)
    reduced: NDArray[np.uint64] = total & np.uint64((1 << b) - 1)
    return reduced.astype(np.uint32)


def _check_sum_args(total: NDArray[np.generic], plan: QuantizationPlan, count: int, total_weight: int) -> None:
    n = _check_int("count", count, minimum=1)
    if n > plan.bucket_size:
        raise ValueError(f"count={n} exceeds the plan's bucket_size={plan.bucket_size}")
    tw = _check_int("total_weight", total_weight, minimum=n)
    if tw > n * plan.max_weight:
        raise ValueError(f"total_weight={tw} exceeds count * max_weight = {n * plan.max_weight}")
    if total.ndim != 1 or total.dtype.kind not in "ui":
        raise ValueError(f"the sum must be a flat integer array, got {total.dtype} {total.shape}")
    if total.size and (int(total.min()) < 0 or int(total.max()) >= plan.modulus):
        raise ValueError(f"the sum must be reduced mod 2^{plan.bits}")


def centred_sum(total: ArrayLike, plan: QuantizationPlan, *, count: int, total_weight: int) -> NDArray[np.int64]:
    """The exact integer sum behind a modular sum, after `check_no_wrap`: in ``[-H, total_weight * Q + H]``.

    A residue above ``total_weight * Q + H`` stands for the negative value ``residue - 2^b``
    (noise pushed the sum below 0). With ``H = 0`` this is the residue itself.

    Raises
    ------
    WrapAround
        If any coordinate is outside the range honest (noised) inputs reach (see `check_no_wrap`).
    """
    words = np.asarray(total)
    check_no_wrap(words, plan, count=count, total_weight=total_weight)
    signed = words.astype(np.int64)
    if plan.noise_headroom:
        signed[signed > total_weight * plan.levels + plan.noise_headroom] -= np.int64(plan.modulus)
    return signed


def check_no_wrap(total: ArrayLike, plan: QuantizationPlan, *, count: int, total_weight: int) -> None:
    """Raise `WrapAround` unless every coordinate of a modular sum is one honest inputs can reach.

    ``count`` honest clients with weights summing to ``total_weight`` produce an exact sum in
    ``[0, total_weight * Q]``, which decodes into ``[-total_weight * c, total_weight * c]`` (inside
    ``[-n * W * c, n * W * c]``). A coordinate outside means the sum wrapped mod ``2^b`` or a client
    sent words above ``weight * Q``. A dishonest client can still move the sum *within* the range
    (or make it wrap back into it); catching that needs input proofs, which this check is not.

    With a noise headroom ``H`` (distributed DP) the accepted range is ``[-H, total_weight * Q + H]``:
    a residue is accepted if it is at most ``total_weight * Q + H`` or at least ``2^b - H`` (a
    negative sum). A sum outside (the noise exceeded its headroom, which the plan makes negligible,
    or a client sent out-of-range words) aborts: it is never decoded into garbage.

    Parameters
    ----------
    total
        The unmasked sum mod ``2^b``, flat, as from `modular_sum`.
    plan
        The bucket's plan.
    count
        Number of clients summed, ``1 <= count <= n``.
    total_weight
        Sum of their weights, in ``[count, count * W]``.

    Raises
    ------
    WrapAround
        Naming how many coordinates are out of range, the first one and its value.
    ValueError
        If the arguments themselves are inconsistent with the plan.
    """
    words = np.asarray(total)
    _check_sum_args(words, plan, count, total_weight)
    limit = total_weight * plan.levels
    headroom = plan.noise_headroom
    wide = words.astype(np.uint64)
    out = wide > np.uint64(limit + headroom)
    if headroom:
        out &= wide < np.uint64(plan.modulus - headroom)
    bad = np.flatnonzero(out)
    if bad.size:
        first = int(bad[0])
        accepted = (f"total_weight * Q = {limit}" if not headroom else
                    f"the range [-{headroom}, total_weight * Q + {headroom}] (noise headroom {headroom})")
        raise WrapAround(
            f"{bad.size} of {words.size} coordinate(s) of the sum of {count} client(s) "
            f"{'exceed' if not headroom else 'fall outside'} {accepted} (first: index {first}, value "
            f"{int(words[first])}, mod 2^{plan.bits}): the sum wrapped or a client sent out-of-range words"
        )


def dequantize_sum(total: ArrayLike, plan: QuantizationPlan, count: int, total_weight: int) -> NDArray[np.float64]:
    """Map a modular sum of ``count`` weighted quantised inputs back to floats, after `check_no_wrap`.

    Inverse of the affine map: every client contributed ``w * (x + c) * Q / (2c)``, so
    ``sum(w * x) = total * 2c / Q - total_weight * c``, with ``total`` the exact (centred) sum of
    `centred_sum` (the residue itself without noise headroom). Computed as
    ``(2 * total - total_weight * Q) * c / Q`` with an exact integer numerator: exact in float64
    whenever ``c`` and ``Q`` are powers of two (Flower's 8 and 2^22), otherwise within a few ulp.

    Parameters
    ----------
    total
        The unmasked sum mod ``2^b`` (flat).
    plan
        The bucket's plan.
    count
        Number of clients summed.
    total_weight
        Sum of their weights (``count`` when unweighted).

    Returns
    -------
    numpy.ndarray
        float64 weighted sum ``sum(w * clip(x))`` up to rounding; divide by ``total_weight`` for
        the weighted mean.

    Raises
    ------
    WrapAround
        If any coordinate is outside the range honest inputs reach (see `check_no_wrap`).
    """
    exact = centred_sum(total, plan, count=count, total_weight=total_weight)
    numerator = 2 * exact - np.int64(total_weight * plan.levels)
    return numerator.astype(np.float64) * float(plan.clip_range) / float(plan.levels)
