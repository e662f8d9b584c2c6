"""The server half of a homomorphic round: routes the round key, adds ciphertexts, asks a client to decrypt.

What the server holds: the round's parameters, the clients' X25519 public keys, the leader's key
copies (AES-GCM ciphertexts it cannot open), each client's ciphertexts (which its key-free context
can add but not decrypt), and each bucket's decrypted sum.

Every upload is checked before it is added, and a bad one is refused, named in `refused`, and
left out of the sum (the round goes on): the key id must be the round's (a client that encrypted
under another round's or another run's key), the chunk count and sizes must match the bucket's
plan, the SHA-256 digest must match the bytes, and each chunk must load as a ciphertext of the
round's parameters holding the expected number of values (SEAL's own check). A bucket left with
fewer than two summands is not decrypted (its members count as dropped).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocols._hazmat import he
from protocols._hazmat.keys import KEY_BYTES
from protocols.errors import MalformedMessage, ProtocolAbort, ProtocolError, StageTransitionError, WrapAround
from protocols.secagg import he_plan as hp
from protocols.secagg.base import BucketSum, ServerRound
from protocols.secagg.he import HomomorphicAggregation, split_chunks
from protocols.secagg.phases import AnswerSpec, BlobSpec, Phase, PhaseData, PhaseResult, RoundContext
from protocols.secagg import secaggplus_stages as st
from protocols.wire.serde import TensorSpec

__all__ = ["HEServerRound"]

#: How many clients in turn are asked to decrypt before the round aborts.
DECRYPT_ATTEMPTS = 3


@dataclass
class _Bucket:
    index: int
    members: tuple[str, ...]
    plan: hp.SlotPlan
    total: list[he.Vector] | None = None  # the running ciphertext sum
    summed: list[str] = field(default_factory=list)

    def where(self) -> str:
        return f"bucket {self.index} ({len(self.members)} clients)"


class HEServerRound(ServerRound):
    """Declares advertise-keys, distribute-key, encrypted-input and decrypt; returns one `BucketSum` per bucket."""

    def __init__(self, protocol: HomomorphicAggregation, context: RoundContext) -> None:
        self.protocol, self.context = protocol, context
        self.layout = st.update_layout(context.update_spec)
        self.values = sum(size for _, _, size in self.layout) + 1
        self.params = protocol.parameters(max(len(b) for b in context.buckets))
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[str, _Bucket] = {}
        self.public: dict[str, bytes] = {}
        self.leader = ""
        self.key_id = b""
        self.keyless: Any = None
        self.tried: list[str] = []
        self.sums: list[BucketSum] | None = None
        self.open: Phase | None = None
        self._refused: dict[str, str] = {}

    @property
    def refused(self) -> dict[str, str]:
        """Clients whose answer was refused this round, with the reason (their update is not in any sum)."""
        return dict(self._refused)

    def _refuse(self, client: str, reason: str) -> None:
        self._refused[client] = reason

    # ------------------------------------------------------------------ phases
    def first_phase(self) -> Phase:
        if self.open is not None or self.buckets:
            raise StageTransitionError(f"{self.protocol.name} round {self.context.round}: the round already began")
        payloads = {}
        for index, members in enumerate(self.context.buckets):
            if len(members) < hp.MIN_BUCKET:
                raise ProtocolAbort(f"{self.protocol.name} bucket {index}: a bucket needs at least {hp.MIN_BUCKET} clients")
            try:
                plan = self.protocol.plan(len(members), self.values, self.params)
            except ValueError as exc:
                raise ProtocolAbort(f"{self.protocol.name} bucket {index} ({len(members)} clients): {exc}") from None
            bucket = _Bucket(index, tuple(members), plan)
            self.buckets.append(bucket)
            for c in members:
                self.bucket_of[c] = bucket
                payloads[c] = PhaseData(blobs={
                    hp.BUCKET: str(index).encode(), hp.SIZE: str(len(members)).encode(),
                    hp.BUCKETS: str(len(self.context.buckets)).encode(), hp.PARAMS: self.params.to_bytes(),
                })
        spec = AnswerSpec(blobs=(BlobSpec(hp.PUBLIC_KEY, 1 + KEY_BYTES),))
        self.open = Phase(hp.ADVERTISE_KEYS, self.context.cohort, spec, payloads=payloads, timeout=self.protocol.phase_timeout)
        return self.open

    def next_phase(self, result: PhaseResult) -> Phase | None:
        """Take the result of the phase declared last (and only that one)."""
        declared = self.open
        if declared is None or result.phase is not declared:
            raise StageTransitionError(
                f"{self.protocol.name} round {self.context.round}: got a result of phase {result.phase.name!r}, but the "
                f"open phase is {repr(declared.name) if declared is not None else 'none'}"
            )
        self.open = None
        name = result.phase.name
        if name == hp.ADVERTISE_KEYS:
            self.open = self._after_advertise(result)
        elif name == hp.DISTRIBUTE_KEY:
            self.open = self._after_distribute(result)
        elif name == hp.ENCRYPTED_INPUT:
            self.open = self._after_input(result)
        else:
            self.open = self._after_decrypt(result)
        return self.open

    def _after_advertise(self, result: PhaseResult) -> Phase:
        from protocols._hazmat import public_key_from_bytes

        for c, answer in result.answers.items():
            raw = bytes(answer.blobs.get(hp.PUBLIC_KEY, b""))
            try:
                public_key_from_bytes(raw)
            except ProtocolError as exc:
                self._refuse(c, f"advertise-keys: malformed public key ({exc})")
                continue
            self.public[c] = raw
        for bucket in self.buckets:
            alive = [c for c in bucket.members if c in self.public]
            if len(alive) < hp.MIN_SUMMANDS:
                raise ProtocolAbort(
                    f"{self.protocol.name} {bucket.where()}: only {len(alive)} client(s) advertised a key; "
                    f"a sum needs at least {hp.MIN_SUMMANDS}"
                )
        self.leader = secrets.choice(sorted(self.public))
        peers = {f"{hp.PEER_KEY}{c}": key for c, key in sorted(self.public.items()) if c != self.leader}
        limit = hp.MAX_SECRET_CONTEXT_BYTES
        spec = AnswerSpec(
            tensors={hp.TRANSPORTED + c: TensorSpec(hp.TRANSPORTED + c, "uint8", (limit,), variable=True)
                     for c in sorted(self.public) if c != self.leader},
            blobs=(BlobSpec(hp.KEY_ID, hp.KEY_ID_BYTES),),
        )
        return Phase(hp.DISTRIBUTE_KEY, (self.leader,), spec, payloads={self.leader: PhaseData(blobs=peers)},
                     timeout=self.protocol.phase_timeout)

    def _after_distribute(self, result: PhaseResult) -> Phase:
        answer = result.answers.get(self.leader)
        if answer is None:
            raise ProtocolAbort(f"{self.protocol.name}: the key leader {self.leader} did not answer distribute-key")
        self.key_id = bytes(answer.blobs.get(hp.KEY_ID, b""))
        if len(self.key_id) != hp.KEY_ID_BYTES:
            raise ProtocolAbort(f"{self.protocol.name}: the key leader {self.leader} sent a key id of {len(self.key_id)} bytes")
        payloads = {self.leader: PhaseData(blobs={hp.LEADER: self.leader.encode()})}
        for c in sorted(self.public):
            if c == self.leader:
                continue
            sealed = answer.tensors.get(hp.TRANSPORTED + c)
            if sealed is None or sealed.size == 0:
                self._refuse(c, f"distribute-key: the key leader {self.leader} sent no key for it")
                continue
            payloads[c] = PhaseData(blobs={
                hp.LEADER: self.leader.encode(), hp.LEADER_KEY: self.public[self.leader],
                hp.KEY: np.ascontiguousarray(sealed, dtype=np.uint8).tobytes(),
            })
        chunks = max(len(b.plan.chunk_sizes) for b in self.buckets)
        most = max(b.plan.max_chunk_bytes for b in self.buckets) * chunks
        spec = AnswerSpec(
            tensors={
                hp.CIPHERTEXT: TensorSpec(hp.CIPHERTEXT, "uint8", (most,), variable=True),
                hp.CHUNK_SIZES: TensorSpec(hp.CHUNK_SIZES, "uint32", (max(chunks, 1) * 2,), variable=True),
            },
            blobs=(BlobSpec(hp.KEY_ID, hp.KEY_ID_BYTES), BlobSpec(hp.DIGEST, 32)),
        )
        return Phase(hp.ENCRYPTED_INPUT, tuple(sorted(payloads)), spec, payloads=payloads, trains=True)

    def _check_upload(self, client: str, bucket: _Bucket, answer: Any) -> list[he.Vector]:
        """The loaded chunks of one upload, or raise `MalformedMessage` saying what is wrong."""
        key_id = bytes(answer.blobs.get(hp.KEY_ID, b""))
        if not secrets.compare_digest(key_id, self.key_id):
            raise MalformedMessage("its ciphertext is under another key than this round's (key id differs): a stale "
                                   "or foreign context")
        expected = bucket.plan.chunk_sizes
        sizes = np.ravel(np.asarray(answer.tensors[hp.CHUNK_SIZES]))
        if sizes.size != len(expected):
            raise MalformedMessage(f"it sent {sizes.size} ciphertext chunk(s); its bucket's plan has {len(expected)}")
        raw = np.ascontiguousarray(answer.tensors[hp.CIPHERTEXT], dtype=np.uint8).tobytes()
        if np.any(sizes > bucket.plan.max_chunk_bytes):
            raise MalformedMessage(f"a ciphertext chunk is larger than {bucket.plan.max_chunk_bytes} bytes")
        chunks = split_chunks(raw, sizes, who="its upload")
        if not secrets.compare_digest(he.digest(chunks, key_id=key_id), bytes(answer.blobs.get(hp.DIGEST, b""))):
            raise MalformedMessage("its ciphertext bytes do not match their SHA-256 digest (corrupted)")
        return he.load_chunks(self.keyless, self.params, chunks, expected)

    def _after_input(self, result: PhaseResult) -> Phase:
        self.keyless = he.server_context(self.params)
        for bucket in self.buckets:
            for c in bucket.members:
                answer = result.answers.get(c)
                if answer is None:
                    continue
                try:
                    vectors = self._check_upload(c, bucket, answer)
                except MalformedMessage as exc:
                    self._refuse(c, f"encrypted-input: {exc}")
                    continue
                bucket.total = he.add_chunks(bucket.total, vectors)
                bucket.summed.append(c)
        usable = [b for b in self.buckets if len(b.summed) >= hp.MIN_SUMMANDS]
        for b in self.buckets:
            if b not in usable and b.summed:
                for c in b.summed:
                    self._refuse(c, f"encrypted-input: {b.where()} kept {len(b.summed)} upload(s); a sum of fewer "
                                    f"than {hp.MIN_SUMMANDS} is never decrypted")
                b.summed, b.total = [], None
        if not usable:
            raise ProtocolAbort(f"{self.protocol.name}: no bucket kept {hp.MIN_SUMMANDS} or more valid encrypted inputs")
        return self._decrypt_phase()

    def _decrypt_phase(self) -> Phase:
        candidates = sorted({c for b in self.buckets for c in b.summed} - set(self.tried))
        if len(self.tried) >= DECRYPT_ATTEMPTS or not candidates:
            raise ProtocolAbort(f"{self.protocol.name}: no client decrypted the bucket sums (asked: {', '.join(self.tried)})")
        chosen = secrets.choice(candidates)
        self.tried.append(chosen)
        tensors: dict[str, np.ndarray] = {}
        sizes: dict[str, int] = {}
        answer_spec: dict[str, TensorSpec] = {}
        dtype = "uint64" if self.params.scheme == "bfv" else "float64"
        for b in self.buckets:
            if not b.summed:
                continue
            assert b.total is not None
            chunks = [v.serialize() for v in b.total]
            tensors[hp.SUM + str(b.index)] = np.frombuffer(b"".join(chunks), dtype=np.uint8)
            tensors[hp.SUM_SIZES + str(b.index)] = np.asarray([len(c) for c in chunks], dtype=np.uint32)
            sizes[str(b.index)] = len(b.members)
            answer_spec[hp.PLAIN + str(b.index)] = TensorSpec(hp.PLAIN + str(b.index), dtype, (b.plan.slots,))
        name = hp.DECRYPT if len(self.tried) == 1 else f"{hp.DECRYPT}-{len(self.tried)}"
        payload = PhaseData(tensors=tensors, blobs={hp.BUCKET_SIZES: json.dumps(sizes, sort_keys=True).encode()})
        return Phase(name, (chosen,), AnswerSpec(tensors=answer_spec), payloads={chosen: payload},
                     timeout=self.protocol.phase_timeout)

    def _after_decrypt(self, result: PhaseResult) -> Phase | None:
        decryptor = self.tried[-1]
        answer = result.answers.get(decryptor)
        if answer is None:
            return self._decrypt_phase()  # it dropped: ask another client of the round
        sums = []
        for b in self.buckets:
            if not b.summed:
                continue
            slots = answer.tensors[hp.PLAIN + str(b.index)]
            try:
                total, weight = self.protocol.decode(np.asarray(slots), b.plan, len(b.summed))
            except WrapAround as exc:
                raise ProtocolAbort(f"{self.protocol.name} {b.where()}: decrypted by {decryptor}: {exc}") from None
            tensors: dict[str, np.ndarray] = {}
            offset = 0
            for name, shape, size in self.layout:
                tensors[name] = total[offset : offset + size].reshape(shape)
                offset += size
            sums.append(BucketSum(total=tensors, weight=weight, members=tuple(sorted(b.summed))))
        self.sums = sums
        return None

    def result(self) -> list[BucketSum]:
        if self.sums is None:
            raise StageTransitionError(f"the {self.protocol.name} round has not finished its decrypt phase")
        return self.sums
