"""Tight bit packing of ``b``-bit words for masked uploads (``b`` in 1..32).

Wire format: word ``i`` occupies bits ``[i * b, (i + 1) * b)`` of the byte string, least
significant bit first (bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``); the last byte
is padded with zero bits. ``count`` words take exactly ``ceil(count * b / 8)`` bytes, so a 30-bit
upload is 0.9375x its float32 size and no plan (``b <= 32``) exceeds 1.0x.

Packing is a transport encoding only: the server unpacks every upload and adds the words mod
``2^b`` (`protocols.secagg.quantize.modular_sum`); packed bytes are never added.

Vectorised with `numpy.unpackbits` / `numpy.packbits` on the little-endian byte view of the words;
the only Python loop is over blocks of `BLOCK` words, which bounds temporary memory to ~32 MiB.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from protocols.errors import MalformedMessage

#: Words handled per block; a multiple of 8, so every block ends on a byte boundary for any ``b``.
BLOCK = 1 << 20


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 32:
        raise ValueError(f"bits must be an integer in [1, 32], got {bits!r}")
    return int(bits)


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` words of ``bits`` bits take once packed: ``ceil(count * bits / 8)``.

    Examples
    --------
    >>> packed_size(1_000_000, 30)
    3750000
    """
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    return (int(count) * _check_bits(bits) + 7) // 8


def pack_words(words: ArrayLike, bits: int) -> bytes:
    """Pack unsigned words below ``2^bits`` into ``ceil(len * bits / 8)`` bytes.

    Parameters
    ----------
    words
        Flat array of non-negative integers, each below ``2^bits``.
    bits
        Word size in ``[1, 32]``.

    Returns
    -------
    bytes
        The packed stream (see the module docstring for the layout).

    Raises
    ------
    ValueError
        If ``bits`` is out of range, ``words`` is not a flat integer array or a word does not fit.

    Examples
    --------
    >>> pack_words([1, 2, 3, 4, 5], 3).hex()
    'd158'
    """
    b = _check_bits(bits)
    arr = np.asarray(words)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "ui"):
        raise ValueError(f"pack_words takes a flat integer array, got {arr.dtype} {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 1 << b):
        raise ValueError(f"words must lie in [0, 2^{b}); got range [{int(arr.min())}, {int(arr.max())}]")
    le = arr.astype("<u4")
    out = []
    for start in range(0, le.size, BLOCK):
        block = le[start : start + BLOCK]
        stream = np.unpackbits(block.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        out.append(np.packbits(stream[:, :b], bitorder="little").tobytes())
    return b"".join(out)


def unpack_words(data: bytes, bits: int, count: int) -> NDArray[np.uint32]:
    """Inverse of `pack_words`: read ``count`` words of ``bits`` bits, strictly.

    Parameters
    ----------
    data
        Exactly ``packed_size(count, bits)`` bytes.
    bits
        Word size in ``[1, 32]``.
    count
        Number of words expected.

    Returns
    -------
    numpy.ndarray
        ``uint32`` words, each below ``2^bits``.

    Raises
    ------
    MalformedMessage
        If ``data`` has the wrong length or its padding bits are not zero.
    ValueError
        If ``bits`` or ``count`` is invalid.
    """
    b = _check_bits(bits)
    size = packed_size(count, b)
    raw = np.frombuffer(memoryview(data), dtype=np.uint8)
    if raw.size != size:
        raise MalformedMessage(f"packed upload of {count} {b}-bit words must be {size} bytes, got {raw.size}")
    tail = (count * b) % 8
    if tail and int(raw[-1]) >> tail:
        raise MalformedMessage(f"packed upload has non-zero padding bits in its last byte ({int(raw[-1]):#04x})")
    words = np.empty(count, dtype="<u4")
    block_bytes = BLOCK * b // 8
    for index, start in enumerate(range(0, count, BLOCK)):
        n = min(BLOCK, count - start)
        chunk = raw[index * block_bytes : index * block_bytes + packed_size(n, b)]
        bits_of = np.unpackbits(chunk, count=n * b, bitorder="little").reshape(n, b)
        full = np.zeros((n, 32), dtype=np.uint8)
        full[:, :b] = bits_of
        words[start : start + n] = np.packbits(full, axis=1, bitorder="little").view("<u4").ravel()
    return words.astype(np.uint32, copy=False)
