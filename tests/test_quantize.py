"""Quantisation into Z_(2^b), wrap-around detection and tight packing (SecAgg+ building blocks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import MalformedMessage, ProtocolAbort, WrapAround
from protocols.secagg import packing
from protocols.secagg.packing import pack_words, packed_size, unpack_words
from protocols.secagg.quantize import (
    MAX_BITS,
    QuantizationPlan,
    check_no_wrap,
    dequantize_sum,
    modular_sum,
    quantize,
    required_bits,
)

FLOWER = QuantizationPlan(clip_range=8.0, levels=2**22, bucket_size=3)


# --- the plan and its bit rule -------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 10_000), w=st.integers(1, 1_000), q=st.integers(1, 2**30))
def test_bit_rule_is_minimal_and_leaves_a_spare_bit(n: int, w: int, q: int) -> None:
    b = required_bits(bucket_size=n, max_weight=w, levels=q)
    assert b == math.ceil(math.log2(n * w * q)) + 1  # products stay below 2^53: float log2 is exact enough
    assert 2 ** (b - 1) >= n * w * q  # the largest honest sum fits with a spare bit
    assert b == 1 or 2 ** (b - 2) < n * w * q  # and no smaller b has that property


def test_flower_oracle_plan_and_refusals() -> None:
    assert FLOWER.bits == 25 and FLOWER.step == 2**-18
    assert QuantizationPlan(clip_range=8.0, levels=2**22, bucket_size=100).bits == 30
    # Flower's defaults (Q = 2^22, max_weight = 1000) with 100 clients need 40 bits: refused.
    with pytest.raises(ValueError, match=r"clip_range=8.0, levels=4194304, bucket_size=100, max_weight=1000 need 40 bits"):
        QuantizationPlan(clip_range=8.0, levels=2**22, bucket_size=100, max_weight=1000)
    QuantizationPlan(clip_range=8.0, levels=2**31 // 100_000, bucket_size=100, max_weight=1000)  # the hint is right
    with pytest.raises(ValueError, match="impossible"):
        QuantizationPlan(clip_range=1.0, levels=1, bucket_size=2**20, max_weight=2**20)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_range": 0.0}, {"clip_range": -1.0}, {"clip_range": math.nan}, {"clip_range": math.inf},
        {"clip_range": True}, {"clip_range": "8"}, {"levels": 0}, {"levels": True}, {"levels": 2.0},
        {"bucket_size": 0}, {"max_weight": 0}, {"max_weight": True}, {"modulus_bits": 24},
        {"modulus_bits": 33}, {"modulus_bits": True},
    ],
)
def test_plan_rejects_invalid_fields(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"clip_range": 8.0, "levels": 2**22, "bucket_size": 3}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        QuantizationPlan(**{**base, **kwargs})  # type: ignore[arg-type]


def test_modulus_override_for_flower_interoperability() -> None:
    plan = QuantizationPlan(clip_range=8.0, levels=2**22, bucket_size=3, modulus_bits=32)
    assert plan.bits == 32 and plan.modulus == 2**32 and plan.required_bits == 25


@settings(max_examples=200, deadline=None)
@given(c=st.floats(1e-3, 1e3), precision=st.floats(1e-6, 10.0), n=st.integers(1, 1000))
def test_for_precision_meets_the_target_with_fewest_power_of_two_levels(c: float, precision: float, n: int) -> None:
    try:
        plan = QuantizationPlan.for_precision(clip_range=c, precision=precision, bucket_size=n)
    except ValueError as exc:
        assert "bits" in str(exc)
        return
    assert plan.step <= precision
    assert plan.levels == 1 or 2 * c / (plan.levels // 2) > precision
    assert plan.bits <= MAX_BITS


# --- quantisation --------------------------------------------------------------------------------


def test_flower_quantisation_oracle() -> None:
    """algorithms.md section 4: c = 8, Q = 2^22, three clients, deterministic rounding."""
    inputs = [[0.5, -1.0, 2.0], [0.25, 0.75, -3.0], [1.0, 1.0, 1.0]]
    words = [quantize(x, FLOWER, None) for x in inputs]
    assert words[0].tolist() == [2228224, 1835008, 2621440]
    assert words[1].tolist() == [2162688, 2293760, 1310720]
    assert words[2].tolist() == [2359296, 2359296, 2359296]
    total = modular_sum(np.stack(words), FLOWER.bits)
    assert dequantize_sum(total, FLOWER, 3, 3).tolist() == [1.75, 0.75, 0.0]  # exactly


def test_clipping_and_range() -> None:
    words = quantize([-1e30, -8.0, -np.inf, 8.0, 1e30, np.inf, 0.0], FLOWER, np.random.default_rng(0))
    assert words.dtype == np.uint32
    assert words.tolist() == [0, 0, 0, 2**22, 2**22, 2**22, 2**21]


def test_stochastic_rounding_is_unbiased() -> None:
    """E[q] = y: 200 000 draws of each of a few fractional positions, within 5 standard errors."""
    plan = QuantizationPlan(clip_range=1.0, levels=10, bucket_size=1)
    rng = np.random.default_rng(12345)
    draws = 200_000
    for frac in (0.001, 0.3, 0.5, 0.77, 0.999):
        x = -1.0 + (4 + frac) * plan.step  # y = 4 + frac
        y = (x + 1.0) / plan.step
        q = quantize(np.full(draws, x), plan, rng).astype(np.float64)
        assert set(np.unique(q).tolist()) <= {4.0, 5.0}
        stderr = math.sqrt(frac * (1 - frac) / draws)
        assert abs(q.mean() - y) < 5 * stderr + 1e-12, (frac, q.mean(), y)


def test_stochastic_rounding_is_unbiased_over_a_random_vector() -> None:
    plan = QuantizationPlan(clip_range=1.0, levels=2**8, bucket_size=1)
    rng = np.random.default_rng(7)
    x = rng.uniform(-1.0, 1.0, size=2_000)
    exact = (x + 1.0) / plan.step
    mean = np.mean([quantize(x, plan, rng) for _ in range(400)], axis=0)
    # each coordinate's mean has std <= 0.5 / sqrt(400) = 0.025; the average of 2000 of them less
    assert np.max(np.abs(mean - exact)) < 6 * 0.025
    assert abs(np.mean(mean - exact)) < 6 * 0.025 / math.sqrt(x.size)


def test_quantize_rejects_bad_input() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="NaN"):
        quantize([0.0, math.nan], FLOWER, rng)
    with pytest.raises(ValueError, match="flat"):
        quantize(np.zeros((2, 2)), FLOWER, rng)
    with pytest.raises(ValueError, match="max_weight"):
        quantize([0.0], FLOWER, rng, weight=2)
    with pytest.raises(ValueError, match="weight"):
        quantize([0.0], FLOWER, rng, weight=0)


def test_weighted_sum_decodes_to_the_weighted_sum_exactly_on_the_grid() -> None:
    plan = QuantizationPlan(clip_range=4.0, levels=2**10, bucket_size=5, max_weight=7)
    rng = np.random.default_rng(3)
    weights = [1, 7, 3, 5]
    xs = [rng.integers(-512, 513, size=50) * plan.step for _ in weights]  # grid points: exact
    words = np.stack([quantize(x, plan, rng, weight=w) for x, w in zip(xs, weights)])
    total = modular_sum(words, plan.bits)
    expected = sum(w * x for w, x in zip(weights, xs))
    assert np.array_equal(dequantize_sum(total, plan, 4, sum(weights)), expected)


def test_masked_end_to_end_with_packing_and_the_worst_honest_case() -> None:
    """Pack, unpack, add masks that cancel mod 2^b, sum: equals the unmasked decoded sum."""
    plan = QuantizationPlan(clip_range=2.0, levels=2**16, bucket_size=20, max_weight=3)
    rng = np.random.default_rng(11)
    d, n = 1_000, 20
    xs = rng.normal(scale=3.0, size=(n, d))
    xs[0] = 2.0  # clients at the top of the range with the largest weight: the sum's maximum
    xs[1] = 2.0
    weights = rng.integers(1, 4, size=n)
    weights[:2] = 3
    masks = rng.integers(0, plan.modulus, size=(n, d), dtype=np.uint64)
    masks[-1] = (plan.modulus - masks[:-1].sum(axis=0) % plan.modulus) % plan.modulus
    uploads = [
        pack_words(modular_sum(np.stack([quantize(x, plan, rng, weight=int(w)), m]), plan.bits), plan.bits)
        for x, w, m in zip(xs, weights, masks)
    ]
    words = np.stack([unpack_words(u, plan.bits, d) for u in uploads])
    total = modular_sum(words, plan.bits)
    got = dequantize_sum(total, plan, n, int(weights.sum()))
    exact = (weights[:, None] * np.clip(xs, -2.0, 2.0)).sum(axis=0)
    assert np.max(np.abs(got - exact)) <= int(weights.sum()) * plan.step  # each rounding < one step
    xs[:] = 2.0
    top = modular_sum(np.stack([quantize(x, plan, None, weight=3) for x in xs]), plan.bits)
    assert dequantize_sum(top, plan, n, 3 * n).tolist() == [2.0 * 3 * n] * d  # no wrap at the edge


# --- wrap-around detection -----------------------------------------------------------------------


def test_a_wrapped_sum_is_reported_never_decoded() -> None:
    # Too-small modulus on purpose: plan for 3 clients, sum 4 at the top of the range mod 2^25.
    top = quantize([8.0, 0.0], FLOWER, None)
    total = modular_sum(np.stack([top] * 4), FLOWER.bits)
    with pytest.raises(WrapAround) as info:
        dequantize_sum(total, FLOWER, 3, 3)
    assert "1 of 2 coordinate(s)" in str(info.value) and "index 0" in str(info.value)
    assert isinstance(info.value, ProtocolAbort)  # the round engine aborts the round cleanly


def test_a_lying_client_out_of_range_is_reported() -> None:
    honest = [quantize([1.0, -1.0], FLOWER, None) for _ in range(2)]
    liar = np.array([2**24 + 5, 0], dtype=np.uint32)  # far above W * Q, still below 2^b
    total = modular_sum(np.stack([*honest, liar]), FLOWER.bits)
    with pytest.raises(WrapAround, match="index 0"):
        check_no_wrap(total, FLOWER, count=3, total_weight=3)
    check_no_wrap(modular_sum(np.stack(honest), FLOWER.bits), FLOWER, count=2, total_weight=2)


@pytest.mark.parametrize(
    ("count", "total_weight", "match"),
    [(0, 1, "count"), (4, 4, "bucket_size"), (2, 1, "total_weight"), (2, 3, "count \\* max_weight")],
)
def test_sum_arguments_are_checked(count: int, total_weight: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dequantize_sum(np.zeros(2, dtype=np.uint32), FLOWER, count, total_weight)


def test_an_unreduced_sum_is_refused() -> None:
    with pytest.raises(ValueError, match="mod 2"):
        check_no_wrap(np.array([2**25], dtype=np.uint64), FLOWER, count=1, total_weight=1)


# --- packing -------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(bits=st.integers(1, 32), count=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_pack_round_trip_and_size(bits: int, count: int, seed: int) -> None:
    words = np.random.default_rng(seed).integers(0, 2**bits, size=count, dtype=np.uint64)
    data = pack_words(words, bits)
    assert len(data) == packed_size(count, bits) == math.ceil(count * bits / 8)
    back = unpack_words(data, bits, count)
    assert back.dtype == np.uint32 and np.array_equal(back, words)


def test_pack_round_trip_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packing, "BLOCK", 16)
    for bits in (1, 7, 13, 32):
        words = np.random.default_rng(bits).integers(0, 2**bits, size=16 * 5 + 3, dtype=np.uint64)
        assert np.array_equal(unpack_words(pack_words(words, bits), bits, words.size), words)


def test_pack_layout_is_pinned() -> None:
    assert pack_words([1, 2, 3, 4, 5], 3) == bytes([0xD1, 0x58])
    assert pack_words([0xDEADBEEF], 32) == bytes.fromhex("efbeadde")
    assert pack_words([1, 0, 1, 1], 1) == bytes([0b1101])


def test_pack_and_unpack_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[0, 2\^3\)"):
        pack_words([8], 3)
    with pytest.raises(ValueError, match="bits"):
        pack_words([0], 33)
    with pytest.raises(ValueError, match="flat integer"):
        pack_words([0.5], 3)
    with pytest.raises(MalformedMessage, match="must be 2 bytes"):
        unpack_words(b"\x00\x00\x00", 3, 5)
    with pytest.raises(MalformedMessage, match="padding"):
        unpack_words(bytes([0xD1, 0xD8]), 3, 5)


def test_upload_is_at_most_float32_size_for_100_clients() -> None:
    """Issue 9: packed upload <= 1.0x the float32 update (Flower ships 2.0x)."""
    d = 10_000
    for plan in (
        QuantizationPlan(clip_range=8.0, levels=2**22, bucket_size=100),  # W = 1: 30 bits
        QuantizationPlan.for_precision(clip_range=1.0, precision=2**-16, bucket_size=100, max_weight=64),
    ):
        words = quantize(np.random.default_rng(0).normal(size=d), plan, np.random.default_rng(1))
        data = pack_words(words, plan.bits)
        ratio = len(data) / (4 * d)
        assert ratio <= 1.0 and ratio == plan.bits / 32, (plan, ratio)
    assert QuantizationPlan(clip_range=8.0, levels=2**22, bucket_size=100).bits / 32 == 0.9375
