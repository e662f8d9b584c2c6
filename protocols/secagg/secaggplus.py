"""``secagg+``: SecAgg+ (Bell et al., CCS 2020) built from `protocols._hazmat` and the quantiser.

Per round the cohort is split into buckets (`split_buckets`); each bucket is an independent
instance whose weighted sum the server learns, and nothing finer. Four phases, all buckets at once:

1. ``advertise-keys``: each client sends two X25519 public keys, ``c`` (share encryption) and
   ``s`` (masks).
2. ``share-keys``: each client gets its neighbours' keys (a random Harary graph H(n, k) over the
   bucket's clients that advertised), Shamir-shares its self-mask seed b_u and its mask private key
   s_u t-of-m among its m neighbours, and sends each share AES-GCM encrypted to its receiver.
3. ``masked-input`` (trains): each client gets the shares addressed to it, trains, quantises
   (`QuantizationPlan`), multiplies by its integer weight, appends the weight, and adds its self
   mask PRG(b_u) and, for each neighbour that survived share-keys, +-PRG(HKDF(X25519(s_u, s_v))).
   The answer is one packed ``uint8`` tensor: at most 1.0x the float32 update (+ one word).
4. ``unmask``: each survivor is told which of its neighbours survived masked-input and which
   dropped, and answers with its share of b_v for the first and of s_v for the second; a client
   refuses a request naming a peer in both lists, or a peer that is not its neighbour.

Settings (``[secure.params]``) are validated at construction; see `SecAggPlus`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocols._hazmat import (
    INFO_PAIRWISE_MASK, INFO_SELF_MASK, INFO_SHARE_ENCRYPTION, ShamirScheme, Share, ShareRoute, add_masks, agree,
    decrypt_share, derive_key, encrypt_share, generate_private_key, mask_words, private_key_bytes,
    public_key_from_bytes, public_key_to_bytes,
)
from protocols.errors import MalformedMessage, Refused, StageTransitionError
from protocols.secagg import secaggplus_stages as st
from protocols.secagg.base import ClientRound, SecureAggregation, ServerRound
from protocols.secagg.packing import pack_words
from protocols.secagg.phases import ClientContext, PhaseData, RoundContext
from protocols.secagg.quantize import QuantizationPlan, quantize

__all__ = ["SecAggPlus", "SecAggPlusClient"]


class SecAggPlus(SecureAggregation):
    """SecAgg+ masking with dropout recovery; the server learns one weighted sum per bucket.

    Parameters
    ----------
    bucket_size : int
        Most clients per bucket; the cohort is split at random into ``ceil(n / bucket_size)``
        buckets of near-equal size. 0 (default) keeps the whole cohort in one bucket. At least 3.
    neighbours : int
        k, the degree of the random Harary graph H(n, k) along which masks and shares are
        exchanged; must be even. 0 (default), or ``k >= n - 1``, links every pair (classic SecAgg).
    threshold : float
        Shares needed to reconstruct a secret, as a fraction of the client's neighbourhood m: t is
        the smallest integer above ``threshold * m`` (capped at m). ``0 < threshold <= 1`` and t >= 2.
    clip_range : float
        Coordinates are clipped to ``[-clip_range, clip_range]`` before quantisation.
    precision : float
        Largest quantisation step (`QuantizationPlan.for_precision`).
    max_weight : int
        Client weights (example counts) are rounded and clamped into ``[1, max_weight]``.

    Raises
    ------
    ValueError
        Naming the setting, for values out of range or combinations that cannot work (t < 2,
        or a bucket whose sum needs more than 32-bit words).
    """

    name = "secagg+"
    paper = "https://eprint.iacr.org/2020/704"
    reveals_individual_updates = False

    def __init__(
        self, *, bucket_size: int = 0, neighbours: int = 0, threshold: float = 0.5, clip_range: float = 8.0,
        precision: float = 2.0**-12, max_weight: int = 1024,
    ) -> None:
        for key, value in (("bucket_size", bucket_size), ("neighbours", neighbours), ("max_weight", max_weight)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"secagg+ setting {key} must be a non-negative integer, got {value!r}")
        if 0 < bucket_size < st.MIN_BUCKET:
            raise ValueError(f"secagg+ setting bucket_size must be 0 (whole cohort) or >= {st.MIN_BUCKET}, got {bucket_size}")
        if neighbours % 2:
            raise ValueError(f"secagg+ setting neighbours must be even (Harary graph H(n, k)), got {neighbours}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise ValueError(f"secagg+ setting threshold must lie in (0, 1], got {threshold!r}")
        if max_weight < 1:
            raise ValueError(f"secagg+ setting max_weight must be >= 1, got {max_weight}")
        if neighbours and st.share_threshold(neighbours, threshold) < 2:
            raise ValueError(
                f"secagg+ settings threshold={threshold} and neighbours={neighbours} give t = "
                f"{st.share_threshold(neighbours, threshold)} < 2: each share would be the secret itself"
            )
        self.bucket_size, self.neighbours, self.threshold = bucket_size, neighbours, float(threshold)
        self.clip_range, self.precision, self.max_weight = float(clip_range), float(precision), max_weight
        try:
            self.plan(bucket_size or st.MIN_BUCKET)
        except ValueError as exc:
            raise ValueError(f"secagg+ settings clip_range, precision, max_weight, bucket_size: {exc}") from None

    def plan(self, bucket: int) -> QuantizationPlan:
        """The quantisation plan of a bucket of ``bucket`` clients (raises ValueError past 32 bits)."""
        return QuantizationPlan.for_precision(
            clip_range=self.clip_range, precision=self.precision, bucket_size=bucket, max_weight=self.max_weight
        )

    def largest_bucket(self) -> int:
        """The most clients one bucket may hold before its sum needs more than 32-bit words."""
        levels = self.plan(st.MIN_BUCKET).levels
        return (1 << 31) // (levels * self.max_weight)

    def assign_buckets(self, cohort: Sequence[str], rng: np.random.Generator) -> tuple[tuple[str, ...], ...]:
        """Split the cohort at random with `secrets` (``rng`` is not used on this path)."""
        return st.split_buckets(cohort, self.bucket_size)

    def server_round(self, context: RoundContext) -> ServerRound:
        """The server half (`protocols.secagg.secaggplus_server.SecAggPlusServer`)."""
        from protocols.secagg.secaggplus_server import SecAggPlusServer

        return SecAggPlusServer(self, context)

    def client_round(self, context: ClientContext) -> ClientRound:
        """The client half, a `SecAggPlusClient`."""
        return SecAggPlusClient(self, context)

    def describe(self) -> dict[str, object]:
        """Bucket size, neighbourhood, threshold rule and key custody, for the threat model."""
        return {
            **super().describe(),
            "bucket_size": self.bucket_size or "cohort",
            "neighbours": self.neighbours or "all members of the bucket",
            "threshold": f"t = floor({self.threshold} * m) + 1 of a client's m neighbours (at most m)",
            "key_custody": "clients; the server routes encrypted shares",
        }


class SecAggPlusClient(ClientRound):
    """The client half of one SecAgg+ round; its secrets live until `close`."""

    def __init__(self, protocol: SecAggPlus, context: ClientContext) -> None:
        self.protocol, self.context = protocol, context
        self.me = context.client_id
        self.stage = 0  # index into st.PHASES of the phase expected next
        self.enc_key = generate_private_key()
        self.mask_key = generate_private_key()
        self.seed = secrets.token_bytes(32)
        self.bucket = 0
        self.plan: QuantizationPlan | None = None
        self.enc_public: dict[str, X25519PublicKey] = {}
        self.mask_public: dict[str, X25519PublicKey] = {}
        self.held: dict[str, Share] = {}  # the shares of (b_v, s_v) that neighbours sent me

    def _expect(self, phase: str) -> None:
        expected = st.PHASES[self.stage] if self.stage < len(st.PHASES) else "(none: the round is over)"
        if phase != expected:
            raise StageTransitionError(f"secagg+ client {self.me}: got phase {phase!r}, expected {expected!r}")
        self.stage += 1

    def _derive(self, secret: bytes, purpose: bytes) -> bytes:
        return derive_key(secret, purpose=purpose, run_id=self.context.run_id, round=self.context.round, bucket=self.bucket)

    def _route(self, sender: str, receiver: str) -> ShareRoute:
        return ShareRoute(self.context.run_id, self.context.round, self.bucket, sender, receiver)

    def on_phase(self, phase: str, data: PhaseData) -> PhaseData:
        """Answer ``advertise-keys``, ``share-keys`` or ``unmask``, in that order only."""
        if phase == st.ADVERTISE_KEYS:
            self._expect(phase)
            self.bucket = st.decode_int(data.blobs.get(st.BUCKET), st.BUCKET)
            size = st.decode_int(data.blobs.get(st.SIZE), st.SIZE)
            if size < st.MIN_BUCKET:
                raise Refused(f"secagg+ client {self.me}: refusing a bucket of {size} clients (at least {st.MIN_BUCKET})")
            self.plan = self.protocol.plan(size)
            return PhaseData(blobs={
                st.ENCRYPTION_KEY: public_key_to_bytes(self.enc_key.public_key()),
                st.MASK_KEY: public_key_to_bytes(self.mask_key.public_key()),
            })
        if phase == st.SHARE_KEYS:
            self._expect(phase)
            return self._share_keys(data)
        if phase == st.UNMASK:
            self._expect(phase)
            return self._unmask(data)
        raise StageTransitionError(f"secagg+ client {self.me}: no phase {phase!r} to answer")

    def _share_keys(self, data: PhaseData) -> PhaseData:
        for name, blob in data.blobs.items():
            kind, _, peer = name.partition("/")
            if kind not in (st.ENCRYPTION_KEY, st.MASK_KEY) or not peer or peer == self.me:
                raise MalformedMessage(f"secagg+ client {self.me}: unexpected share-keys blob {name!r}")
            (self.enc_public if kind == st.ENCRYPTION_KEY else self.mask_public)[peer] = public_key_from_bytes(blob)
        peers = sorted(self.enc_public)
        if peers != sorted(self.mask_public):
            raise MalformedMessage(f"secagg+ client {self.me}: every neighbour needs both public keys")
        t = st.share_threshold(len(peers), self.protocol.threshold)
        if t < 2:
            raise Refused(f"secagg+ client {self.me}: {len(peers)} neighbour(s) give t = {t} < 2; refusing to share")
        shares = ShamirScheme(t, len(peers)).split([self.seed, private_key_bytes(self.mask_key)])
        blobs = {}
        for peer, share in zip(peers, shares):
            key = self._derive(agree(self.enc_key, self.enc_public[peer]), INFO_SHARE_ENCRYPTION)
            blobs[st.SHARE + peer] = encrypt_share(key, share.to_bytes(), route=self._route(self.me, peer))
        return PhaseData(blobs=blobs)

    def quantise(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Clip and stochastically round each tensor (flattened) to words of the bucket's plan."""
        if self.plan is None:
            raise StageTransitionError(f"secagg+ client {self.me}: asked to train before advertise-keys")
        rng = np.random.default_rng(secrets.randbits(128))
        return {name: quantize(np.ravel(value), self.plan, rng) for name, value in update.items()}

    def mask(self, quantised: Mapping[str, np.ndarray], *, weight: float, data: PhaseData) -> PhaseData:
        """Decrypt the shares sent to me, then weight, mask and pack the update (weight as last word)."""
        self._expect(st.MASKED_INPUT)
        assert self.plan is not None
        for name, blob in data.blobs.items():
            sender = name[len(st.SHARE):] if name.startswith(st.SHARE) else ""
            if sender not in self.enc_public:
                raise Refused(f"secagg+ client {self.me}: share blob {name!r} is not from a neighbour")
            key = self._derive(agree(self.enc_key, self.enc_public[sender]), INFO_SHARE_ENCRYPTION)
            share = Share.from_bytes(decrypt_share(key, blob, route=self._route(sender, self.me)))
            if len(share.values) != 2:
                raise MalformedMessage(f"secagg+ client {self.me}: share from {sender!r} holds {len(share.values)} secrets")
            self.held[sender] = share
        layout = st.update_layout(self.context.update_spec)
        if sorted(quantised) != [name for name, _, _ in layout]:
            raise MalformedMessage(f"secagg+ client {self.me}: update tensors {sorted(quantised)} differ from the spec")
        bits, modulus = self.plan.bits, np.int64(self.plan.modulus)
        w = max(1, min(self.protocol.max_weight, int(round(weight))))
        flat = np.concatenate([np.ravel(quantised[name]).astype(np.int64) for name, _, _ in layout] + [np.ones(1, np.int64)])
        values = (flat * w) % modulus  # a noise share may have left [0, Q]: reduce into the ring
        count = values.size
        pairwise = {
            peer: mask_words(self._derive(agree(self.mask_key, self.mask_public[peer]), INFO_PAIRWISE_MASK), count, bits=bits)
            for peer in self.held
        }
        self_mask = mask_words(self._derive(self.seed, INFO_SELF_MASK), count, bits=bits)
        masked = add_masks(values, bits=bits, me=self.me, pairwise=pairwise, self_mask=self_mask)  # type: ignore[type-var]
        return PhaseData(tensors={st.MASKED: np.frombuffer(pack_words(masked, bits), dtype=np.uint8)})

    def _unmask(self, data: PhaseData) -> PhaseData:
        survived = st.decode_ids(data.blobs.get(st.SURVIVED))
        dropped = st.decode_ids(data.blobs.get(st.DROPPED))
        both = sorted(set(survived) & set(dropped))
        if both:
            raise Refused(f"secagg+ client {self.me}: refusing to reveal both the seed and the mask key of {both}")
        strangers = sorted(set(survived + dropped) - set(self.held))
        if strangers:
            raise Refused(f"secagg+ client {self.me}: {strangers} are not neighbours whose shares I hold; refusing")
        blobs = {st.SEED_SHARE + v: self.held[v].select(0).to_bytes() for v in survived}
        blobs.update({st.KEY_SHARE + v: self.held[v].select(1).to_bytes() for v in dropped})
        return PhaseData(blobs=blobs)

    def close(self) -> None:
        """Forget keys, seed and held shares (Python cannot wipe memory; the references go)."""
        self.seed = b""
        self.held.clear()
        self.enc_public.clear()
        self.mask_public.clear()
        self.stage = len(st.PHASES)

