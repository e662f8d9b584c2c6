"""Shamir t-of-k secret sharing of 32-byte secrets over the prime field GF(p), p = 2**256 + 297.

Why this field: a 32-byte secret (a self-mask seed, or an X25519 mask private key) read as a
big-endian integer is below 2**256 < p, so it is one field element and the mapping is injective;
no chunking is needed (Flower splits into 16-byte chunks over GF(2**128) instead). p is the
smallest prime above 2**256, so a share value takes 33 bytes, the least any prime field that
holds every 256-bit secret allows (2**521 - 1 would take 66). Python integers do the arithmetic.

Vectorised over secrets: `ShamirScheme.split` shares ``m`` secrets with one call (one random
polynomial each, evaluated at x = 1..k as a ``(k, t) @ (t, m)`` product over numpy object
arrays), and `ShamirScheme.combine` computes the Lagrange weights at 0 once for the given
x-coordinates and applies them to all ``m`` secrets. Coefficients come from `secrets`.

A share travels as ``SHARE_VERSION`` (1 byte), the threshold t (1 byte), the x-coordinate
(2 bytes, big-endian), the number of secrets m (1 byte), then m values of 33 bytes (big-endian).
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from protocols.errors import InvalidShare, MalformedMessage

#: The field's prime: the smallest prime above 2**256.
PRIME = 2**256 + 297
#: Length of a secret and of one share value on the wire.
SECRET_BYTES = 32
VALUE_BYTES = 33
#: First byte of a serialised share (format version 1).
SHARE_VERSION = 0x81
#: x-coordinates are 1..MAX_SHARES (x = 0 would be the secret itself).
MAX_SHARES = 2**16 - 1
MAX_THRESHOLD = 255
MAX_SECRETS = 255
_HEADER = struct.Struct(">BBHB")


@dataclass(frozen=True)
class Share:
    """One holder's share of ``len(values)`` secrets: the points ``(x, values[i])``.

    Parameters
    ----------
    x : int
        The x-coordinate, ``1 <= x <= 65535`` (never 0).
    threshold : int
        The t of the scheme that made it (so reconstruction can refuse too few shares).
    values : tuple of int
        One field element per secret, each in ``[0, PRIME)``.
    """

    x: int
    threshold: int
    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.x <= MAX_SHARES:
            raise MalformedMessage(f"share x-coordinate must be in [1, {MAX_SHARES}], got {self.x}")
        if not 1 <= self.threshold <= MAX_THRESHOLD:
            raise MalformedMessage(f"share threshold must be in [1, {MAX_THRESHOLD}], got {self.threshold}")
        if not 1 <= len(self.values) <= MAX_SECRETS:
            raise MalformedMessage(f"a share carries 1..{MAX_SECRETS} values, got {len(self.values)}")
        if any(not 0 <= v < PRIME for v in self.values):
            raise MalformedMessage(f"share x={self.x} has a value outside the field [0, p)")

    def select(self, index: int) -> Share:
        """Return the share of secret ``index`` alone (to reveal one secret and not the other)."""
        return Share(self.x, self.threshold, (self.values[index],))

    def to_bytes(self) -> bytes:
        """Serialise as ``SHARE_VERSION || t || x || m || values``."""
        head = _HEADER.pack(SHARE_VERSION, self.threshold, self.x, len(self.values))
        return head + b"".join(v.to_bytes(VALUE_BYTES, "big") for v in self.values)

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse a share strictly: version, length and every field are checked.

        Raises
        ------
        MalformedMessage
            On a wrong type, version byte or length, or a field out of range.
        """
        if not isinstance(data, bytes) or len(data) < _HEADER.size:
            got = f"{len(data)} bytes" if isinstance(data, bytes) else type(data).__name__
            raise MalformedMessage(f"share must be at least {_HEADER.size} bytes, got {got}")
        version, threshold, x, count = _HEADER.unpack_from(data)
        if version != SHARE_VERSION:
            raise MalformedMessage(f"share has version byte 0x{version:02x}, expected 0x{SHARE_VERSION:02x}")
        expected = _HEADER.size + count * VALUE_BYTES
        if len(data) != expected:
            raise MalformedMessage(f"share with {count} values must be {expected} bytes, got {len(data)}")
        values = tuple(
            int.from_bytes(data[i : i + VALUE_BYTES], "big") for i in range(_HEADER.size, expected, VALUE_BYTES)
        )
        return cls(x, threshold, values)


@dataclass(frozen=True)
class ShamirScheme:
    """t-of-k Shamir sharing: any ``threshold`` of the ``shares`` shares give the secrets back.

    Parameters
    ----------
    threshold : int
        t, the number of shares needed, ``1 <= t <= k``. (t = 1 means every share *is* the
        secret; protocols should refuse it, the primitive allows it.)
    shares : int
        k, the number of shares made (one per neighbour), ``k <= 65535``.
    """

    threshold: int
    shares: int

    def __post_init__(self) -> None:
        _check_params(self.threshold, self.shares)

    def split(self, secrets_: Sequence[bytes]) -> list[Share]:
        """Share each 32-byte secret; return k shares with x = 1..k, each holding m values."""
        _check_params(self.threshold, self.shares)
        values = _secrets_to_ints(secrets_)
        coefficients = [[secrets.randbelow(PRIME) for _ in values] for _ in range(self.threshold - 1)]
        return self._evaluate([values, *coefficients])

    def _evaluate(self, coefficients: list[list[int]]) -> list[Share]:
        """Evaluate the polynomials (row i = coefficient of x**i, one column per secret) at 1..k."""
        if len(coefficients) != self.threshold:
            raise ValueError(f"need {self.threshold} coefficient rows, got {len(coefficients)}")
        coeffs = np.array(coefficients, dtype=object)  # (t, m)
        xs = list(range(1, self.shares + 1))
        powers = np.array([[pow(x, i, PRIME) for i in range(self.threshold)] for x in xs], dtype=object)
        ys = (powers @ coeffs) % PRIME  # (k, m) Python ints
        return [Share(x, self.threshold, tuple(int(v) for v in row)) for x, row in zip(xs, ys)]

    def combine(self, shares: Sequence[Share]) -> list[bytes]:
        """Reconstruct the m secrets from at least t shares (Lagrange interpolation at 0).

        Interpolates through the first t shares and checks that every further share lies on
        the same polynomials; all must come from a scheme with this threshold.

        Raises
        ------
        InvalidShare
            On fewer than t shares, duplicate x-coordinates, shares made with another threshold,
            shares of different numbers of secrets, a share beyond the first t that disagrees
            with them, or a result that is not a 32-byte secret.
        """
        _check_params(self.threshold, self.shares)
        return combine(shares, threshold=self.threshold)


def combine(shares: Sequence[Share], *, threshold: int) -> list[bytes]:
    """Reconstruct secrets from at least ``threshold`` shares; see `ShamirScheme.combine`."""
    if len(shares) < threshold:
        raise InvalidShare(f"need at least {threshold} shares to reconstruct, got {len(shares)}")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise InvalidShare(f"duplicate share x-coordinates in {sorted(xs)}")
    if any(s.threshold != threshold for s in shares):
        raise InvalidShare(f"shares made with thresholds {sorted({s.threshold for s in shares})}, expected {threshold}")
    if len({len(s.values) for s in shares}) != 1:
        raise InvalidShare("shares hold different numbers of secrets")
    used = [s.x for s in shares[:threshold]]
    ys = np.array([s.values for s in shares[:threshold]], dtype=object)  # (t, m)
    for extra in shares[threshold:]:
        expected = (np.array(_lagrange_weights(used, at=extra.x), dtype=object) @ ys) % PRIME
        if tuple(int(v) for v in expected) != extra.values:
            raise InvalidShare(f"share x={extra.x} is inconsistent with the shares at x={used}")
    result = (np.array(_lagrange_weights(used, at=0), dtype=object) @ ys) % PRIME
    out = []
    for value in result:
        if int(value) >= 2 ** (8 * SECRET_BYTES):
            raise InvalidShare("reconstructed value is not a 32-byte secret: the shares are inconsistent")
        out.append(int(value).to_bytes(SECRET_BYTES, "big"))
    return out


def _lagrange_weights(xs: Sequence[int], *, at: int) -> list[int]:
    """Weights w_i with f(at) = sum_i w_i f(x_i) mod p for every polynomial of degree < len(xs)."""
    weights = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        weights.append(num * pow(den, -1, PRIME) % PRIME)
    return weights


def _secrets_to_ints(items: Sequence[bytes]) -> list[int]:
    if isinstance(items, (bytes, bytearray)):
        raise TypeError("split takes a sequence of secrets; wrap a single secret in a list")
    if not 1 <= len(items) <= MAX_SECRETS:
        raise ValueError(f"share 1..{MAX_SECRETS} secrets at once, got {len(items)}")
    for index, item in enumerate(items):
        if not isinstance(item, bytes) or len(item) != SECRET_BYTES:
            raise ValueError(f"secret {index} must be {SECRET_BYTES} bytes")
    return [int.from_bytes(item, "big") for item in items]


def _check_params(threshold: int, shares: int) -> None:
    for name, value in (("threshold", threshold), ("shares", shares)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not 1 <= shares <= MAX_SHARES:
        raise ValueError(f"shares (k) must be in [1, {MAX_SHARES}], got {shares}")
    if not 1 <= threshold <= min(shares, MAX_THRESHOLD):
        raise ValueError(f"threshold (t) must be in [1, k={shares}] (and at most {MAX_THRESHOLD}), got {threshold}")
