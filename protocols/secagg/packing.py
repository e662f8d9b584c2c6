"""Tight bit packing of ``b``-bit words for masked uploads (``b`` in 1..32).

Wire format: word ``i`` occupies bits ``[i * b, (i + 1) * b)`` of the byte string, least
significant bit first (bit ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``); the last byte
is padded with zero bits. ``count`` words take exactly ``ceil(count * b / 8)`` bytes, so a 30-bit
upload is 0.9375x its float32 size and no plan (``b <= 32``) exceeds 1.0x.

Packing is a transport encoding only: the server unpacks every upload and adds the words mod
``2^b`` (`protocols.secagg.quantize.modular_sum`); packed bytes are never added.

Vectorised on groups of 8 words: 8 words of ``b`` bits are exactly ``b`` bytes, so word ``j`` of
every group starts at the same byte offset ``j * b // 8`` and bit shift ``j * b % 8`` of its group.
Packing ORs each of the 8 columns, shifted, into 4 little-endian ``uint64`` lanes per group (256
bits hold the ``8 * b <= 256`` bits) and keeps each group's first ``b`` bytes; unpacking reads each
column as unaligned little-endian ``uint64`` words at a stride of ``b`` bytes (a word and its shift
span at most 39 bits), shifts and masks it. Word sizes 8, 16 and 32 are plain casts. The Python
loops are over the 8 columns and over blocks of `BLOCK` words, which keep temporaries in cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.typing import ArrayLike, NDArray

from protocols.errors import MalformedMessage

#: Words handled per block; a multiple of 8, so every block ends on a byte boundary for any ``b``.
BLOCK = 1 << 18
#: Words per group: 8 words of ``b`` bits fill exactly ``b`` bytes.
GROUP = 8
_PLAIN = {8: "<u1", 16: "<u2", 32: "<u4"}


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
    if b in _PLAIN:
        return arr.astype(_PLAIN[b]).tobytes()
    out = bytearray(packed_size(arr.size, b))
    for start in range(0, arr.size, BLOCK):
        block = arr[start : start + BLOCK]
        out[start * b // 8 : start * b // 8 + packed_size(block.size, b)] = _pack_block(block, b)
    return bytes(out)


def _pack_block(block: NDArray[np.integer], b: int) -> bytes:
    """Pack one block of words (checked, below ``2^b``) into ``packed_size(len(block), b)`` bytes."""
    groups = -(-block.size // GROUP)
    columns = np.zeros(groups * GROUP, dtype=np.uint64)
    columns[: block.size] = block
    columns = np.ascontiguousarray(columns.reshape(groups, GROUP).T)  # row j: word j of every group
    lanes = np.zeros((4, groups), dtype=np.uint64)  # 256 bits per group, lane-major
    shifted = np.empty(groups, dtype=np.uint64)
    for j in range(GROUP):
        lane, shift = divmod(j * b, 64)
        np.left_shift(columns[j], np.uint64(shift), out=shifted)
        lanes[lane] |= shifted
        if shift + b > 64:
            np.right_shift(columns[j], np.uint64(64 - shift), out=shifted)
            lanes[lane + 1] |= shifted
    grouped = np.ascontiguousarray(lanes.T).astype("<u8", copy=False).view(np.uint8)  # (groups, 32) bytes
    return grouped[:, :b].tobytes()[: packed_size(block.size, b)]


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
    words = PackedSum(bits, count)
    words.add(data)
    return words.total()


def check_packed(data: bytes | memoryview | NDArray[np.uint8], bits: int, count: int) -> NDArray[np.uint8]:
    """Return ``data`` as a flat ``uint8`` array if it is a well-formed packing of ``count`` words.

    Raises
    ------
    MalformedMessage
        If ``data`` is not ``packed_size(count, bits)`` bytes or its padding bits are not zero.
    """
    b = _check_bits(bits)
    size = packed_size(count, b)
    if isinstance(data, np.ndarray):
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        raw = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    if raw.size != size:
        raise MalformedMessage(f"packed upload of {count} {b}-bit words must be {size} bytes, got {raw.size}")
    tail = (int(count) * b) % 8
    if tail and int(raw[-1]) >> tail:
        raise MalformedMessage(f"packed upload has non-zero padding bits in its last byte ({int(raw[-1]):#04x})")
    return raw


class PackedSum:
    """The sum modulo ``2^bits`` of packed uploads of ``count`` words, without one array per upload.

    `add` checks an upload (`check_packed`), then unpacks it column by column straight into a
    running ``uint64`` sum kept in the packed groups' column order (word ``j`` of every group of 8
    in row ``j``). A column is read as unaligned 64-bit words shifted right to the word's first
    bit; the bits above the word are those of the next words, i.e. a multiple of ``2^b``, so they
    are not masked off per upload: the sum is exact modulo ``2^64``, hence modulo ``2^b``, and
    `total` reduces it and restores word order once. `add_many` splits many uploads over threads
    (numpy releases the GIL in its loops), each summing its share, then adds the partial sums.

    Examples
    --------
    >>> total = PackedSum(3, 5)
    >>> total.add(pack_words([1, 2, 3, 4, 5], 3)); total.add(pack_words([7, 7, 7, 7, 7], 3))
    >>> total.total().tolist()
    [0, 1, 2, 3, 4]
    """

    def __init__(self, bits: int, count: int) -> None:
        self.bits = _check_bits(bits)
        self.count = int(count)
        self.size = packed_size(self.count, self.bits)
        self.added = 0
        # Plain sizes sum in word order; the others per column j (word j of every group of 8).
        shape = (self.count,) if self.bits in _PLAIN else (GROUP, -(-self.count // GROUP))
        self._sum = np.zeros(shape, dtype=np.uint64)

    def add(self, data: bytes | memoryview | NDArray[np.uint8]) -> None:
        """Add one packed upload; refuse it (adding nothing) if its length or padding is wrong.

        Raises
        ------
        MalformedMessage
            As `check_packed`.
        """
        self._add(check_packed(data, self.bits, self.count))

    def add_many(self, uploads: Sequence[bytes | memoryview | NDArray[np.uint8]], *, threads: int = 1) -> None:
        """Add every upload, on up to ``threads`` threads; if one is malformed, add none of them.

        Raises
        ------
        MalformedMessage
            As `check_packed`, for the first malformed upload (before anything is added).
        """
        raws = [check_packed(data, self.bits, self.count) for data in uploads]
        parts = max(1, min(int(threads), len(raws)))
        if parts == 1:
            for raw in raws:
                self._add(raw)
            return
        partial = [self] + [PackedSum(self.bits, self.count) for _ in range(parts - 1)]

        def work(index: int) -> None:
            for raw in raws[index::parts]:
                partial[index]._add(raw)

        with ThreadPoolExecutor(max_workers=parts) as pool:
            for done in [pool.submit(work, i) for i in range(parts)]:
                done.result()
        for other in partial[1:]:
            self._sum += other._sum
            self.added += other.added

    def _add(self, raw: NDArray[np.uint8]) -> None:
        """Add one checked upload."""
        b = self.bits
        self.added += 1
        if b in _PLAIN:
            np.add(self._sum, raw.view(_PLAIN[b]), out=self._sum, casting="unsafe")
            return
        block_groups = BLOCK // GROUP
        groups = self._sum.shape[1]
        word = np.empty(min(block_groups, groups), dtype=np.uint64)
        for first in range(0, groups, block_groups):
            n = min(block_groups, groups - first)
            source, base = raw, first * b
            if base + n * b + 8 > raw.size:  # the last block: its reads run up to 8 bytes past the data
                source, base = np.zeros(n * b + 8, dtype=np.uint8), 0
                source[: raw.size - first * b] = raw[first * b :]
            for j in range(GROUP):
                offset, shift = divmod(j * b, 8)
                column = np.ndarray((n,), dtype="<u8", buffer=source, offset=base + offset, strides=(b,))
                np.right_shift(column, np.uint64(shift), out=word[:n])
                target = self._sum[j, first : first + n]
                np.add(target, word[:n], out=target)

    def total(self) -> NDArray[np.uint32]:
        """The sum so far modulo ``2^bits``, in word order (``count`` ``uint32`` words)."""
        flat = self._sum if self.bits in _PLAIN else self._sum.T.reshape(-1)[: self.count]
        out = flat.astype(np.uint32)  # modulo 2^32, a multiple of 2^bits
        if self.bits < 32:
            out &= np.uint32((1 << self.bits) - 1)
        return out
