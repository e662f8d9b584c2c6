"""X25519 key agreement and HKDF-SHA256 key derivation with domain separation.

Every derived key is bound to one protocol instance: the HKDF salt encodes the run id, the round
and the bucket (`instance_salt`), and the HKDF ``info`` names what the key is for, so a key
derived for share encryption can never equal a mask seed, and a mask seed of round 3 never
equals one of round 4, even when the same X25519 key pair were (wrongly) reused.

Public keys travel as ``PUBLIC_KEY_VERSION`` (one byte) followed by the 32 raw key bytes.
"""

from __future__ import annotations

import secrets
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols.errors import InvalidShare, MalformedMessage

#: First byte of a serialised X25519 public key (format version 1).
PUBLIC_KEY_VERSION = 0x82
#: Length of a raw X25519 key (public or private) and of every derived key.
KEY_BYTES = 32

#: HKDF ``info`` of the AES-256-GCM key that encrypts Shamir shares between two clients.
INFO_SHARE_ENCRYPTION = b"secure-fl/secagg/v1/share-encryption"
#: HKDF ``info`` of the PRG key of a pairwise mask (from the agreement of two mask key pairs).
INFO_PAIRWISE_MASK = b"secure-fl/secagg/v1/pairwise-mask"
#: HKDF ``info`` of the PRG key of a client's self mask (from its self-mask seed).
INFO_SELF_MASK = b"secure-fl/secagg/v1/self-mask"
#: HKDF ``info`` of the AES-256-GCM key that carries a round's secret HE context from the key
#: leader to one client (``[secure] mode = "bfv"`` / ``"ckks"``).
INFO_KEY_TRANSPORT = b"secure-fl/he/v1/key-transport"
PURPOSES = (INFO_SHARE_ENCRYPTION, INFO_PAIRWISE_MASK, INFO_SELF_MASK, INFO_KEY_TRANSPORT)

_SALT_PREFIX = b"secure-fl/secagg/v1/instance"
_MAX_U32 = 2**32 - 1


def instance_salt(*, run_id: str, round: int, bucket: int) -> bytes:
    """Encode one protocol instance (run, round, bucket) unambiguously as bytes.

    Layout: a fixed prefix, the UTF-8 run id with a 4-byte big-endian length in front, then the
    round and the bucket as 4-byte big-endian unsigned integers. The length prefix keeps
    ``("ab", ...)`` and ``("a", ...)`` apart whatever follows.

    Parameters
    ----------
    run_id : str
        The run's id (non-empty).
    round : int
        The round number, ``0 <= round < 2**32``.
    bucket : int
        The bucket index within the round, ``0 <= bucket < 2**32``.

    Returns
    -------
    bytes
        The encoding, used as HKDF salt and inside the AES-GCM associated data.
    """
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run_id must be a non-empty str, got {run_id!r}")
    raw = run_id.encode("utf-8")
    return _SALT_PREFIX + struct.pack(">I", len(raw)) + raw + struct.pack(
        ">II", _check_u32("round", round), _check_u32("bucket", bucket)
    )


def _check_u32(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_U32:
        raise ValueError(f"{name} must be an int in [0, 2**32), got {value!r}")
    return value


def generate_private_key() -> X25519PrivateKey:
    """Draw a fresh X25519 private key from `secrets` (32 random bytes, clamped by X25519)."""
    return X25519PrivateKey.from_private_bytes(secrets.token_bytes(KEY_BYTES))


def private_key_bytes(key: X25519PrivateKey) -> bytes:
    """Return the 32 raw bytes of a private key (what Shamir sharing splits)."""
    return key.private_bytes_raw()


def load_private_key(raw: bytes) -> X25519PrivateKey:
    """Load a private key from its 32 raw bytes (for example after Shamir reconstruction)."""
    if not isinstance(raw, bytes) or len(raw) != KEY_BYTES:
        raise MalformedMessage(f"X25519 private key must be {KEY_BYTES} bytes, got {_describe(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def public_key_to_bytes(key: X25519PublicKey) -> bytes:
    """Serialise a public key as ``PUBLIC_KEY_VERSION`` followed by its 32 raw bytes."""
    return bytes([PUBLIC_KEY_VERSION]) + key.public_bytes_raw()


def public_key_from_bytes(data: bytes) -> X25519PublicKey:
    """Parse a public key serialised by `public_key_to_bytes`, strictly.

    Raises
    ------
    MalformedMessage
        If ``data`` is not bytes, has the wrong length or the wrong version byte.
    """
    if not isinstance(data, bytes) or len(data) != 1 + KEY_BYTES:
        raise MalformedMessage(f"X25519 public key must be {1 + KEY_BYTES} bytes, got {_describe(data)}")
    if data[0] != PUBLIC_KEY_VERSION:
        raise MalformedMessage(
            f"X25519 public key has version byte 0x{data[0]:02x}, expected 0x{PUBLIC_KEY_VERSION:02x}"
        )
    return X25519PublicKey.from_public_bytes(data[1:])


def agree(private: X25519PrivateKey, peer: X25519PublicKey) -> bytes:
    """Return the 32-byte X25519 shared secret of ``private`` and ``peer``.

    Never use the result as a key directly: pass it to `derive_key`.

    Raises
    ------
    InvalidShare
        If the peer's key is a low-order point (the shared secret would be all zeros).
    """
    try:
        return private.exchange(peer)
    except ValueError as exc:  # OpenSSL refuses an all-zero shared secret
        raise InvalidShare(f"X25519 agreement failed, the peer's public key is a low-order point: {exc}") from exc


def derive_key(secret: bytes, *, purpose: bytes, run_id: str, round: int, bucket: int) -> bytes:
    """Derive a 32-byte key with HKDF-SHA256 for one purpose and one protocol instance.

    Parameters
    ----------
    secret : bytes
        32 bytes of input key material: an X25519 shared secret (`agree`) or a self-mask seed.
    purpose : bytes
        One of `INFO_SHARE_ENCRYPTION`, `INFO_PAIRWISE_MASK`, `INFO_SELF_MASK` (the HKDF ``info``).
    run_id, round, bucket
        The protocol instance, encoded by `instance_salt` as the HKDF salt.

    Returns
    -------
    bytes
        32 bytes: an AES-256-GCM key or a PRG key.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if not isinstance(secret, bytes) or len(secret) != KEY_BYTES:
        raise ValueError(f"input key material must be {KEY_BYTES} bytes, got {_describe(secret)}")
    salt = instance_salt(run_id=run_id, round=round, bucket=bucket)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=purpose).derive(secret)


def _describe(value: object) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    return type(value).__name__
