"""SecAgg+ mask arithmetic as pure functions: a client's masked input and the server's unmasked sum.

Both halves of a round call these (`protocols.secagg.secaggplus`, `protocols.secagg.secaggplus_server`);
they hold no state, and every key is derived here exactly as the protocol defines it:

* self mask of client u: ``PRG(HKDF(b_u, info=INFO_SELF_MASK, salt=instance))``;
* pairwise mask of u and v: ``PRG(HKDF(X25519(s_u, s_v^PK), info=INFO_PAIRWISE_MASK, salt=instance))``,
  added by the client with the lower id (as strings) and subtracted by the other (`pairwise_sign`);

where PRG is the ChaCha20 keystream read as b-bit words (`protocols._hazmat.prg`) and the
instance is (run id, round, bucket). A client sends

    y_u = x_u + PRG_self(u) + sum_v sign(u, v) * PRG_pair(u, v)   (mod 2^b)

over its neighbours v that survived share-keys, and the server, given the sum of the survivors'
y_u, removes every survivor's self mask and, for each client d that dropped after share-keys,
the pairwise masks d shared with its surviving neighbours (it reconstructed d's mask key).

Speed: all masks of one call go through `protocols._hazmat.masking.accumulate_masks`, which writes
each keystream into one reusable buffer and adds it chunk by chunk into a single `word_dtype`
vector (``uint32`` for b <= 32: arithmetic modulo 2^32 is exact modulo 2^b), with no per-mask
range checks (keystream words are in range by construction) and no Python loop over parameters;
the vector is split over `MASK_THREADS` threads (the keystream and numpy calls release the GIL).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from protocols._hazmat import (
    INFO_PAIRWISE_MASK,
    INFO_SELF_MASK,
    accumulate_masks,
    agree,
    derive_key,
    pairwise_sign,
    word_dtype,
)
from protocols._hazmat.prg import check_bits

__all__ = ["MASK_THREADS", "DroppedClient", "mask_input", "sum_words", "unmask_sum"]

Words = npt.NDArray[np.unsignedinteger]

#: Threads that expand masks in one call (and that the server sums uploads on): the usable cores,
#: at most 4. Only 2 were measured, on 2-core machines (docs/performance.md); small jobs, such as
#: one client's masks, use one thread anyway (`protocols._hazmat.masking.THREAD_MIN_WORDS`).
MASK_THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class DroppedClient(NamedTuple):
    """What the server needs to remove the pairwise masks of a client that dropped after share-keys."""

    #: The client's mask private key s_d, reconstructed from its neighbours' Shamir shares.
    mask_private_key: X25519PrivateKey
    #: The mask public keys of its neighbours that survived masked-input (whose uploads hold its masks).
    survivor_publics: Mapping[str, X25519PublicKey]


def _sign(me: str, peer: str) -> int:
    """+1 if ``me`` adds the mask it shares with ``peer`` (``me < peer`` as strings), else -1."""
    return pairwise_sign(me, peer)  # type: ignore[type-var]  # str is totally ordered


def _words(values: npt.ArrayLike, bits: int, what: str) -> Words:
    """A fresh, writeable `word_dtype` copy of an integer vector, read modulo ``2**bits``."""
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(f"{what} must be a flat integer vector, got {array.dtype} {array.shape}")
    return array.astype(word_dtype(bits))  # a C cast: wraps modulo 2**width, a multiple of 2**bits


def mask_input(
    values: npt.ArrayLike,
    *,
    bits: int,
    me: str,
    self_seed: bytes,
    mask_private_key: X25519PrivateKey,
    neighbour_mask_publics: Mapping[str, X25519PublicKey],
    run_id: str,
    round: int,
    bucket: int,
    threads: int | None = None,
) -> Words:
    """Return client ``me``'s masked input ``y = x + self mask + sum of signed pairwise masks mod 2**bits``.

    Parameters
    ----------
    values : array of int
        x, the flat weighted quantised vector (the weight word included), read modulo ``2**bits``
        (a negative value is taken as its residue).
    bits : int
        The bucket's word size b, ``1 <= b <= 64``.
    me : str
        The client's id; it adds the pairwise mask of a neighbour with a greater id, subtracts the others.
    self_seed : bytes
        b_u, the 32-byte self-mask seed the client Shamir-shared.
    mask_private_key : X25519PrivateKey
        s_u, the client's mask private key (also Shamir-shared).
    neighbour_mask_publics : mapping of str to X25519PublicKey
        The mask public key of every neighbour whose shares the client holds (they survived share-keys).
    run_id, round, bucket
        The protocol instance the HKDF salt binds every mask key to.
    threads : int, optional
        Threads for the keystreams (default `MASK_THREADS`).

    Returns
    -------
    numpy.ndarray
        ``len(values)`` words of dtype `word_dtype` of ``bits``, each below ``2**bits``.

    Raises
    ------
    ValueError
        If ``values`` is not a flat integer vector, ``me`` is among the neighbours, or ``bits`` is invalid.
    """
    check_bits(bits)
    acc = _words(values, bits, "values")
    keys = [(derive_key(self_seed, purpose=INFO_SELF_MASK, run_id=run_id, round=round, bucket=bucket), 1)]
    for peer, public in sorted(neighbour_mask_publics.items()):
        secret = agree(mask_private_key, public)
        key = derive_key(secret, purpose=INFO_PAIRWISE_MASK, run_id=run_id, round=round, bucket=bucket)
        keys.append((key, _sign(me, peer)))
    return accumulate_masks(acc, keys, bits=bits, threads=threads or MASK_THREADS)


def sum_words(rows: Iterable[npt.ArrayLike], *, bits: int) -> Words:
    """Sum integer vectors of one length modulo ``2**bits`` into one `word_dtype` vector, in place.

    The first row is copied once into the accumulator; every later row is added into it with no
    copy of its own (no range check either: each row is read modulo ``2**bits``).

    Raises
    ------
    ValueError
        If there is no row, or the rows differ in length or are not flat integer vectors.
    """
    check_bits(bits)
    acc: Words | None = None
    for row in rows:
        array = np.asarray(row)
        if acc is None:
            acc = _words(array, bits, "a row")
            continue
        if array.shape != acc.shape or (array.size and array.dtype.kind not in "iu"):
            raise ValueError(f"row {array.dtype} {array.shape} differs from the first row's shape {acc.shape}")
        np.add(acc, array, out=acc, casting="unsafe")  # wraps modulo 2**width
    if acc is None:
        raise ValueError("sum_words needs at least one row")
    if bits < 8 * acc.dtype.itemsize:
        acc &= acc.dtype.type((1 << bits) - 1)
    return acc


def unmask_sum(
    masked_sum: npt.ArrayLike,
    *,
    bits: int,
    survivor_seeds: Mapping[str, bytes],
    dropped: Mapping[str, DroppedClient],
    run_id: str,
    round: int,
    bucket: int,
    threads: int | None = None,
) -> Words:
    """Remove the masks from the sum of the survivors' masked inputs: the survivors' plain sum mod ``2**bits``.

    Parameters
    ----------
    masked_sum : array of int
        ``sum_u y_u mod 2**bits`` over the survivors of masked-input (`sum_words`, or
        `protocols.secagg.packing.PackedSum` over their packed uploads).
    bits : int
        The bucket's word size b.
    survivor_seeds : mapping of str to bytes
        Every survivor's reconstructed self-mask seed b_u (all of them: one missing leaves its mask in).
    dropped : mapping of str to DroppedClient
        Every client that dropped after share-keys and has a surviving neighbour, with its
        reconstructed mask key and those neighbours' mask public keys.
    run_id, round, bucket
        The protocol instance.
    threads : int, optional
        Threads for the keystreams (default `MASK_THREADS`).

    Returns
    -------
    numpy.ndarray
        The unmasked sum, dtype `word_dtype` of ``bits``, a fresh array.

    Raises
    ------
    ValueError
        If a client is listed both as a survivor and as dropped, or the sum is not a flat integer vector.
    """
    check_bits(bits)
    both = sorted(set(survivor_seeds) & set(dropped))
    if both:
        raise ValueError(f"{both} cannot be both survivors and dropped: that would reveal their input")
    acc = _words(masked_sum, bits, "masked_sum")
    keys = [(derive_key(seed, purpose=INFO_SELF_MASK, run_id=run_id, round=round, bucket=bucket), -1)
            for _, seed in sorted(survivor_seeds.items())]
    for d, client in sorted(dropped.items()):
        for v, public in sorted(client.survivor_publics.items()):
            if v not in survivor_seeds:
                raise ValueError(f"{v}, a neighbour of dropped {d} whose masks are removed, is not a survivor")
            secret = agree(client.mask_private_key, public)
            key = derive_key(secret, purpose=INFO_PAIRWISE_MASK, run_id=run_id, round=round, bucket=bucket)
            keys.append((key, -_sign(v, d)))  # v's upload holds _sign(v, d) * mask: take out exactly that
    return accumulate_masks(acc, keys, bits=bits, threads=threads or MASK_THREADS)
