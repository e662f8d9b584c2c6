"""AES-256-GCM for Shamir shares that the server routes from one client to another.

The server relays these ciphertexts and must learn nothing from them, nor be able to move one to
another receiver, round or bucket: the associated data binds the protocol instance (run, round,
bucket), the sender and the receiver, and decryption with any other binding fails.

Ciphertexts travel as ``CIPHERTEXT_VERSION`` (one byte), a 12-byte random nonce from `secrets`,
then the GCM ciphertext with its 16-byte tag.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocols._hazmat.keys import KEY_BYTES, instance_salt
from protocols.errors import InvalidShare, MalformedMessage

#: First byte of a serialised share ciphertext (format version 1).
CIPHERTEXT_VERSION = 0x83
#: Length of the random GCM nonce (96 bits).
NONCE_BYTES = 12
#: Length of the GCM tag.
TAG_BYTES = 16

_AAD_PREFIX = b"secure-fl/secagg/v1/share"


@dataclass(frozen=True)
class ShareRoute:
    """Where one encrypted share belongs: its protocol instance, sender and receiver.

    Parameters
    ----------
    run_id : str
        The run's id.
    round : int
        The round number.
    bucket : int
        The bucket index within the round.
    sender : str
        The client id of the share's owner (who encrypts).
    receiver : str
        The client id of the neighbour who holds the share (who decrypts).
    """

    run_id: str
    round: int
    bucket: int
    sender: str
    receiver: str

    def __post_init__(self) -> None:
        for name in ("sender", "receiver"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty client id, got {value!r}")
        if self.sender == self.receiver:
            raise ValueError(f"a share is never encrypted to its own sender ({self.sender!r})")
        instance_salt(run_id=self.run_id, round=self.round, bucket=self.bucket)  # validates

    def associated_data(self) -> bytes:
        """Encode the route unambiguously (length-prefixed fields) as GCM associated data."""
        parts = [_AAD_PREFIX, instance_salt(run_id=self.run_id, round=self.round, bucket=self.bucket)]
        for client in (self.sender, self.receiver):
            raw = client.encode("utf-8")
            parts.append(struct.pack(">I", len(raw)) + raw)
        return b"".join(parts)


def encrypt_share(key: bytes, plaintext: bytes, *, route: ShareRoute) -> bytes:
    """Encrypt ``plaintext`` (a serialised share) for ``route.receiver``.

    Parameters
    ----------
    key : bytes
        The 32-byte AES-256 key from `derive_key` with ``INFO_SHARE_ENCRYPTION``.
    plaintext : bytes
        What to encrypt.
    route : ShareRoute
        The binding checked on decryption.

    Returns
    -------
    bytes
        ``CIPHERTEXT_VERSION || nonce || ciphertext || tag``, with a fresh random nonce.
    """
    return _seal(key, secrets.token_bytes(NONCE_BYTES), plaintext, route)


def _seal(key: bytes, nonce: bytes, plaintext: bytes, route: ShareRoute) -> bytes:
    """Encrypt with a given nonce (the known-answer vectors need one; callers use `encrypt_share`)."""
    _check_key(key)
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    sealed = AESGCM(key).encrypt(nonce, plaintext, route.associated_data())
    return bytes([CIPHERTEXT_VERSION]) + nonce + sealed


def decrypt_share(key: bytes, ciphertext: bytes, *, route: ShareRoute) -> bytes:
    """Decrypt a share ciphertext from `encrypt_share`, or raise; never returns a wrong plaintext.

    Raises
    ------
    MalformedMessage
        If the ciphertext is not bytes, too short or carries another version byte.
    InvalidShare
        If the ciphertext does not authenticate under ``key`` and ``route``: a flipped bit, or
        another run, round, bucket, sender or receiver than the one it was encrypted for.
    """
    _check_key(key)
    if not isinstance(ciphertext, bytes) or len(ciphertext) < 1 + NONCE_BYTES + TAG_BYTES:
        got = f"{len(ciphertext)} bytes" if isinstance(ciphertext, bytes) else type(ciphertext).__name__
        raise MalformedMessage(
            f"share ciphertext must be at least {1 + NONCE_BYTES + TAG_BYTES} bytes, got {got}"
        )
    if ciphertext[0] != CIPHERTEXT_VERSION:
        raise MalformedMessage(
            f"share ciphertext has version byte 0x{ciphertext[0]:02x}, expected 0x{CIPHERTEXT_VERSION:02x}"
        )
    nonce, sealed = ciphertext[1 : 1 + NONCE_BYTES], ciphertext[1 + NONCE_BYTES :]
    try:
        return AESGCM(key).decrypt(nonce, sealed, route.associated_data())
    except InvalidTag:
        raise InvalidShare(
            f"share from {route.sender!r} to {route.receiver!r} (run {route.run_id!r}, round {route.round}, "
            f"bucket {route.bucket}) does not authenticate: tampered, or meant for another route"
        ) from None


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ValueError(f"AES-256-GCM key must be {KEY_BYTES} bytes")
