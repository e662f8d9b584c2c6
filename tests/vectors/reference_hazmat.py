"""Independent reference implementations that check tests/vectors/hazmat.json.

Written from the RFCs in plain Python, sharing no code with protocols._hazmat: X25519 (RFC 7748
Montgomery ladder), HKDF-SHA256 (RFC 5869 with the standard library's hmac), the ChaCha20 block
function (RFC 8439), the instance/route encodings, and Lagrange interpolation at 0. Slow, and
only for tests.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

P25519 = 2**255 - 19
SHAMIR_PRIME = 2**256 + 297


def x25519(scalar: bytes, u_bytes: bytes) -> bytes:
    """RFC 7748 section 5: scalar multiplication on Curve25519 (u-coordinate only)."""
    k = bytearray(scalar)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    n = int.from_bytes(k, "little")
    u = int.from_bytes(u_bytes, "little") & ((1 << 255) - 1)
    x1, x2, z2, x3, z3, swap = u, 1, 0, u, 1, 0
    for t in reversed(range(255)):
        bit = (n >> t) & 1
        swap ^= bit
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = bit
        a, b = (x2 + z2) % P25519, (x2 - z2) % P25519
        aa, bb = a * a % P25519, b * b % P25519
        e = (aa - bb) % P25519
        c, d = (x3 + z3) % P25519, (x3 - z3) % P25519
        da, cb = d * a % P25519, c * b % P25519
        x3 = (da + cb) ** 2 % P25519
        z3 = x1 * (da - cb) ** 2 % P25519
        x2 = aa * bb % P25519
        z2 = e * (aa + 121665 * e) % P25519
    if swap:
        x2, z2 = x3, z3
    return (x2 * pow(z2, P25519 - 2, P25519) % P25519).to_bytes(32, "little")


def x25519_public(scalar: bytes) -> bytes:
    return x25519(scalar, (9).to_bytes(32, "little"))


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 extract-then-expand."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def instance_salt(run_id: str, rnd: int, bucket: int) -> bytes:
    """The layout documented in docs/secure-aggregation.md, written out again."""
    raw = run_id.encode("utf-8")
    return b"secure-fl/secagg/v1/instance" + len(raw).to_bytes(4, "big") + raw + rnd.to_bytes(4, "big") + \
        bucket.to_bytes(4, "big")


def share_aad(route: dict[str, object]) -> bytes:
    sender = str(route["sender"]).encode()
    receiver = str(route["receiver"]).encode()
    return (b"secure-fl/secagg/v1/share" + instance_salt(str(route["run_id"]), int(str(route["round"])),
                                                           int(str(route["bucket"])))
            + len(sender).to_bytes(4, "big") + sender + len(receiver).to_bytes(4, "big") + receiver)


def _rotl(v: int, c: int) -> int:
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def _quarter(s: list[int], a: int, b: int, c: int, d: int) -> None:
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & 0xFFFFFFFF
    s[d] = _rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & 0xFFFFFFFF
    s[b] = _rotl(s[b] ^ s[c], 7)


def chacha20_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    """RFC 8439 section 2.3: one 64-byte keystream block."""
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *struct.unpack("<8I", key), counter,
             *struct.unpack("<3I", nonce)]
    work = list(state)
    for _ in range(10):
        _quarter(work, 0, 4, 8, 12)
        _quarter(work, 1, 5, 9, 13)
        _quarter(work, 2, 6, 10, 14)
        _quarter(work, 3, 7, 11, 15)
        _quarter(work, 0, 5, 10, 15)
        _quarter(work, 1, 6, 11, 12)
        _quarter(work, 2, 7, 8, 13)
        _quarter(work, 3, 4, 9, 14)
    return struct.pack("<16I", *((w + s) & 0xFFFFFFFF for w, s in zip(work, state)))


def mask_words(key: bytes, count: int, bits: int) -> list[int]:
    """Keystream (counter 0, zero nonce) read as little-endian words of 8/16/32/64 bits, low ``bits`` kept."""
    width = next(w for w in (8, 16, 32, 64) if bits <= w) // 8
    stream = b""
    block = 0
    while len(stream) < count * width:
        stream += chacha20_block(key, block, bytes(12))
        block += 1
    return [int.from_bytes(stream[i * width:(i + 1) * width], "little") % (1 << bits) for i in range(count)]


def lagrange_at_zero(points: list[tuple[int, int]]) -> int:
    """f(0) of the polynomial of degree < len(points) through ``points``, modulo the Shamir prime."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if i != j:
                term = term * xj * pow(xj - xi, -1, SHAMIR_PRIME)
        total += term
    return total % SHAMIR_PRIME


def parse_share(data: bytes) -> tuple[int, int, list[int]]:
    """(threshold, x, values) of a serialised share: 0x81, t, x (2 bytes BE), m, m x 33-byte values."""
    assert data[0] == 0x81
    t, x, m = data[1], int.from_bytes(data[2:4], "big"), data[4]
    assert len(data) == 5 + 33 * m
    return t, x, [int.from_bytes(data[5 + 33 * i:5 + 33 * (i + 1)], "big") for i in range(m)]
