"""Dangerous cryptographic primitives for secure aggregation. Do not use them directly.

This package is the hazardous-materials layer under the secure-aggregation protocols, in the
spirit of ``cryptography.hazmat``: every function here is easy to misuse (reusing a PRG key for
two masks, encrypting a share without binding its route, revealing a self-mask seed *and* a mask
key for the same client, choosing t too low) and nothing here stops you. Use the recipes in
`protocols.secagg`, which fix safe parameters, version every message and enforce the protocol's
order (`[secure] mode = "secagg+"`, `protocols/secagg/secaggplus.py`).

What is here:

* `keys`: X25519 key pairs and agreement, HKDF-SHA256 with one ``info`` per purpose and a salt
  bound to the run, round and bucket; public keys serialised with a version byte.
* `aead`: AES-256-GCM for shares routed through the server, associated data binding run, round,
  bucket, sender and receiver; a failed check raises `InvalidShare`.
* `prg`: the mask PRG, a ChaCha20 keystream read as little-endian words of b bits (`keystream_cipher`
  enters it at any 64-byte block, to fill reusable buffers or split one mask over threads).
* `shamir`: t-of-k Shamir sharing of 32-byte secrets over GF(2**256 + 297), shares serialised
  with a version byte.
* `he`: TenSEAL contexts for addition-only homomorphic aggregation (BFV and CKKS): parameters
  checked against the 128-bit HE-standard limits, symmetric-key contexts for the clients and a
  key-free parameters context for the server, slot vectors encrypted, added and decrypted in
  whole-ciphertext chunks. Import it as ``protocols._hazmat.he`` (it loads TenSEAL).
* `masking`: self masks and antisymmetric pairwise masks modulo 2**b; `accumulate_masks` is the
  fast path that adds many keystreams into one vector in place.

All randomness comes from `secrets`; nothing on this path takes a seed.
"""

from __future__ import annotations

from protocols._hazmat.aead import (
    CIPHERTEXT_VERSION,
    ShareRoute,
    decrypt_share,
    encrypt_share,
)
from protocols._hazmat.keys import (
    INFO_KEY_TRANSPORT,
    INFO_PAIRWISE_MASK,
    INFO_SELF_MASK,
    INFO_SHARE_ENCRYPTION,
    PUBLIC_KEY_VERSION,
    agree,
    derive_key,
    generate_private_key,
    instance_salt,
    load_private_key,
    private_key_bytes,
    public_key_from_bytes,
    public_key_to_bytes,
)
from protocols._hazmat.masking import (
    accumulate_masks,
    add_masks,
    modular_sum,
    pairwise_sign,
)
from protocols._hazmat.prg import keystream_cipher, mask_words, word_dtype
from protocols._hazmat.shamir import PRIME, SHARE_VERSION, ShamirScheme, Share, combine

__all__ = [
    "CIPHERTEXT_VERSION",
    "INFO_KEY_TRANSPORT",
    "INFO_PAIRWISE_MASK",
    "INFO_SELF_MASK",
    "INFO_SHARE_ENCRYPTION",
    "PRIME",
    "PUBLIC_KEY_VERSION",
    "SHARE_VERSION",
    "ShamirScheme",
    "Share",
    "ShareRoute",
    "accumulate_masks",
    "add_masks",
    "agree",
    "combine",
    "decrypt_share",
    "derive_key",
    "encrypt_share",
    "generate_private_key",
    "instance_salt",
    "keystream_cipher",
    "load_private_key",
    "mask_words",
    "modular_sum",
    "pairwise_sign",
    "private_key_bytes",
    "public_key_from_bytes",
    "public_key_to_bytes",
    "word_dtype",
]
