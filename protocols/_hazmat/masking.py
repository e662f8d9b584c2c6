"""Arithmetic modulo 2**b on integer vectors: adding self masks and antisymmetric pairwise masks.

Convention (the oracle of algorithms.md section 4): for a pair u != v the client with the lower
id *adds* the pairwise mask m_uv and the other one subtracts it, so the pair's masks cancel in
the sum. Ids only need a total order (ints, or strings compared as strings).

All arithmetic runs in uint64, whose wrap-around is arithmetic modulo 2**64; since 2**b divides
2**64, reducing modulo 2**b once at the end gives the exact result for every b <= 64.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from protocols._hazmat.prg import check_bits, word_dtype

Words = npt.NDArray[np.unsignedinteger]


class _Ordered(Protocol):
    def __lt__(self, other: object, /) -> bool: ...


Id = TypeVar("Id", bound=_Ordered)


def pairwise_sign(me: Id, peer: Id) -> int:
    """Return +1 if ``me`` adds the mask it shares with ``peer`` (``me < peer``), else -1."""
    if me == peer:
        raise ValueError(f"a client has no pairwise mask with itself ({me!r})")
    return 1 if me < peer else -1


def to_words(values: npt.ArrayLike, *, bits: int) -> Words:
    """Check that ``values`` are integers in ``[0, 2**bits)`` and return them as `word_dtype` words.

    Raises
    ------
    ValueError
        If the values are not integers, or one is negative or at least ``2**bits``.
    """
    dtype = word_dtype(bits)
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise ValueError(f"masked values must be integers, got dtype {array.dtype}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, 2**{bits}), got range [{array.min()}, {array.max()}]")
    return array.astype(dtype)


def add_masks(
    values: npt.ArrayLike,
    *,
    bits: int,
    me: Id | None = None,
    pairwise: Mapping[Id, npt.ArrayLike] | None = None,
    self_mask: npt.ArrayLike | None = None,
    sign: int = 1,
) -> Words:
    """Return ``values + sign * (self_mask + sum_v pairwise_sign(me, v) * pairwise[v]) mod 2**bits``.

    Parameters
    ----------
    values : array of int
        The quantised vector (or, on the server, a running sum), values in ``[0, 2**bits)``.
    bits : int
        The modulus exponent b, ``1 <= b <= 64``.
    me : id, optional
        This client's id; needed with ``pairwise``.
    pairwise : mapping of peer id to mask, optional
        The pairwise mask this client shares with each peer (same shape as ``values``).
    self_mask : array of int, optional
        The client's self mask.
    sign : {1, -1}
        +1 masks (a client); -1 removes the same masks (the server unmasking a sum: self masks
        of survivors, and each survivor's pairwise masks with dropped clients).

    Returns
    -------
    numpy.ndarray
        Same shape as ``values``, dtype `word_dtype` of ``bits``.
    """
    check_bits(bits)
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    base = to_words(values, bits=bits)
    acc = base.astype(np.uint64)
    terms: list[tuple[int, Words]] = []
    if self_mask is not None:
        terms.append((1, to_words(self_mask, bits=bits)))
    if pairwise:
        if me is None:
            raise ValueError("pairwise masks need the client's own id (me=)")
        terms.extend((pairwise_sign(me, peer), to_words(mask, bits=bits)) for peer, mask in pairwise.items())
    for term_sign, mask in terms:
        if mask.shape != base.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the values' shape {base.shape}")
        if term_sign * sign > 0:
            acc += mask.astype(np.uint64)
        else:
            acc -= mask.astype(np.uint64)
    return _reduce(acc, bits)


def modular_sum(rows: Iterable[npt.ArrayLike], *, bits: int) -> Words:
    """Sum integer vectors (each in ``[0, 2**bits)``) modulo ``2**bits``."""
    check_bits(bits)
    acc: npt.NDArray[np.uint64] | None = None
    for row in rows:
        words = to_words(row, bits=bits).astype(np.uint64)
        if acc is None:
            acc = words.copy()
        elif words.shape != acc.shape:
            raise ValueError(f"row shape {words.shape} differs from {acc.shape}")
        else:
            acc += words
    if acc is None:
        raise ValueError("modular_sum needs at least one row")
    return _reduce(acc, bits)


def _reduce(acc: npt.NDArray[np.uint64], bits: int) -> Words:
    if bits < 64:
        acc &= np.uint64((1 << bits) - 1)
    return acc.astype(word_dtype(bits))
