"""Arithmetic modulo 2**b on integer vectors: adding self masks and antisymmetric pairwise masks.

Convention (the oracle of algorithms.md section 4): for a pair u != v the client with the lower
id *adds* the pairwise mask m_uv and the other one subtracts it, so the pair's masks cancel in
the sum. Ids only need a total order (ints, or strings compared as strings).

`add_masks` and `modular_sum` run in uint64, whose wrap-around is arithmetic modulo 2**64; since
2**b divides 2**64, reducing modulo 2**b once at the end gives the exact result for every b <= 64.
`accumulate_masks`, the fast path, adds keystreams straight into a vector of `word_dtype` words
(arithmetic modulo 2**8, 2**16, 2**32 or 2**64, each a multiple of 2**b) chunk by chunk, and
reduces once at the end.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from protocols._hazmat.prg import BLOCK_BYTES, check_bits, keystream_cipher, word_dtype

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


#: Words per keystream chunk in `accumulate_masks`: 64 Ki words (256 KiB of uint32), so the chunk
#: of the sum and the keystream buffer stay in a core's cache while every mask is added to them.
CHUNK_WORDS = 1 << 16
#: Below this many mask words in all (vector length x masks, 2**25: about 128 MB of keystream for
#: 32-bit words), `accumulate_masks` uses one thread. A client's job (its self mask and k pairwise
#: masks) stays below it: on the busy 2-core machines of docs/performance.md a second thread saved
#: nothing there and sometimes cost a few ms; the server's (a self mask per survivor and the
#: dropped clients' pairwise masks) is far above it, and a second thread cut it by up to a third.
THREAD_MIN_WORDS = 1 << 25


def accumulate_masks(acc: Words, keys: Sequence[tuple[bytes, int]], *, bits: int, threads: int = 1) -> Words:
    """Add ``sign * mask_words(key, acc.size, bits=bits)`` for every ``(key, sign)`` to ``acc``, in place.

    The fast path of masking and unmasking: each mask's ChaCha20 keystream is written into one
    reusable buffer of `CHUNK_WORDS` words (``update_into``, no allocation per mask) and added to
    (or subtracted from) the matching chunk of ``acc`` with numpy, in the arithmetic of ``acc``'s
    dtype (modulo 2**8, 2**16, 2**32 or 2**64, a multiple of 2**bits); every chunk of ``acc`` takes
    all masks while it is in cache. Keystream words are in range by construction, so nothing is
    checked per mask. With ``threads > 1`` the vector is cut into contiguous ranges, one per
    thread, each entering every keystream at its own offset (`keystream_cipher`); the keystream
    and numpy calls release the GIL, so the threads run in parallel.

    Parameters
    ----------
    acc : numpy.ndarray
        Flat, C-contiguous, writeable, of dtype `word_dtype` of ``bits`` (values may be any words:
        the result is reduced modulo 2**bits at the end).
    keys : sequence of (bytes, int)
        32-byte PRG keys (from `derive_key`), each with its sign, +1 (add) or -1 (subtract).
    bits : int
        The modulus exponent b, ``1 <= b <= 64``.
    threads : int
        Threads to split the work over (>= 1); jobs below `THREAD_MIN_WORDS` words use one.

    Returns
    -------
    numpy.ndarray
        ``acc`` itself, every word reduced below ``2**bits``.

    Raises
    ------
    ValueError
        If ``acc`` has the wrong dtype or layout, a sign is not +-1 or ``threads`` < 1.
    """
    dtype = word_dtype(bits)
    if not isinstance(acc, np.ndarray) or acc.ndim != 1 or acc.dtype != dtype:
        raise ValueError(f"acc must be a flat numpy array of dtype {dtype} for {bits}-bit words")
    if not (acc.flags.c_contiguous and acc.flags.writeable):
        raise ValueError("acc must be C-contiguous and writeable")
    if any(sign not in (1, -1) for _, sign in keys):
        raise ValueError("every mask's sign must be +1 or -1")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    count = acc.size
    if keys and count:
        # Thread ranges start on keystream block boundaries (64 bytes: 64 // width words).
        unit = BLOCK_BYTES // dtype.itemsize
        units = -(-count // unit)
        parts = max(1, min(threads, units)) if count * len(keys) >= THREAD_MIN_WORDS else 1
        bounds = [min(count, (units * i // parts) * unit) for i in range(parts + 1)]
        ranges = list(itertools.pairwise(bounds))
        if parts == 1:
            _accumulate_range(acc, keys, *ranges[0])
        else:
            with ThreadPoolExecutor(max_workers=parts) as pool:
                for done in [pool.submit(_accumulate_range, acc, keys, lo, hi) for lo, hi in ranges]:
                    done.result()
    if bits < 8 * dtype.itemsize:
        acc &= dtype.type((1 << bits) - 1)
    return acc


def _accumulate_range(acc: Words, keys: Sequence[tuple[bytes, int]], lo: int, hi: int) -> None:
    """`accumulate_masks` on ``acc[lo:hi]``; ``lo`` is a keystream block boundary."""
    width = acc.dtype.itemsize
    assert (lo * width) % BLOCK_BYTES == 0
    ciphers = [(keystream_cipher(key, offset=lo * width), sign > 0) for key, sign in keys]
    buffer = np.empty(min(CHUNK_WORDS, hi - lo), dtype=acc.dtype)
    raw = buffer.data.cast("B")
    zeros = memoryview(bytes(buffer.nbytes))
    swap = sys.byteorder != "little" and width > 1
    for start in range(lo, hi, CHUNK_WORDS):
        n = min(CHUNK_WORDS, hi - start)
        target, words, nbytes = acc[start : start + n], buffer[:n], n * width
        for cipher, add in ciphers:
            cipher.update_into(zeros[:nbytes], raw[:nbytes])
            if swap:  # pragma: no cover - big-endian hosts only: the keystream is read little-endian
                words.byteswap(inplace=True)
            if add:
                np.add(target, words, out=target)
            else:
                np.subtract(target, words, out=target)


def _reduce(acc: npt.NDArray[np.uint64], bits: int) -> Words:
    if bits < 64:
        acc &= np.uint64((1 << bits) - 1)
    return acc.astype(word_dtype(bits))
