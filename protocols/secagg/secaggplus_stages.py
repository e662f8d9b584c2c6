"""SecAgg+ stage table: the phase names, blob keys and pure rules both halves of a round share.

Kept apart from the two halves (`protocols.secagg.secaggplus`, `protocols.secagg.secaggplus_server`)
so that client and server cannot disagree on a name, on the threshold rule or on the neighbour
graph's shape. Everything here is a pure function or a constant.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence

from protocols._hazmat.aead import NONCE_BYTES, TAG_BYTES
from protocols._hazmat.keys import KEY_BYTES
from protocols._hazmat.shamir import VALUE_BYTES
from protocols.errors import MalformedMessage
from protocols.wire.serde import TensorSpec

#: The four phases of a SecAgg+ round, in order.
ADVERTISE_KEYS = "advertise-keys"
SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
UNMASK = "unmask"
PHASES = (ADVERTISE_KEYS, SHARE_KEYS, MASKED_INPUT, UNMASK)

# advertise-keys: payload blobs (bucket index, bucket size), answer blobs (two public keys)
BUCKET = "bucket"
SIZE = "size"
ENCRYPTION_KEY = "c"
MASK_KEY = "s"
# share-keys: payload blobs "c/<id>", "s/<id>"; answer blobs "share/<receiver>"
# masked-input: payload blobs "share/<sender>"; answer tensor "masked"
SHARE = "share/"
MASKED = "masked"
# unmask: payload blobs (newline-separated ids); answer blobs "b/<id>" and "s/<id>"
SURVIVED = "survived"
DROPPED = "dropped"
#: Distributed DP only: every survivor of the bucket (so a client can refuse a bucket with too few).
SURVIVORS = "survivors"
SEED_SHARE = "b/"
KEY_SHARE = "s/"

#: A serialised public key (version byte + 32 bytes).
PUBLIC_KEY_BYTES = 1 + KEY_BYTES
#: A Shamir share of one / two 32-byte secrets (header of 5 bytes + 33 bytes per value).
ONE_SHARE_BYTES = 5 + VALUE_BYTES
TWO_SHARES_BYTES = 5 + 2 * VALUE_BYTES
#: An AES-GCM ciphertext of a share of (b_u, s_u): version + nonce + plaintext + tag.
CIPHERTEXT_BYTES = 1 + NONCE_BYTES + TWO_SHARES_BYTES + TAG_BYTES
#: Fewest clients in a bucket: with two, each one's single neighbour would hold its secrets whole
#: (t = 1), and the pair's sum reveals the other's update to each member anyway.
MIN_BUCKET = 3


def share_threshold(neighbourhood: int, fraction: float) -> int:
    """Shares needed to reconstruct a secret split among ``neighbourhood`` neighbours.

    t is the smallest integer strictly above ``fraction * neighbourhood``, capped at
    ``neighbourhood``: with the default 0.5, a strict majority of the neighbours.

    Examples
    --------
    >>> share_threshold(3, 0.5), share_threshold(4, 0.5), share_threshold(4, 1.0)
    (2, 3, 4)
    """
    return min(neighbourhood, math.floor(fraction * neighbourhood) + 1)


def neighbour_graph(members: Sequence[str], k: int) -> dict[str, tuple[str, ...]]:
    """A Harary graph H(n, k) on ``members`` with labels permuted at random (`secrets`).

    Members sit on a ring in random order and each is linked to the ``k / 2`` nearest on either
    side (``k`` even). ``k = 0`` or ``k >= n - 1`` gives the complete graph (classic SecAgg).
    """
    n = len(members)
    if k == 0 or k >= n - 1:
        return {u: tuple(v for v in sorted(members) if v != u) for u in members}
    ring = list(members)
    secrets.SystemRandom().shuffle(ring)
    graph: dict[str, tuple[str, ...]] = {}
    for i, u in enumerate(ring):
        near = {ring[(i + j) % n] for j in range(1, k // 2 + 1)} | {ring[(i - j) % n] for j in range(1, k // 2 + 1)}
        graph[u] = tuple(sorted(near))
    return graph


def split_buckets(cohort: Sequence[str], bucket_size: int) -> tuple[tuple[str, ...], ...]:
    """Split ``cohort`` at random (`secrets`) into ``ceil(n / bucket_size)`` buckets of near-equal size.

    ``bucket_size = 0`` keeps the whole cohort in one bucket. Every bucket holds at most
    ``bucket_size`` clients; sizes differ by at most one.
    """
    if bucket_size == 0 or len(cohort) <= bucket_size:
        return (tuple(sorted(cohort)),)
    order = list(cohort)
    secrets.SystemRandom().shuffle(order)
    count = math.ceil(len(order) / bucket_size)
    return tuple(tuple(sorted(order[i::count])) for i in range(count))


def update_layout(update_spec: Mapping[str, TensorSpec]) -> list[tuple[str, tuple[int, ...], int]]:
    """The update's tensors in the order they are flattened: ``(name, shape, size)``, by name."""
    return [(name, tuple(update_spec[name].shape), math.prod(update_spec[name].shape)) for name in sorted(update_spec)]


def encode_ids(ids: Sequence[str]) -> bytes:
    """A list of client ids as one blob (newline-separated UTF-8)."""
    return "\n".join(ids).encode("utf-8")


def decode_ids(blob: bytes | None) -> list[str]:
    """Inverse of `encode_ids`; refuses duplicates."""
    if not blob:
        return []
    ids = blob.decode("utf-8").split("\n")
    if len(set(ids)) != len(ids) or "" in ids:
        raise MalformedMessage(f"client id list has empty or repeated entries: {ids}")
    return ids


def decode_int(blob: bytes | None, name: str) -> int:
    """A small non-negative integer sent as ASCII digits."""
    if blob is None or not blob.isdigit() or len(blob) > 9:
        raise MalformedMessage(f"payload blob {name!r} must be a non-negative integer, got {blob!r}")
    return int(blob)
