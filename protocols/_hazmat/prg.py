"""The mask PRG: a ChaCha20 keystream read as little-endian b-bit words.

A mask of ``count`` words modulo ``2**bits`` is the ChaCha20 keystream under the full 256-bit
key (counter 0, all-zero nonce), read as little-endian unsigned words of 8, 16, 32 or 64 bits
(the smallest that holds ``bits``), each masked to its low ``bits`` bits. Every word is then
exactly uniform on ``[0, 2**bits)`` (no ``randint``-style bias), and the whole mask is one
keystream call plus one numpy view.

The all-zero nonce is safe because each key is used for one mask only: `derive_key` binds it to
the run, round, bucket and purpose. Never pass the same key twice for different data.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms

from protocols._hazmat.keys import KEY_BYTES

#: ChaCha20's 16-byte nonce as `cryptography` takes it: 4-byte little-endian counter, 12-byte nonce.
_NONCE = bytes(16)
#: Bytes of one ChaCha20 block: a keystream can be entered at any multiple of it (`keystream_cipher`).
BLOCK_BYTES = 64
#: ChaCha20 with a 32-bit block counter gives at most 2**32 blocks of 64 bytes per key.
MAX_KEYSTREAM_BYTES = 2**32 * BLOCK_BYTES
MAX_BITS = 64

_DTYPES: tuple[tuple[int, type[np.unsignedinteger]], ...] = (
    (8, np.uint8), (16, np.uint16), (32, np.uint32), (64, np.uint64),
)


def word_dtype(bits: int) -> np.dtype[np.unsignedinteger]:
    """Return the unsigned dtype (8, 16, 32 or 64 bits) that holds values modulo ``2**bits``."""
    check_bits(bits)
    for width, dtype in _DTYPES:
        if bits <= width:
            return np.dtype(dtype)
    raise AssertionError("unreachable")  # pragma: no cover


def check_bits(bits: int) -> int:
    """Refuse a modulus exponent outside ``1..64`` (or a bool)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")
    return bits


def keystream(key: bytes, nbytes: int) -> bytearray:
    """Return the first ``nbytes`` bytes of the ChaCha20 keystream under ``key``."""
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"PRG key must be {KEY_BYTES} bytes (a full 256-bit key)")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes <= MAX_KEYSTREAM_BYTES:
        raise ValueError(f"keystream length must be an int in [0, {MAX_KEYSTREAM_BYTES}], got {nbytes!r}")
    out = bytearray(nbytes)
    if nbytes:
        encryptor = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()
        # Encrypting zeros in place yields the keystream without a second buffer.
        encryptor.update_into(out, out)
    return out


def keystream_cipher(key: bytes, *, offset: int = 0) -> CipherContext:
    """Return an encryptor whose output on zero bytes is `keystream` of ``key`` from byte ``offset`` on.

    The same ChaCha20 keystream as `keystream` (full 256-bit key, all-zero 12-byte nonce), entered
    at block ``offset // 64``: `cryptography` takes the block counter as the first 4 bytes
    (little-endian) of its 16-byte nonce, which `keystream` leaves at 0. Feed it zeros with
    ``update_into`` to fill a reusable buffer chunk by chunk, or start several at different offsets
    to expand one mask on several threads (the keystream call releases the GIL).

    Parameters
    ----------
    key : bytes
        A 32-byte PRG key from `derive_key`.
    offset : int
        Where to enter the keystream, in bytes: a multiple of `BLOCK_BYTES` below `MAX_KEYSTREAM_BYTES`.

    Raises
    ------
    ValueError
        If the key is not 32 bytes or ``offset`` is not a block boundary inside the keystream.
    """
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"PRG key must be {KEY_BYTES} bytes (a full 256-bit key)")
    if (isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < MAX_KEYSTREAM_BYTES
            or offset % BLOCK_BYTES):
        raise ValueError(f"keystream offset must be a multiple of {BLOCK_BYTES} in [0, {MAX_KEYSTREAM_BYTES}), got {offset!r}")
    nonce = (offset // BLOCK_BYTES).to_bytes(4, "little") + _NONCE[4:]
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()


def mask_words(key: bytes, count: int, *, bits: int) -> npt.NDArray[np.unsignedinteger]:
    """Expand ``key`` into ``count`` uniform words modulo ``2**bits``.

    Parameters
    ----------
    key : bytes
        A 32-byte PRG key from `derive_key` (``INFO_PAIRWISE_MASK`` or ``INFO_SELF_MASK``).
    count : int
        Number of words (the length of the flattened vector to mask).
    bits : int
        The modulus exponent b, ``1 <= b <= 64``.

    Returns
    -------
    numpy.ndarray
        Shape ``(count,)``, dtype `word_dtype` of ``bits``, every value below ``2**bits``.
    """
    dtype = word_dtype(bits)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    stream = keystream(key, count * dtype.itemsize)
    words = np.frombuffer(stream, dtype=dtype.newbyteorder("<"))
    if not words.dtype.isnative:  # pragma: no cover - big-endian hosts only
        words = words.astype(dtype)
    if bits < 8 * dtype.itemsize:
        words &= dtype.type((1 << bits) - 1)
    return words
