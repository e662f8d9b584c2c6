"""What both halves of a homomorphic round compute alike: phase names, blob keys and the slot plan.

A client's update (the weight as one extra value) becomes a flat slot vector:

* **BFV** (exact integers). Each coordinate is clipped to ``[-c, c]``, stochastically rounded onto
  ``[0, Q]`` and multiplied by the client's integer weight ``w <= W``; the weight itself is the last
  value. A bucket's sum of a value then needs ``b = ceil(log2(n W Q)) + 1`` bits (the same rule as
  SecAgg+, `protocols.secagg.quantize.required_bits`, with its spare bit for range checks), and
  ``k = floor((T - 1) / b)`` values share one slot as bit fields of ``b`` bits, ``T`` the bit length
  of the plaintext modulus t. No field can carry into the next (each sum stays below ``2^(b-1)``)
  and the slot sum stays below ``2^(T-1) < t``, so the decrypted slots unpack to the exact sums.
  Fields are laid out in blocks: slot ``j`` holds values ``j, j + S, j + 2S, ...`` for ``S`` slots.
* **CKKS** (approximate reals, N / 2 slots, one value each). A client encrypts ``w clip(x)`` and
  ``w``; the sum of a bucket of ``n`` stays within ``n W c``, which the plan requires to lie well
  inside the scheme's integer headroom.

Pure functions and constants only; no TenSEAL here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protocols._hazmat.he import HEParameters
from protocols.secagg.quantize import required_bits

#: The four phases of a homomorphic round, in order (``decrypt`` may be retried with another client).
ADVERTISE_KEYS = "advertise-keys"
DISTRIBUTE_KEY = "distribute-key"
ENCRYPTED_INPUT = "encrypted-input"
DECRYPT = "decrypt"
PHASES = (ADVERTISE_KEYS, DISTRIBUTE_KEY, ENCRYPTED_INPUT, DECRYPT)

# advertise-keys: payload blobs bucket, size, buckets, params; answer blob "pk"
BUCKET, SIZE, BUCKETS, PARAMS, PUBLIC_KEY = "bucket", "size", "buckets", "params", "pk"
# distribute-key (leader only): payload blobs "pk/<peer>"; answer blob key_id, tensors "key/<peer>"
PEER_KEY, KEY_ID, TRANSPORTED = "pk/", "key_id", "key/"
# encrypted-input: payload blobs leader, "key" (and the leader's pk); answer tensors ct, ct_sizes, blobs key_id, digest
LEADER, LEADER_KEY, KEY, CIPHERTEXT, CHUNK_SIZES, DIGEST = "leader", "leader_pk", "key", "ct", "ct_sizes", "digest"
# decrypt: payload tensors "sum/<bucket>", "sum_sizes/<bucket>", blob "sizes" (JSON); answer tensors "plain/<bucket>"
SUM, SUM_SIZES, BUCKET_SIZES, PLAIN = "sum/", "sum_sizes/", "sizes", "plain/"

#: Fewest clients in a bucket, and fewest whose sum is ever decrypted: a "sum" of one client is
#: that client's update.
MIN_BUCKET = 3
MIN_SUMMANDS = 2
#: Bytes of a round's key id (random, chosen by the key leader).
KEY_ID_BYTES = 16
#: Largest serialised secret context a client accepts to carry (a 4096-degree BFV one is ~62 kB).
MAX_SECRET_CONTEXT_BYTES = 8 << 20
#: Largest serialised ciphertext (one chunk) accepted, per slot: raw size is 16 bytes per slot
#: per 64-bit data word, compressed less; generous so that any valid one passes.
MAX_CHUNK_BYTES_PER_SLOT = 64


@dataclass(frozen=True)
class SlotPlan:
    """How one bucket's updates fill slots: ``values`` inputs (the weight last) in ``slots`` slots.

    ``levels`` (Q), ``field_bits`` (b) and ``per_slot`` (k) are BFV's; CKKS has one real per slot.
    """

    scheme: str
    bucket_size: int
    values: int
    slots: int
    slots_per_chunk: int
    levels: int = 0
    field_bits: int = 0
    per_slot: int = 1
    weight_bound: int = 1

    @property
    def chunk_sizes(self) -> list[int]:
        """Values held by each ciphertext chunk (all full but the last)."""
        full, rest = divmod(self.slots, self.slots_per_chunk)
        return [self.slots_per_chunk] * full + ([rest] if rest else [])

    @property
    def max_chunk_bytes(self) -> int:
        """The largest serialised chunk accepted."""
        return self.slots_per_chunk * MAX_CHUNK_BYTES_PER_SLOT + 4096


def levels_for(clip_range: float, precision: float) -> int:
    """Fewest power-of-two levels Q whose step ``2c / Q`` is at most ``precision``."""
    exponent = max(1, math.ceil(math.log2(2.0 * clip_range / precision)))
    if 2.0 * clip_range / 2.0**exponent > precision:
        exponent += 1
    return 1 << exponent


def bfv_plan(params: HEParameters, *, bucket_size: int, num_values: int, levels: int, weight_bound: int,
             per_slot: int | None = None) -> SlotPlan:
    """The BFV plan of a bucket of ``bucket_size`` clients sending ``num_values`` values (weight included).

    Raises
    ------
    ValueError
        If one value's sum needs more bits than the plaintext modulus holds, or an explicit
        ``per_slot`` does not fit.
    """
    bits = required_bits(bucket_size=bucket_size, max_weight=weight_bound, levels=levels)
    room = min(params.plain_modulus.bit_length() - 1, 63)
    most = room // bits
    if most < 1:
        raise ValueError(
            f"a bucket of {bucket_size} with Q = {levels} levels and weights up to {weight_bound} needs {bits}-bit sums, "
            f"but the plaintext modulus of {params.plain_modulus.bit_length()} bits holds {room}"
        )
    k = most if per_slot is None else per_slot
    if k > most:
        raise ValueError(f"pack = {per_slot} values of {bits} bits do not fit a {room}-bit slot (at most {most})")
    slots = -(-num_values // k)
    return SlotPlan("bfv", bucket_size, num_values, slots, params.slots, levels, bits, k, weight_bound)


def ckks_plan(params: HEParameters, *, bucket_size: int, num_values: int, clip_range: float,
              weight_bound: int = 1) -> SlotPlan:
    """The CKKS plan: one value per slot; refuses a bucket whose weighted sum could leave the headroom.

    Raises
    ------
    ValueError
        If ``4 n W c`` reaches ``2**headroom_bits`` (a factor 4 of margin for the encoding error).
    """
    reach = bucket_size * weight_bound * clip_range
    if 4.0 * reach >= 2.0**params.headroom_bits:
        raise ValueError(
            f"a bucket of {bucket_size} clients with weights up to {weight_bound} and clip_range={clip_range} sums to "
            f"up to {reach:g}, too close to CKKS's integer headroom 2^{params.headroom_bits} (first prime "
            f"{params.coeff_mod_bit_sizes[0]} bits minus scale_bits {params.scale_bits}, minus 1)"
        )
    return SlotPlan("ckks", bucket_size, num_values, num_values, params.slots, weight_bound=weight_bound)


def pack_fields(values: np.ndarray, plan: SlotPlan) -> np.ndarray:
    """Pack ``plan.values`` non-negative integers (< 2^b each) into ``plan.slots`` uint64 slots (block layout)."""
    flat = np.zeros(plan.slots * plan.per_slot, dtype=np.uint64)
    flat[: values.size] = values
    blocks = flat.reshape(plan.per_slot, plan.slots)
    slots = blocks[0].copy()
    for i in range(1, plan.per_slot):  # k <= 63 / b bit fields: a loop over fields, not over values
        slots |= blocks[i] << np.uint64(i * plan.field_bits)
    packed: np.ndarray = slots
    return packed


def unpack_fields(slots: np.ndarray, plan: SlotPlan) -> np.ndarray:
    """Inverse of `pack_fields` on decrypted sums: the ``plan.values`` field sums as int64."""
    words = np.asarray(slots, dtype=np.uint64)
    mask = np.uint64((1 << plan.field_bits) - 1)
    fields = [(words >> np.uint64(i * plan.field_bits)) & mask for i in range(plan.per_slot)]
    return np.concatenate(fields)[: plan.values].astype(np.int64)
