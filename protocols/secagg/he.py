"""``bfv`` and ``ckks``: homomorphic aggregation with TenSEAL; the server adds ciphertexts it cannot read.

Per round, four phases (all buckets at once; `protocols.secagg.he_plan` has the names):

1. ``advertise-keys``: every cohort client learns its bucket, the bucket's size and the round's
   `HEParameters`, checks them against its own settings, and sends a fresh X25519 public key.
2. ``distribute-key``: one client, the round's **key leader** (drawn with `secrets` by the
   server), builds a fresh symmetric-key TenSEAL context and a random key id, and sends it to every
   other client that advertised, each copy AES-256-GCM encrypted under
   ``HKDF(X25519(leader, client))`` bound to run, round, sender and receiver. The server routes
   the copies; it never holds a key.
3. ``encrypted-input`` (trains): each client opens its copy, trains, clips, quantises and packs
   its weighted update (`protocols.secagg.he_plan`), encrypts it in whole-ciphertext chunks and
   sends them with the key id and a SHA-256 digest. The server checks each upload (key id, chunk
   count, digest, SEAL's parameter check, values per chunk) and refuses a bad one naming the
   client; the round goes on without it. It adds each bucket's ciphertexts with a key-free context.
4. ``decrypt``: one surviving client (drawn with `secrets`; another if it does not answer) gets
   each bucket's summed ciphertext and returns the decrypted slots. The server unpacks them,
   checks the sums are in range and hands one `BucketSum` per bucket to the defense.

Trust model (docs/threat-model.md): every client of a round holds the round's secret key, so the
server colluding with any one of them reads every update of that round. TenSEAL has no threshold
decryption; SecAgg+ (``secagg+``) protects against that collusion and stays the default for
untrusted parties. Keys are fresh every round and live only in the clients' memory for that
round; nothing is written to disk.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from protocols._hazmat import (
    INFO_KEY_TRANSPORT, ShareRoute, agree, decrypt_share, derive_key, encrypt_share, generate_private_key,
    public_key_from_bytes, public_key_to_bytes,
)
from protocols._hazmat import he
from protocols.errors import MalformedMessage, Refused, StageTransitionError, WrapAround
from protocols.secagg import he_plan as hp
from protocols.secagg import secaggplus_stages as st
from protocols.secagg.base import ClientRound, SecureAggregation, ServerRound
from protocols.secagg.phases import ClientContext, PhaseData, RoundContext
from protocols.secagg.quantize import QuantizationPlan, quantize

__all__ = ["BFVAggregation", "CKKSAggregation", "HEClient", "HomomorphicAggregation", "split_chunks"]


def _check_int(key: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"setting {key} must be an integer {bound}, got {value!r}")
    return value


def _check_float(key: str, value: object, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"setting {key} must be a finite number > 0, got {value!r}")
    return float(value)


class HomomorphicAggregation(SecureAggregation):
    """Shared settings and round logic of ``bfv`` and ``ckks`` (see the module docstring).

    Parameters
    ----------
    bucket_size : int
        Most clients per bucket (one summed ciphertext each); 0 (default) keeps the whole cohort in
        one bucket. At least 3. Usually set as ``[secure] bucket_size``.
    poly_modulus_degree : int
        N. 4096 (default) is the smallest degree with room for an additions-only sum.
    coeff_mod_bit_sizes : list of int
        The coefficient-modulus primes (data primes, then the special prime); the total must stay
        within the 128-bit limit for N (109 bits at 4096).
    clip_range : float
        Coordinates are clipped to ``[-clip_range, clip_range]`` before encryption.
    max_weight : int
        Client weights (example counts) are rounded and clamped into ``[1, max_weight]``; the
        client multiplies its update by its weight before encrypting, so the server never multiplies.
    phase_timeout : float or None
        Seconds the phases that do not train stay open (None: ``run.round_timeout``).
    """

    scheme: ClassVar[str]
    reveals_individual_updates = False

    def __init__(
        self, *, bucket_size: int = 0, poly_modulus_degree: int = 4096, coeff_mod_bit_sizes: Sequence[int] | None = (54, 55),
        clip_range: float = 8.0, max_weight: int = 1024, phase_timeout: float | None = None,
    ) -> None:
        self.bucket_size = _check_int("bucket_size", bucket_size, 0)
        if 0 < bucket_size < hp.MIN_BUCKET:
            raise ValueError(f"{self.name} setting bucket_size must be 0 (whole cohort) or >= {hp.MIN_BUCKET}, got {bucket_size}")
        self.poly_modulus_degree = _check_int("poly_modulus_degree", poly_modulus_degree, 1024)
        if coeff_mod_bit_sizes is not None and (
            isinstance(coeff_mod_bit_sizes, (str, bytes)) or not isinstance(coeff_mod_bit_sizes, Sequence)
        ):
            raise ValueError(f"setting coeff_mod_bit_sizes must be a list of prime bit sizes, got {coeff_mod_bit_sizes!r}")
        self.coeff_mod_bit_sizes = None if coeff_mod_bit_sizes is None else tuple(coeff_mod_bit_sizes)
        self.clip_range = _check_float("clip_range", clip_range)
        self.max_weight = _check_int("max_weight", max_weight, 1)
        self.phase_timeout = None if phase_timeout is None else _check_float("phase_timeout", phase_timeout)
        self._uniform_weights = False
        self._params: dict[int, he.HEParameters] = {}
        self.parameters(hp.MIN_BUCKET)  # validates N, the primes, the scale or the plaintext modulus
        if bucket_size:
            self.plan(bucket_size, 2)

    # ------------------------------------------------------------------ per scheme
    def parameters(self, largest_bucket: int) -> he.HEParameters:
        """The round's `HEParameters` when its largest bucket has ``largest_bucket`` clients."""
        raise NotImplementedError

    def plan(self, bucket: int, num_values: int, params: he.HEParameters | None = None) -> hp.SlotPlan:
        """The slot plan of a bucket of ``bucket`` clients for ``num_values`` values (weight included)."""
        raise NotImplementedError

    def encode(self, update: Mapping[str, np.ndarray], *, weight: float) -> dict[str, np.ndarray]:  # pragma: no cover
        raise NotImplementedError(f"{self.name} is a multi-phase protocol")

    def to_slots(self, flat: np.ndarray, weight: int, plan: hp.SlotPlan) -> np.ndarray:
        """The slot vector of one client's quantised (BFV) or clipped (CKKS) flat update."""
        raise NotImplementedError

    def decode(self, slots: np.ndarray, plan: hp.SlotPlan, count: int) -> tuple[np.ndarray, float]:
        """``(sum of w * clip(x), sum of w)`` from a bucket's decrypted slots; raises WrapAround when out of range."""
        raise NotImplementedError

    # ------------------------------------------------------------------ weights
    def enable_uniform_weights(self) -> None:
        """Every client's weight is 1 (client-level DP with server noise: one client, one clipped update)."""
        self._uniform_weights = True
        self._params.clear()

    @property
    def weight_bound(self) -> int:
        """The largest client weight in use: 1 with uniform weights, else ``max_weight``."""
        return 1 if self._uniform_weights else self.max_weight

    # ------------------------------------------------------------------ rounds
    def bucket_sizes(self, cohort_size: int) -> list[int]:
        """The distinct bucket sizes a cohort of ``cohort_size`` splits into."""
        if not self.bucket_size or cohort_size <= self.bucket_size:
            return [cohort_size]
        count = math.ceil(cohort_size / self.bucket_size)
        return sorted({cohort_size // count, -(-cohort_size // count)})

    def check_cohort(self, size: int, *, num_values: int | None = None) -> None:
        """Refuse, before any round, a cohort whose buckets are too small or do not fit the parameters."""
        sizes = self.bucket_sizes(size)
        for n in sizes:
            if n < hp.MIN_BUCKET:
                raise ValueError(
                    f"{self.name}: a cohort of {size} split into buckets of at most {self.bucket_size or size} gives "
                    f"buckets of {n} clients; a bucket needs at least {hp.MIN_BUCKET}"
                )
        params = self.parameters(max(sizes))
        for n in sizes:
            self.plan(n, (num_values or 1) + 1, params)

    def assign_buckets(self, cohort: Sequence[str], rng: np.random.Generator) -> tuple[tuple[str, ...], ...]:
        """Split the cohort at random with `secrets` (``rng`` is not used on this path)."""
        return st.split_buckets(cohort, self.bucket_size)

    def server_round(self, context: RoundContext) -> ServerRound:
        """The server half (`protocols.secagg.he_server.HEServerRound`)."""
        from protocols.secagg.he_server import HEServerRound

        return HEServerRound(self, context)

    def client_round(self, context: ClientContext) -> ClientRound:
        """The client half, an `HEClient`."""
        return HEClient(self, context)

    def describe(self) -> dict[str, object]:
        """What the server and colluders can learn, for the threat model (docs/threat-model.md)."""
        params = self.parameters(hp.MIN_BUCKET)
        return {
            **super().describe(),
            "bucket_size": self.bucket_size or "cohort",
            "scheme": (f"{self.scheme.upper()}, N = {params.poly_modulus_degree}, coeff_mod_bit_sizes = "
                       f"{list(params.coeff_mod_bit_sizes)}" + self._scheme_detail()),
            "server_learns": "one weighted sum per bucket (and which clients it contains); it adds ciphertexts with "
                             "a context that holds no key",
            "key_custody": ("clients: each round one client (the key leader, drawn by the server) makes a fresh "
                            "symmetric key and sends it to the others encrypted with X25519 + HKDF + AES-GCM; "
                            "one surviving client decrypts the bucket sums; the server holds no key"),
            "collusion": ("every update of a round, if the server colludes with any one client of that round: all "
                          "clients share the round's secret key (TenSEAL has no threshold decryption; use secagg+ "
                          "when clients do not trust each other)"),
            "adversary_model": ("honest-but-curious server: public keys are not authenticated, so a server that "
                                "substitutes its own key in advertise-keys receives the round key, and a server that "
                                "sends one client's ciphertext to the decrypting client as a 'sum' reads that update"),
            "deviating_server": ("every update of the round, by substituting its own public key for a client's in "
                                 "advertise-keys (it then receives that client's copy of the round key), or one "
                                 "client's update, by handing its ciphertext to the decrypting client as a bucket sum"),
            "on_abort": "nothing is released; the round's key is discarded with the round",
            "weights": "uniform: every client's weight is 1" if self._uniform_weights else
                       f"example counts, rounded and clamped to [1, {self.max_weight}], applied by the clients",
        }

    def _scheme_detail(self) -> str:
        return ""


class BFVAggregation(HomomorphicAggregation):
    """``bfv``: exact integer sums of quantised, bit-packed updates (the default for homomorphic aggregation).

    Parameters
    ----------
    precision : float
        Largest quantisation step ``2c / Q`` (Q a power of two); one client's rounding error is
        below it, and so is the error of the mean. Default 2^-12 with clip range 8: Q = 2^16.
    plain_modulus_bits : int or None
        Bit length of the plaintext modulus t; None (default): the largest whose sum of the
        round's biggest bucket still decrypts with 6 bits of noise margin (at most 60).
    pack : int or None
        Values per slot; None (default): as many as fit (`protocols.secagg.he_plan.bfv_plan`); 1
        turns packing off.
    coeff_mod_bit_sizes : list of int
        The coefficient-modulus primes: data primes, then the special prime. Default ``[54, 55]``,
        the 109 bits 128-bit security allows at N = 4096.
    bucket_size : int
        Most clients per bucket (one summed ciphertext each); 0 (default) keeps the whole cohort in
        one bucket. At least 3. Usually set as ``[secure] bucket_size``.
    poly_modulus_degree : int
        N, the ring degree. 4096 (default) is the smallest with room for an additions-only sum.
    clip_range : float
        Coordinates are clipped to ``[-clip_range, clip_range]`` before encryption.
    max_weight : int
        Client weights (example counts) are rounded and clamped into ``[1, max_weight]``; each
        client multiplies its update by its weight before encrypting (the server never multiplies).
    phase_timeout : float or None
        Seconds the phases that do not train stay open (None: ``run.round_timeout``).
    """

    name = "bfv"
    scheme = "bfv"
    paper = "https://eprint.iacr.org/2012/144"

    def __init__(
        self, *, bucket_size: int = 0, poly_modulus_degree: int = 4096, coeff_mod_bit_sizes: Sequence[int] = (54, 55),
        clip_range: float = 8.0, precision: float = 2.0**-12, plain_modulus_bits: int | None = None,
        pack: int | None = None, max_weight: int = 1024, phase_timeout: float | None = None,
    ) -> None:
        self.precision = _check_float("precision", precision)
        if self.precision >= 2 * _check_float("clip_range", clip_range):
            raise ValueError(f"setting precision={precision} must be below 2 * clip_range={2 * clip_range}")
        self.plain_modulus_bits = None if plain_modulus_bits is None else _check_int("plain_modulus_bits", plain_modulus_bits, 18, 60)
        self.pack = None if pack is None else _check_int("pack", pack, 1, 16)
        self.levels = hp.levels_for(float(clip_range), self.precision)
        super().__init__(bucket_size=bucket_size, poly_modulus_degree=poly_modulus_degree,
                         coeff_mod_bit_sizes=coeff_mod_bit_sizes, clip_range=clip_range, max_weight=max_weight,
                         phase_timeout=phase_timeout)

    def parameters(self, largest_bucket: int) -> he.HEParameters:
        if largest_bucket not in self._params:
            sizes = self.coeff_mod_bit_sizes or (54, 55)
            probe = he.HEParameters("ckks", self.poly_modulus_degree, sizes, scale_bits=10)
            most = min(60, probe.data_bits - he.BFV_NOISE_MARGIN_BITS - math.ceil(math.log2(max(1, largest_bucket))))
            bits = most if self.plain_modulus_bits is None else self.plain_modulus_bits
            if bits > most:
                raise ValueError(
                    f"setting plain_modulus_bits={bits}: a sum of {largest_bucket} ciphertexts with {probe.data_bits} data "
                    f"bits decrypts reliably only up to {most} bits; lower it, the bucket size, or add data bits"
                )
            if bits < 18:
                raise ValueError(
                    f"{probe.data_bits} data bits leave a plaintext modulus of only {bits} bits for a sum of "
                    f"{largest_bucket}; use larger coeff_mod_bit_sizes or smaller buckets"
                )
            self._params[largest_bucket] = he.HEParameters(
                "bfv", self.poly_modulus_degree, sizes,
                plain_modulus=he.batching_prime(self.poly_modulus_degree, bits),
            )
        return self._params[largest_bucket]

    def plan(self, bucket: int, num_values: int, params: he.HEParameters | None = None) -> hp.SlotPlan:
        params = params or self.parameters(bucket)
        return hp.bfv_plan(params, bucket_size=bucket, num_values=num_values, levels=self.levels,
                           weight_bound=self.weight_bound, per_slot=self.pack)

    def to_slots(self, flat: np.ndarray, weight: int, plan: hp.SlotPlan) -> np.ndarray:
        values = np.empty(flat.size + 1, dtype=np.uint64)
        values[:-1] = flat
        values[:-1] *= np.uint64(weight)
        values[-1] = weight
        return hp.pack_fields(values, plan)

    def decode(self, slots: np.ndarray, plan: hp.SlotPlan, count: int) -> tuple[np.ndarray, float]:
        fields = hp.unpack_fields(slots, plan)
        weight = int(fields[-1])
        if not count <= weight <= count * plan.weight_bound:
            raise WrapAround(f"the decrypted total weight {weight} of {count} client(s) is outside [{count}, "
                             f"{count * plan.weight_bound}]: a client sent out-of-range values or encrypted under another key")
        sums = fields[:-1]
        bad = np.flatnonzero(sums > weight * plan.levels)
        if bad.size:
            raise WrapAround(f"{bad.size} decrypted sum(s) exceed total_weight * Q = {weight * plan.levels} (first: index "
                             f"{int(bad[0])}): a client sent out-of-range values or encrypted under another key")
        numerator = 2 * sums - np.int64(weight * plan.levels)
        return numerator.astype(np.float64) * (self.clip_range / plan.levels), float(weight)

    def quantise_flat(self, flat: np.ndarray) -> np.ndarray:
        """Clip and stochastically round a flat float update onto ``[0, Q]`` (a `secrets`-seeded generator)."""
        plan = QuantizationPlan(clip_range=self.clip_range, levels=self.levels, bucket_size=1)
        return quantize(flat, plan, np.random.default_rng(secrets.randbits(128)))

    def _scheme_detail(self) -> str:
        return f", exact integer sums, Q = {self.levels} levels over [-{self.clip_range:g}, {self.clip_range:g}]"


class CKKSAggregation(HomomorphicAggregation):
    """``ckks``: approximate real sums, one value per slot, no quantisation.

    Clients encrypt ``w * clip(x)`` and their integer weight ``w``; the decrypted total weight is
    rounded to the integer it must be. The sum of a bucket of ``n`` stays within ``n W c``, which
    must lie well inside the integer headroom ``2^(q0 - scale_bits - 1)`` (q0 the first prime).

    Parameters
    ----------
    coeff_mod_bit_sizes : list of int or None
        None (default): ``[q0, q0]`` with the smallest q0 whose headroom holds ``4 n W c`` for the
        round's largest bucket (at most 54 bits at N = 4096: 128-bit security allows 109 in all).
        An explicit list is checked against the same bound.
    scale_bits : int
        log2 of the CKKS scale (default 25); the decryption error of a sum is about
        ``2^-scale_bits`` times the noise (5e-5 absolute on a sum of 10 at the default).
    bucket_size : int
        Most clients per bucket (one summed ciphertext each); 0 (default) keeps the whole cohort in
        one bucket. At least 3. Usually set as ``[secure] bucket_size``.
    poly_modulus_degree : int
        N, the ring degree. 4096 (default) is the smallest with room for an additions-only sum.
    clip_range : float
        Coordinates are clipped to ``[-clip_range, clip_range]`` before encryption.
    max_weight : int
        Client weights (example counts) are rounded and clamped into ``[1, max_weight]``; each
        client multiplies its update by its weight before encrypting (the server never multiplies).
    phase_timeout : float or None
        Seconds the phases that do not train stay open (None: ``run.round_timeout``).
    """

    name = "ckks"
    scheme = "ckks"
    paper = "https://eprint.iacr.org/2016/421"

    def __init__(
        self, *, bucket_size: int = 0, poly_modulus_degree: int = 4096, coeff_mod_bit_sizes: Sequence[int] | None = None,
        scale_bits: int = 25, clip_range: float = 8.0, max_weight: int = 1024, phase_timeout: float | None = None,
    ) -> None:
        self.scale_bits = _check_int("scale_bits", scale_bits, 10, 58)
        super().__init__(bucket_size=bucket_size, poly_modulus_degree=poly_modulus_degree,
                         coeff_mod_bit_sizes=coeff_mod_bit_sizes, clip_range=clip_range, max_weight=max_weight,
                         phase_timeout=phase_timeout)

    def parameters(self, largest_bucket: int) -> he.HEParameters:
        if largest_bucket not in self._params:
            sizes = self.coeff_mod_bit_sizes
            if sizes is None:
                need = math.ceil(math.log2(4.0 * largest_bucket * self.weight_bound * self.clip_range))
                q0 = max(20, self.scale_bits + 1 + need + 1)
                most = min(60, he.MAX_COEFF_BITS.get(self.poly_modulus_degree, 0) // 2)
                if q0 > most:
                    raise ValueError(
                        f"a CKKS sum of {largest_bucket} clients with weights up to {self.weight_bound} and clip_range="
                        f"{self.clip_range} needs a {q0}-bit first prime at scale_bits={self.scale_bits}; at most {most} "
                        f"fit 128-bit security at poly_modulus_degree={self.poly_modulus_degree}: lower max_weight, "
                        "scale_bits or the bucket size"
                    )
                sizes = (q0, q0)
            self._params[largest_bucket] = he.HEParameters("ckks", self.poly_modulus_degree, sizes,
                                                           scale_bits=self.scale_bits)
        return self._params[largest_bucket]

    def plan(self, bucket: int, num_values: int, params: he.HEParameters | None = None) -> hp.SlotPlan:
        return hp.ckks_plan(params or self.parameters(bucket), bucket_size=bucket, num_values=num_values,
                            clip_range=self.clip_range, weight_bound=self.weight_bound)

    def to_slots(self, flat: np.ndarray, weight: int, plan: hp.SlotPlan) -> np.ndarray:
        out = np.empty(flat.size + 1, dtype=np.float64)
        np.multiply(np.clip(flat, -self.clip_range, self.clip_range), float(weight), out=out[:-1])
        out[-1] = weight
        return out

    def decode(self, slots: np.ndarray, plan: hp.SlotPlan, count: int) -> tuple[np.ndarray, float]:
        values = np.asarray(slots, dtype=np.float64)
        if not np.isfinite(values).all():
            raise WrapAround("the decrypted sum holds non-finite values: a client encrypted under another key")
        # Weights are integers, so their sum is too: rounding removes the decryption error, and a
        # sum far from an integer means the slots did not decrypt to what honest clients sent.
        weight = round(float(values[-1]))
        if abs(values[-1] - weight) > 0.25 or not count <= weight <= count * plan.weight_bound:
            raise WrapAround(f"the decrypted total weight {values[-1]:g} of {count} client(s) is not an integer in "
                             f"[{count}, {count * plan.weight_bound}]: a client sent out-of-range values or encrypted "
                             "under another key")
        sums = values[:-1]
        bound = weight * self.clip_range * (1 + 1e-9) + 0.25
        bad = np.flatnonzero(np.abs(sums) > bound)
        if bad.size:
            raise WrapAround(f"{bad.size} decrypted sum(s) exceed total_weight * clip_range = {weight * self.clip_range:g} "
                             f"(first: index {int(bad[0])}): a client sent out-of-range values or encrypted under another key")
        return sums, float(weight)

    def _scheme_detail(self) -> str:
        return f", scale 2^{self.scale_bits}, approximate real sums"


class HEClient(ClientRound):
    """The client half of one homomorphic round; its keys live until `close`."""

    def __init__(self, protocol: HomomorphicAggregation, context: ClientContext) -> None:
        self.protocol, self.context = protocol, context
        self.me = context.client_id
        self.stage = 0
        self.transport_key = generate_private_key()
        self.params: he.HEParameters | None = None
        self.plan: hp.SlotPlan | None = None
        self.buckets = 0
        self.secret: Any = None  # the round's TenSEAL context, once known
        self.key_id = b""
        self.leader_bytes: bytes | None = None  # leader only: what it sends to the others

    @property
    def num_values(self) -> int:
        """d + 1: the update's values and the weight."""
        return sum(size for _, _, size in st.update_layout(self.context.update_spec)) + 1

    def _expect(self, phase: str) -> None:
        """Move to ``phase``; only the leader answers distribute-key, so the others skip it."""
        expected = hp.PHASES[self.stage] if self.stage < len(hp.PHASES) else "(none: the round is over)"
        skips = phase == hp.ENCRYPTED_INPUT and expected == hp.DISTRIBUTE_KEY
        if phase != expected and not skips:
            raise StageTransitionError(f"{self.protocol.name} client {self.me}: got phase {phase!r}, expected {expected!r}")
        self.stage = hp.PHASES.index(phase) + 1

    def _route(self, sender: str, receiver: str) -> ShareRoute:
        return ShareRoute(self.context.run_id, self.context.round, 0, sender, receiver)

    def _transport_key(self, peer_public: bytes) -> bytes:
        secret = agree(self.transport_key, public_key_from_bytes(peer_public))
        return derive_key(secret, purpose=INFO_KEY_TRANSPORT, run_id=self.context.run_id, round=self.context.round, bucket=0)

    def on_phase(self, phase: str, data: PhaseData) -> PhaseData:
        """Answer ``advertise-keys``, ``distribute-key`` (the leader) and ``decrypt``."""
        if phase == hp.ADVERTISE_KEYS:
            self._expect(phase)
            return self._advertise(data)
        if phase == hp.DISTRIBUTE_KEY:
            self._expect(phase)
            return self._distribute(data)
        if phase.startswith(hp.DECRYPT):
            if self.stage != len(hp.PHASES) - 1:
                raise StageTransitionError(f"{self.protocol.name} client {self.me}: asked to decrypt before its "
                                           "encrypted input, or a second time")
            answer = self._decrypt(data)
            self.stage = len(hp.PHASES)  # one decryption per round; a refused request does not count
            return answer
        raise StageTransitionError(f"{self.protocol.name} client {self.me}: no phase {phase!r} to answer")

    def _advertise(self, data: PhaseData) -> PhaseData:
        name = self.protocol.name
        size = st.decode_int(data.blobs.get(hp.SIZE), hp.SIZE)
        self.buckets = st.decode_int(data.blobs.get(hp.BUCKETS), hp.BUCKETS)
        if size < hp.MIN_BUCKET:
            raise Refused(f"{name} client {self.me}: refusing a bucket of {size} clients (at least {hp.MIN_BUCKET})")
        params = he.HEParameters.from_bytes(data.blobs.get(hp.PARAMS))
        mine = self.protocol.parameters(size)
        fixed = self.protocol.coeff_mod_bit_sizes is not None  # else chosen per round for the largest bucket
        if (params.scheme, params.poly_modulus_degree, params.scale_bits) != (
            mine.scheme, mine.poly_modulus_degree, mine.scale_bits
        ) or (fixed and params.coeff_mod_bit_sizes != mine.coeff_mod_bit_sizes):
            raise Refused(f"{name} client {self.me}: the round's parameters {params} differ from my settings {mine}")
        try:
            self.plan = self.protocol.plan(size, self.num_values, params)
        except ValueError as exc:
            raise Refused(f"{name} client {self.me}: refusing a bucket of {size}: {exc}") from None
        self.params = params
        return PhaseData(blobs={hp.PUBLIC_KEY: public_key_to_bytes(self.transport_key.public_key())})

    def _distribute(self, data: PhaseData) -> PhaseData:
        """Leader: make the round's key and encrypt one copy to every peer named."""
        assert self.params is not None
        peers = {}
        for name, blob in data.blobs.items():
            peer = name[len(hp.PEER_KEY):] if name.startswith(hp.PEER_KEY) else ""
            if not peer or peer == self.me:
                raise MalformedMessage(f"{self.protocol.name} client {self.me}: unexpected distribute-key blob {name!r}")
            peers[peer] = bytes(blob)
        self.secret = he.new_secret_context(self.params)
        self.key_id = secrets.token_bytes(hp.KEY_ID_BYTES)
        plaintext = self.key_id + he.secret_context_bytes(self.secret)
        tensors = {}
        for peer, public in sorted(peers.items()):
            sealed = encrypt_share(self._transport_key(public), plaintext, route=self._route(self.me, peer))
            tensors[hp.TRANSPORTED + peer] = np.frombuffer(sealed, dtype=np.uint8)
        return PhaseData(tensors=tensors, blobs={hp.KEY_ID: self.key_id})

    def _open_key(self, data: PhaseData) -> None:
        """Non-leader: decrypt my copy of the round key from the leader."""
        assert self.params is not None
        leader = bytes(data.blobs.get(hp.LEADER, b"")).decode("utf-8", "replace")
        sealed, public = data.blobs.get(hp.KEY), data.blobs.get(hp.LEADER_KEY)
        if not leader or sealed is None or public is None:
            raise MalformedMessage(f"{self.protocol.name} client {self.me}: the encrypted-input task carries no round key")
        if len(sealed) > hp.MAX_SECRET_CONTEXT_BYTES:
            raise MalformedMessage(f"{self.protocol.name} client {self.me}: round key of {len(sealed)} bytes is too large")
        plaintext = decrypt_share(self._transport_key(bytes(public)), bytes(sealed), route=self._route(leader, self.me))
        self.key_id = plaintext[: hp.KEY_ID_BYTES]
        self.secret = he.load_secret_context(plaintext[hp.KEY_ID_BYTES :], self.params)

    def quantise(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """BFV: clip and round each tensor (flattened) onto ``[0, Q]``; CKKS: the float update, flattened."""
        if self.plan is None:
            raise StageTransitionError(f"{self.protocol.name} client {self.me}: asked to train before advertise-keys")
        if isinstance(self.protocol, BFVAggregation):
            return {name: self.protocol.quantise_flat(np.ravel(value)) for name, value in update.items()}
        return {name: np.ravel(np.asarray(value, dtype=np.float64)) for name, value in update.items()}

    def mask(self, quantised: Mapping[str, np.ndarray], *, weight: float, data: PhaseData) -> PhaseData:
        """Open the round key (unless I made it), weight, pack and encrypt my update."""
        self._expect(hp.ENCRYPTED_INPUT)
        assert self.plan is not None and self.params is not None
        if self.secret is None:
            self._open_key(data)
        layout = st.update_layout(self.context.update_spec)
        if sorted(quantised) != sorted(name for name, _, _ in layout):
            raise MalformedMessage(f"{self.protocol.name} client {self.me}: update tensors {sorted(quantised)} differ from the spec")
        flat = np.concatenate([np.ravel(quantised[name]) for name, _, _ in layout])
        w = max(1, min(self.protocol.weight_bound, int(round(weight))))
        slots = self.protocol.to_slots(flat, w, self.plan)
        chunks = he.encrypt_slots(self.secret, self.params, slots)
        sizes = np.asarray([len(c) for c in chunks], dtype=np.uint32)
        blob = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        return PhaseData(
            tensors={hp.CIPHERTEXT: blob, hp.CHUNK_SIZES: sizes},
            blobs={hp.KEY_ID: self.key_id, hp.DIGEST: he.digest(chunks, key_id=self.key_id)},
        )

    def _decrypt(self, data: PhaseData) -> PhaseData:
        """Decrypt each bucket's summed ciphertext; refuse more sums than the round has buckets."""
        name = self.protocol.name
        if self.secret is None or self.params is None:
            raise Refused(f"{name} client {self.me}: asked to decrypt without this round's key")
        try:
            sizes = {int(b): int(n) for b, n in json.loads(bytes(data.blobs.get(hp.BUCKET_SIZES, b"{}"))).items()}
        except (ValueError, TypeError, AttributeError):
            raise MalformedMessage(f"{name} client {self.me}: malformed bucket sizes in the decrypt task") from None
        if not 1 <= len(sizes) <= self.buckets:
            raise Refused(f"{name} client {self.me}: asked to decrypt {len(sizes)} sums; this round has {self.buckets} bucket(s)")
        tensors = {}
        for bucket, size in sorted(sizes.items()):
            if size < hp.MIN_BUCKET:
                raise Refused(f"{name} client {self.me}: refusing to decrypt the sum of a bucket of {size}")
            raw = data.tensors.get(hp.SUM + str(bucket))
            chunk_sizes = data.tensors.get(hp.SUM_SIZES + str(bucket))
            if raw is None or chunk_sizes is None:
                raise MalformedMessage(f"{name} client {self.me}: the decrypt task lacks bucket {bucket}'s sum")
            plan = self.protocol.plan(size, self.num_values, self.params)
            chunks = split_chunks(bytes(np.ascontiguousarray(raw, dtype=np.uint8)), chunk_sizes, who="server")
            try:
                plain = he.decrypt_slots(self.secret, self.params, chunks, plan.chunk_sizes)
            except MalformedMessage as exc:
                raise MalformedMessage(f"{name} client {self.me}: bucket {bucket}'s sum: {exc}") from None
            tensors[hp.PLAIN + str(bucket)] = plain
        return PhaseData(tensors=tensors)

    def close(self) -> None:
        """Forget the round key (Python cannot wipe memory; the references go)."""
        self.secret = None
        self.key_id = b""
        self.stage = len(hp.PHASES)


def split_chunks(raw: bytes, sizes: np.ndarray, *, who: str) -> list[bytes]:
    """Cut concatenated ciphertext chunks by their sizes; raise `MalformedMessage` on a mismatch."""
    lengths = [int(s) for s in np.ravel(np.asarray(sizes))]
    if sum(lengths) != len(raw) or any(n <= 0 for n in lengths):
        raise MalformedMessage(f"{who}: chunk sizes sum to {sum(lengths)} bytes, the ciphertext has {len(raw)}")
    out, offset = [], 0
    for n in lengths:
        out.append(raw[offset : offset + n])
        offset += n
    return out

