"""The server half of a SecAgg+ round: routes keys and encrypted shares, checks that every bucket
can still be unmasked after each phase, and unmasks the bucket sums.

What the server holds: public keys, ciphertexts it cannot open, each client's masked (uniformly
random-looking) words, and in ``unmask`` the self-mask seeds b_u of the survivors of
``masked-input`` and the mask keys s_d of the clients that dropped in it, never both for one
client, so it learns each bucket's weighted sum and nothing finer.

With distributed noise on (`SecAggPlus.enable_distributed_noise`) each plan carries the noise
headroom, a bucket whose survivors of masked-input are fewer than `SecAggPlus.min_survivors`
aborts the round before ``unmask`` is declared, and the unmask payload also lists every survivor
of the bucket (clients refuse too few themselves).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocols._hazmat import Share, combine, load_private_key, public_key_from_bytes
from protocols.errors import MalformedMessage, ProtocolAbort, ProtocolError, StageTransitionError, WrapAround
from protocols.secagg import secaggplus_stages as st
from protocols.secagg.base import BucketSum, ServerRound
from protocols.secagg.packing import PackedSum, check_packed, packed_size
from protocols.secagg.phases import AnswerSpec, BlobSpec, Phase, PhaseData, PhaseResult, RoundContext
from protocols.secagg.quantize import QuantizationPlan, dequantize_sum
from protocols.secagg.secaggplus import SecAggPlus
from protocols.secagg.secaggplus_masks import MASK_THREADS, DroppedClient, unmask_sum
from protocols.secagg.secaggplus_params import GraphParameters
from protocols.wire.serde import TensorSpec

__all__ = ["SecAggPlusServer"]


@dataclass
class _Bucket:
    """What the server knows about one instance (bucket) of the protocol."""

    index: int
    members: tuple[str, ...]
    plan: QuantizationPlan | None = None
    parameters: GraphParameters | None = None
    mask_public: dict[str, X25519PublicKey] = field(default_factory=dict)
    enc_public: dict[str, bytes] = field(default_factory=dict)
    raw_mask_public: dict[str, bytes] = field(default_factory=dict)
    graph: dict[str, tuple[str, ...]] = field(default_factory=dict)
    threshold: dict[str, int] = field(default_factory=dict)
    shared: tuple[str, ...] = ()  # survivors of share-keys
    ciphertexts: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (sender, receiver) -> ciphertext
    masked: set[str] = field(default_factory=set)  # survivors of masked-input (their upload was well formed)
    masked_sum: np.ndarray | None = None  # the sum of their masked words mod 2^b
    dropped: tuple[str, ...] = ()  # dropped in masked-input after sharing, with surviving neighbours

    def where(self) -> str:
        return f"bucket {self.index} ({len(self.members)} clients)"


class SecAggPlusServer(ServerRound):
    """Declares the four phases for all buckets at once and unmasks one `BucketSum` per bucket."""

    def __init__(self, protocol: SecAggPlus, context: RoundContext) -> None:
        self.protocol, self.context = protocol, context
        self.layout = st.update_layout(context.update_spec)
        self.words = sum(size for _, _, size in self.layout) + 1  # the weight is the last word
        self.buckets = [_Bucket(i, tuple(members)) for i, members in enumerate(context.buckets)]
        self.bucket_of = {c: b for b in self.buckets for c in b.members}
        self.sums: list[BucketSum] | None = None
        self.began = False
        self.open: Phase | None = None  # the declared phase whose result `next_phase` takes next

    # ------------------------------------------------------------------ phases
    def first_phase(self) -> Phase:
        if self.began:
            raise StageTransitionError(f"secagg+ round {self.context.round}: the round already began")
        self.began = True
        payloads = {}
        for bucket in self.buckets:
            size = len(bucket.members)
            if size < st.MIN_BUCKET:
                raise ProtocolAbort(f"secagg+ {bucket.where()}: a bucket needs at least {st.MIN_BUCKET} clients")
            try:
                bucket.plan = self.protocol.plan(size, self.words - 1)
            except ValueError as exc:
                if self.protocol.noise_enabled:
                    raise ProtocolAbort(f"secagg+ {bucket.where()}: {exc}") from None
                raise ProtocolAbort(
                    f"secagg+ {bucket.where()}: the sum of {size} clients needs more than 32-bit words with "
                    f"clip_range={self.protocol.clip_range}, precision={self.protocol.precision}, "
                    f"max_weight={self.protocol.max_weight}; set [secure] bucket_size <= "
                    f"{self.protocol.largest_bucket()}"
                ) from None
            try:
                bucket.parameters = self.protocol.parameters(size)
            except ValueError as exc:
                raise ProtocolAbort(f"secagg+ {bucket.where()}: {exc}") from None
            for c in bucket.members:
                payloads[c] = PhaseData(blobs={st.BUCKET: str(bucket.index).encode(), st.SIZE: str(size).encode()})
        spec = AnswerSpec(blobs=(BlobSpec(st.ENCRYPTION_KEY, st.PUBLIC_KEY_BYTES), BlobSpec(st.MASK_KEY, st.PUBLIC_KEY_BYTES)))
        self.open = Phase(st.ADVERTISE_KEYS, self.context.cohort, spec, payloads=payloads, timeout=self.protocol.phase_timeout)
        return self.open

    def next_phase(self, result: PhaseResult) -> Phase | None:
        """Take the result of the phase declared last (and only that one); after an abort, none."""
        handlers = {
            st.ADVERTISE_KEYS: self._after_advertise, st.SHARE_KEYS: self._after_share_keys,
            st.MASKED_INPUT: self._after_masked_input, st.UNMASK: self._after_unmask,
        }
        declared = self.open
        if declared is None or result.phase.name != declared.name:
            raise StageTransitionError(
                f"secagg+ round {self.context.round}: got the result of phase {result.phase.name!r}, but the open "
                f"phase is {repr(declared.name) if declared is not None else 'none'}"
            )
        if result.phase is not declared:
            raise StageTransitionError(
                f"secagg+ round {self.context.round}: got a result of phase {result.phase.name!r} that this round "
                "did not declare (another round's, or a copy)"
            )
        self.open = None  # a handler that aborts leaves no phase open
        self.open = handlers[result.phase.name](result)
        return self.open

    def _after_advertise(self, result: PhaseResult) -> Phase:
        payloads: dict[str, PhaseData] = {}
        most = 1
        for bucket in self.buckets:
            for c in bucket.members:
                answer = result.answers.get(c)
                if answer is None:
                    continue
                try:
                    bucket.mask_public[c] = public_key_from_bytes(bytes(answer.blobs[st.MASK_KEY]))
                    public_key_from_bytes(bytes(answer.blobs[st.ENCRYPTION_KEY]))
                except (KeyError, ProtocolError):
                    bucket.mask_public.pop(c, None)
                    continue  # a malformed key counts as a drop
                bucket.enc_public[c] = bytes(answer.blobs[st.ENCRYPTION_KEY])
                bucket.raw_mask_public[c] = bytes(answer.blobs[st.MASK_KEY])
                if bucket.enc_public[c] == bucket.raw_mask_public[c]:
                    del bucket.enc_public[c], bucket.raw_mask_public[c], bucket.mask_public[c]
            alive = sorted(bucket.mask_public)
            if len(alive) < st.MIN_BUCKET:
                raise ProtocolAbort(
                    f"secagg+ {bucket.where()}: only {len(alive)} client(s) advertised keys ({', '.join(alive) or 'none'}); "
                    f"a bucket needs at least {st.MIN_BUCKET}"
                )
            assert bucket.parameters is not None
            bucket.graph = st.neighbour_graph(alive, bucket.parameters.graph_degree)
            for u, peers in bucket.graph.items():
                bucket.threshold[u] = self.protocol.share_threshold(bucket.parameters, len(peers))
                if not 2 <= bucket.threshold[u] <= len(peers):
                    raise ProtocolAbort(
                        f"secagg+ {bucket.where()} after advertise-keys: {u} has {len(peers)} neighbour(s) but "
                        f"t = {bucket.threshold[u]} (k = {bucket.parameters.k}); too many clients dropped"
                    )
                most = max(most, len(peers))
                blobs = {f"{st.ENCRYPTION_KEY}/{v}": bucket.enc_public[v] for v in peers}
                blobs.update({f"{st.MASK_KEY}/{v}": bucket.raw_mask_public[v] for v in peers})
                payloads[u] = PhaseData(blobs=blobs)
        spec = AnswerSpec(blobs=(BlobSpec(st.SHARE, st.CIPHERTEXT_BYTES, max_count=most),))
        return Phase(st.SHARE_KEYS, tuple(sorted(payloads)), spec, payloads=payloads, timeout=self.protocol.phase_timeout)

    def _after_share_keys(self, result: PhaseResult) -> Phase:
        payloads: dict[str, PhaseData] = {}
        for bucket in self.buckets:
            shared = []
            for u, peers in bucket.graph.items():
                answer = result.answers.get(u)
                if answer is None or sorted(answer.blobs) != sorted(st.SHARE + v for v in peers):
                    continue  # dropped, or did not share with exactly its neighbours
                shared.append(u)
                for v in peers:
                    bucket.ciphertexts[(u, v)] = bytes(answer.blobs[st.SHARE + v])
            bucket.shared = tuple(sorted(shared))
            for u in bucket.shared:
                self._require(bucket, u, set(bucket.shared), "after share-keys", "secrets")
            for u in bucket.shared:
                blobs = {st.SHARE + v: bucket.ciphertexts[(v, u)] for v in bucket.graph[u] if v in bucket.shared}
                payloads[u] = PhaseData(blobs=blobs)
        sizes = {packed_size(self.words, b.plan.bits) for b in self.buckets if b.plan is not None}
        # one word size: the coordinator refuses any other length; several: it bounds it, and a
        # length that is not the client's bucket's counts as a drop (`_after_masked_input`)
        spec = AnswerSpec(tensors={st.MASKED: TensorSpec(st.MASKED, "uint8", (max(sizes),), variable=len(sizes) > 1)})
        return Phase(st.MASKED_INPUT, tuple(sorted(payloads)), spec, payloads=payloads, trains=True)

    def _after_masked_input(self, result: PhaseResult) -> Phase:
        payloads: dict[str, PhaseData] = {}
        for bucket in self.buckets:
            assert bucket.plan is not None
            expected = packed_size(self.words, bucket.plan.bits)
            uploads = {}
            for u in bucket.shared:
                answer = result.answers.get(u)
                if answer is None or answer.tensors[st.MASKED].shape != (expected,):
                    continue  # dropped, or a malformed upload: its pairwise masks are removed like a drop's
                try:
                    raw = np.ascontiguousarray(answer.tensors[st.MASKED], dtype=np.uint8)
                    uploads[u] = check_packed(raw, bucket.plan.bits, self.words)
                except MalformedMessage:
                    continue  # non-zero padding bits: refused, counted like a drop
            summed = PackedSum(bucket.plan.bits, self.words)  # one running sum, no unpacked array per client
            summed.add_many(list(uploads.values()), threads=MASK_THREADS)
            bucket.masked = set(uploads)
            bucket.masked_sum = summed.total()
            survivors = set(bucket.masked)
            if not survivors:
                raise ProtocolAbort(
                    f"secagg+ {bucket.where()} after masked-input: no masked input arrived "
                    f"(gone: {', '.join(sorted(bucket.members)) or 'none'})"
                )
            bucket.dropped = tuple(
                sorted(d for d in bucket.shared if d not in survivors and survivors & set(bucket.graph[d]))
            )
            if self.protocol.noise_enabled and len(survivors) < self.protocol.min_survivors(len(bucket.members)):
                raise ProtocolAbort(
                    f"secagg+ {bucket.where()} after masked-input: {len(survivors)} survivor(s), but the clients' "
                    f"distributed noise was sized for at least {self.protocol.min_survivors(len(bucket.members))} "
                    "(the bucket size minus the tolerated dropouts); unmasking would release a sum with less "
                    "noise than accounted, so nothing is unmasked"
                )
            for u in sorted(survivors):
                self._require(bucket, u, survivors, "after masked-input", "self-mask seed")
            for d in bucket.dropped:
                self._require(bucket, d, survivors, "after masked-input", "mask key (it dropped)")
            shared = set(bucket.shared)
            everyone = {st.SURVIVORS: st.encode_ids(sorted(survivors))} if self.protocol.noise_enabled else {}
            for w in sorted(survivors):
                held = [v for v in bucket.graph[w] if v in shared]
                payloads[w] = PhaseData(blobs={
                    st.SURVIVED: st.encode_ids([v for v in held if v in survivors]),
                    st.DROPPED: st.encode_ids([v for v in held if v in bucket.dropped]),
                    **everyone,
                })
        most = max(len(peers) for b in self.buckets for peers in b.graph.values())
        spec = AnswerSpec(blobs=(
            BlobSpec(st.SEED_SHARE, st.ONE_SHARE_BYTES, max_count=most),
            BlobSpec(st.KEY_SHARE, st.ONE_SHARE_BYTES, max_count=most),
        ))
        return Phase(st.UNMASK, tuple(sorted(payloads)), spec, payloads=payloads, timeout=self.protocol.phase_timeout)

    def _after_unmask(self, result: PhaseResult) -> None:
        self.sums = [self._unmask_bucket(bucket, result) for bucket in self.buckets]
        return None

    def result(self) -> list[BucketSum]:
        if self.sums is None:
            raise StageTransitionError("the secagg+ round has not finished its unmask phase")
        return self.sums

    # ------------------------------------------------------------------ helpers
    def _require(self, bucket: _Bucket, u: str, holders: set[str], when: str, what: str) -> None:
        """Abort unless at least t of ``u``'s neighbours are among ``holders``."""
        have = sorted(set(bucket.graph[u]) & holders)
        need = bucket.threshold[u]
        if len(have) < need:
            gone = sorted(set(bucket.graph[u]) - holders)
            raise ProtocolAbort(
                f"secagg+ {bucket.where()} {when}: only {len(have)} of {u}'s neighbours remain "
                f"({', '.join(have) or 'none'}; gone: {', '.join(gone)}), but its {what} needs t = {need} shares"
            )

    def _reconstruct(self, bucket: _Bucket, u: str, result: PhaseResult, prefix: str, what: str) -> bytes:
        shares = []
        for v in bucket.graph[u]:
            answer = result.answers.get(v)
            if answer is not None and prefix + u in answer.blobs:
                try:
                    shares.append(Share.from_bytes(bytes(answer.blobs[prefix + u])))
                except ProtocolError as exc:
                    raise ProtocolAbort(f"secagg+ {bucket.where()}: {v} sent a malformed share of {u}'s {what}: {exc}") from None
        need = bucket.threshold[u]
        if len(shares) < need:
            raise ProtocolAbort(
                f"secagg+ {bucket.where()} after unmask: {len(shares)} share(s) of {u}'s {what} arrived, t = {need} needed"
            )
        try:
            return combine(shares, threshold=need)[0]
        except ProtocolError as exc:
            raise ProtocolAbort(f"secagg+ {bucket.where()}: cannot reconstruct {u}'s {what}: {exc}") from None

    def _unmask_bucket(self, bucket: _Bucket, result: PhaseResult) -> BucketSum:
        assert bucket.plan is not None and bucket.masked_sum is not None
        bits, survivors = bucket.plan.bits, sorted(bucket.masked)
        seeds = {u: self._reconstruct(bucket, u, result, st.SEED_SHARE, "self-mask seed") for u in survivors}
        dropped = {
            d: DroppedClient(
                load_private_key(self._reconstruct(bucket, d, result, st.KEY_SHARE, "mask key")),
                {v: bucket.mask_public[v] for v in bucket.graph[d] if v in bucket.masked},
            )
            for d in bucket.dropped
        }
        total = unmask_sum(
            bucket.masked_sum, bits=bits, survivor_seeds=seeds, dropped=dropped, run_id=self.context.run_id,
            round=self.context.round, bucket=bucket.index,
        )
        weight = int(total[-1])
        if not len(survivors) <= weight <= len(survivors) * bucket.plan.max_weight:
            raise WrapAround(
                f"secagg+ {bucket.where()}: unmasked total weight {weight} is outside [{len(survivors)}, "
                f"{len(survivors) * bucket.plan.max_weight}]: a client sent out-of-range words or a mask did not cancel"
            )
        flat = dequantize_sum(total[:-1], bucket.plan, len(survivors), weight)
        sums: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape, size in self.layout:
            sums[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        return BucketSum(total=sums, weight=float(weight), members=tuple(survivors))
