"""TenSEAL contexts and ciphertext chunks for addition-only homomorphic aggregation.

Aggregation only adds ciphertexts, so the parameters are the smallest that keep 128-bit security:
no relinearisation or Galois keys, one data prime plus the special prime, and (BFV) a plaintext
modulus just large enough for the packed integer sum. Everything here is easy to misuse: a
context built with the wrong ``plain_modulus`` silently wraps sums, a ciphertext from another key
with the same parameters loads and adds without complaint and decrypts to noise. The recipe in
`protocols.secagg.he` fixes the parameters per round and checks every upload.

Key custody in this module:

* `new_secret_context` makes a **symmetric-key** context (``ENCRYPTION_TYPE.SYMMETRIC``): whoever
  holds it encrypts and decrypts; there is no public key at all, so nobody without the secret
  key can even encrypt.
* `server_context` makes the context the aggregator adds with. TenSEAL cannot build a context
  without generating keys, so it builds one, serialises the *parameters only* and reloads them:
  the object returned holds no secret, public, relinearisation or Galois key
  (`assert_keyless`), and the throwaway key never encrypted anything.

Slot vectors are cut into whole ciphertexts of `HEParameters.slots` values (`encrypt_slots`),
serialised with TenSEAL's default compression.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Union

import numpy as np
import tenseal as ts

from protocols.errors import MalformedMessage

__all__ = [
    "MAX_COEFF_BITS", "HEParameters", "Vector", "add_chunks", "assert_keyless", "batching_prime", "decrypt_slots",
    "digest", "encrypt_slots", "load_chunks", "load_secret_context", "new_secret_context", "secret_context_bytes",
    "server_context",
]  # fmt: skip

#: Largest total ``coeff_mod_bit_sizes`` per polynomial degree at 128-bit classical security
#: (HomomorphicEncryption.org standard, the limits SEAL enforces).
MAX_COEFF_BITS: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

#: Bits of noise budget a BFV sum keeps below the decryption limit (see `HEParameters.max_plain_bits`).
#: Measured with TenSEAL 0.3.18 at N = 4096: sums of n fresh ciphertexts decrypt correctly while
#: ``log2 q - log2 t - log2 n >= 3`` and fail at about 2; 6 leaves a factor 8 on the noise.
BFV_NOISE_MARGIN_BITS = 6

SCHEMES = ("bfv", "ckks")

#: A loaded ciphertext chunk (TenSEAL vector).
Vector = Union[ts.BFVVector, ts.CKKSVector]


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (the first 13 prime bases)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def batching_prime(poly_modulus_degree: int, bits: int) -> int:
    """The largest prime ``t < 2**bits`` with ``t = 1 mod 2N``, so BFV batching has N integer slots.

    Raises
    ------
    ValueError
        If ``bits`` is too small for such a prime to exist below ``2**bits``.
    """
    step = 2 * poly_modulus_degree
    candidate = ((1 << bits) - 1) // step * step + 1
    while candidate > step:
        if candidate < (1 << bits) and _is_prime(candidate):
            return candidate
        candidate -= step
    raise ValueError(f"no prime t = 1 mod {step} below 2^{bits}")


@dataclass(frozen=True)
class HEParameters:
    """One round's encryption parameters; all parties build or check their context from these.

    Attributes
    ----------
    scheme:
        ``"bfv"`` (exact integers mod ``plain_modulus``, N slots) or ``"ckks"`` (approximate reals,
        N / 2 slots).
    poly_modulus_degree:
        N, a power of two from 1024 to 32768.
    coeff_mod_bit_sizes:
        Bit sizes of the coefficient-modulus primes; the last is the special (key-switching) prime,
        the others hold data. At least two; the total must stay within `MAX_COEFF_BITS`.
    plain_modulus:
        BFV only: the prime t (``t = 1 mod 2N``); 0 for CKKS.
    scale_bits:
        CKKS only: log2 of the encoding scale; 0 for BFV.

    Raises
    ------
    ValueError
        Naming the field that breaks 128-bit security, batching or decryption.
    """

    scheme: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_modulus: int = 0
    scale_bits: int = 0

    def __post_init__(self) -> None:
        n, sizes = self.poly_modulus_degree, tuple(self.coeff_mod_bit_sizes)
        object.__setattr__(self, "coeff_mod_bit_sizes", sizes)
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if n not in MAX_COEFF_BITS:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS)}, got {n!r}")
        if len(sizes) < 2 or any(isinstance(b, bool) or not isinstance(b, int) or not 17 <= b <= 60 for b in sizes):
            raise ValueError(
                f"coeff_mod_bit_sizes must list at least two primes of 17-60 bits (data primes, then the special "
                f"prime; TenSEAL cannot key-switch with one), got {list(sizes)}"
            )
        if sum(sizes) > MAX_COEFF_BITS[n]:
            raise ValueError(
                f"coeff_mod_bit_sizes {list(sizes)} total {sum(sizes)} bits; 128-bit security at poly_modulus_degree="
                f"{n} allows at most {MAX_COEFF_BITS[n]}"
            )
        if self.scheme == "bfv":
            t = self.plain_modulus
            if isinstance(t, bool) or not isinstance(t, int) or t < 2 or t % (2 * n) != 1 or not _is_prime(t):
                raise ValueError(f"BFV plain_modulus must be a prime = 1 mod 2N = {2 * n} (batching), got {t!r}")
            if t.bit_length() > self.data_bits - BFV_NOISE_MARGIN_BITS:
                raise ValueError(
                    f"BFV plain_modulus of {t.bit_length()} bits leaves no noise budget with {self.data_bits} data bits"
                )
            if self.scale_bits:
                raise ValueError("BFV takes no scale_bits")
        else:
            s = self.scale_bits
            if isinstance(s, bool) or not isinstance(s, int) or not 10 <= s < sizes[0] - 1:
                raise ValueError(
                    f"CKKS scale_bits must lie in [10, {sizes[0] - 2}] (below the first prime's {sizes[0]} bits, "
                    f"which leaves the integer headroom), got {s!r}"
                )
            if self.plain_modulus:
                raise ValueError("CKKS takes no plain_modulus")

    @property
    def slots(self) -> int:
        """Values one ciphertext holds: N for BFV, N / 2 for CKKS."""
        return self.poly_modulus_degree if self.scheme == "bfv" else self.poly_modulus_degree // 2

    @property
    def data_bits(self) -> int:
        """log2 of the data modulus q (every prime but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])

    @property
    def headroom_bits(self) -> int:
        """CKKS: a decrypted slot is exact only while ``|value| < 2**headroom_bits`` (first prime minus scale, minus 1)."""
        return self.coeff_mod_bit_sizes[0] - self.scale_bits - 1

    def max_plain_bits(self, summands: int) -> int:
        """BFV: the largest bit length of t whose sum of ``summands`` ciphertexts still decrypts (with the margin)."""
        return self.data_bits - BFV_NOISE_MARGIN_BITS - math.ceil(math.log2(max(1, summands)))

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys), as announced to the clients."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes | None) -> HEParameters:
        """Parse `to_bytes` output; raise `MalformedMessage` for anything else."""
        try:
            raw = json.loads(bytes(data or b"").decode())
            return cls(raw["scheme"], int(raw["poly_modulus_degree"]), tuple(int(b) for b in raw["coeff_mod_bit_sizes"]),
                       int(raw["plain_modulus"]), int(raw["scale_bits"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MalformedMessage(f"HE parameters are malformed: {exc}") from None


def _context(params: HEParameters) -> ts.Context:
    scheme = ts.SCHEME_TYPE.BFV if params.scheme == "bfv" else ts.SCHEME_TYPE.CKKS
    kwargs = {"plain_modulus": params.plain_modulus} if params.scheme == "bfv" else {}
    ctx = ts.context(
        scheme, poly_modulus_degree=params.poly_modulus_degree, coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, n_threads=1, **kwargs,
    )
    if params.scheme == "ckks":
        ctx.global_scale = float(2**params.scale_bits)
    return ctx


def new_secret_context(params: HEParameters) -> ts.Context:
    """A fresh symmetric-key context: it encrypts and decrypts; it has no public key."""
    return _context(params)


def secret_context_bytes(context: ts.Context) -> bytes:
    """Serialise the parameters and the secret key only (no public, relinearisation or Galois keys)."""
    if not context.has_secret_key():
        raise ValueError("this context holds no secret key")
    data: bytes = context.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    return data


def load_secret_context(data: bytes, params: HEParameters) -> ts.Context:
    """Load a context from `secret_context_bytes`; raise `MalformedMessage` unless it holds a secret key for ``params``."""
    try:
        context = ts.context_from(bytes(data), n_threads=1)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise MalformedMessage(f"the HE secret context does not load: {exc}") from None
    if not context.has_secret_key():
        raise MalformedMessage("the HE secret context holds no secret key")
    degree = context.data.seal_context().key_context_data().parms().poly_modulus_degree()
    if degree != params.poly_modulus_degree:
        raise MalformedMessage(f"the HE secret context has N = {degree}, the round announced {params.poly_modulus_degree}")
    if params.scheme == "ckks":
        context.global_scale = float(2**params.scale_bits)
    return context


def server_context(params: HEParameters) -> ts.Context:
    """The aggregator's context: ``params`` only, no key of any kind (see the module docstring)."""
    throwaway = _context(params)
    data = throwaway.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    del throwaway
    context = ts.context_from(data, n_threads=1)
    assert_keyless(context)
    if params.scheme == "ckks":
        context.global_scale = float(2**params.scale_bits)
    return context


def assert_keyless(context: ts.Context) -> None:
    """Raise `AssertionError` if ``context`` holds a secret, public, relinearisation or Galois key."""
    def has(probe: str) -> bool:
        try:
            return bool(getattr(context, probe)())
        except ValueError:  # TenSEAL: "has_public_key is not supported for symmetric encryption"
            return False

    held = [name for name, probe in (
        ("secret", "has_secret_key"), ("public", "has_public_key"),
        ("relinearisation", "has_relin_keys"), ("Galois", "has_galois_keys"),
    ) if has(probe)]
    if held:
        raise AssertionError(f"the server's HE context holds {', '.join(held)} key(s)")


def _vector(params: HEParameters, context: ts.Context, values: np.ndarray) -> ts.BFVVector | ts.CKKSVector:
    if params.scheme == "bfv":
        return ts.bfv_vector(context, values.astype(np.int64).tolist())
    return ts.ckks_vector(context, values.astype(np.float64).tolist())


def encrypt_slots(context: ts.Context, params: HEParameters, slots: np.ndarray) -> list[bytes]:
    """Encrypt a flat slot vector as ``ceil(len / slots)`` serialised ciphertexts (the last one shorter).

    BFV slots are integers in ``[0, t)``; CKKS slots are reals well inside the headroom.
    """
    flat = np.ravel(slots)
    return [_vector(params, context, flat[i : i + params.slots]).serialize() for i in range(0, flat.size, params.slots)]


def _load(params: HEParameters, context: ts.Context, data: bytes) -> ts.BFVVector | ts.CKKSVector:
    loader = ts.bfv_vector_from if params.scheme == "bfv" else ts.ckks_vector_from
    return loader(context, data)


def load_chunks(context: ts.Context, params: HEParameters, chunks: Sequence[bytes], sizes: Sequence[int]) -> list[Vector]:
    """Deserialise one party's ciphertext chunks, checking each holds the expected number of slots.

    Raises
    ------
    MalformedMessage
        Naming the chunk that does not parse, belongs to other parameters (SEAL's parameter check),
        or holds another number of values than ``sizes`` says.
    """
    if len(chunks) != len(sizes):
        raise MalformedMessage(f"{len(chunks)} ciphertext chunk(s), expected {len(sizes)}")
    vectors: list[Vector] = []
    for index, (data, size) in enumerate(zip(chunks, sizes)):
        try:
            vector = _load(params, context, bytes(data))
            got = vector.size()
        except (ValueError, RuntimeError, TypeError) as exc:
            raise MalformedMessage(f"ciphertext chunk {index} is not a {params.scheme.upper()} ciphertext for this "
                                   f"round's parameters: {exc}") from None
        if got != size:
            raise MalformedMessage(f"ciphertext chunk {index} holds {got} values, expected {size}")
        vectors.append(vector)
    return vectors


def add_chunks(total: list[Vector] | None, vectors: list[Vector]) -> list[Vector]:
    """Add one party's loaded chunks into the running total (in place when there is one)."""
    if total is None:
        return list(vectors)
    for index, vector in enumerate(vectors):
        total[index] += vector
    return total


def decrypt_slots(context: ts.Context, params: HEParameters, chunks: Sequence[bytes], sizes: Sequence[int]) -> np.ndarray:
    """Decrypt serialised chunks into one flat slot vector (BFV: ``uint64`` in ``[0, t)``; CKKS: ``float64``)."""
    vectors = load_chunks(context, params, chunks, sizes)
    parts = [np.asarray(v.decrypt(), dtype=np.int64 if params.scheme == "bfv" else np.float64) for v in vectors]
    flat = np.concatenate(parts) if parts else np.zeros(0)
    if params.scheme == "bfv":
        flat = np.mod(flat, params.plain_modulus).astype(np.uint64)  # TenSEAL decrypts to centred residues
    return flat


def digest(chunks: Sequence[bytes], *, key_id: bytes) -> bytes:
    """SHA-256 over the key id and every chunk (length-prefixed): the end-to-end integrity tag of an upload."""
    h = hashlib.sha256(b"secure-fl/he/v1/upload")
    h.update(key_id)
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "big"))
        h.update(chunk)
    return h.digest()
