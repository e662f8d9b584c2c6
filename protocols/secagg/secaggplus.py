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

Distributed DP (`SecAggPlus.enable_distributed_noise`, wired by ``secure_fl.stages`` for
``privacy.mode = "distributed"``): each client adds integer noise to its quantised words before
masking, so every plan gets a noise headroom, weights are all 1, and the unmask payload also
carries the bucket's full survivor list: a client refuses to unmask a bucket with fewer survivors
than the noise was sized for (`SecAggPlus.min_survivors`), and the server aborts such a round
before asking. With the noise off, plans, messages and checks are exactly those above.

Settings (``[secure.params]``) are validated at construction; see `SecAggPlus`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocols._hazmat import (
    INFO_SHARE_ENCRYPTION, ShamirScheme, Share, ShareRoute, agree, decrypt_share, derive_key, encrypt_share,
    generate_private_key, private_key_bytes, public_key_from_bytes, public_key_to_bytes, word_dtype,
)
from protocols.errors import MalformedMessage, Refused, StageTransitionError
from protocols.secagg import secaggplus_stages as st
from protocols.secagg.base import ClientRound, SecureAggregation, ServerRound
from protocols.secagg.packing import pack_words
from protocols.secagg.phases import ClientContext, PhaseData, RoundContext
from protocols.secagg.quantize import QuantizationPlan, quantize
from protocols.secagg.secaggplus_masks import mask_input
from protocols.secagg.secaggplus_params import (
    DEFAULT_CORRECTNESS_BITS, DEFAULT_SECURITY_BITS, GraphParameters, check_parameters,
)

__all__ = ["NoiseHeadroom", "SecAggPlus", "SecAggPlusClient"]

#: ``headroom(bucket_size, min_survivors, num_values, step) -> H``: the integer headroom a bucket's
#: plan reserves for the clients' summed noise (see `QuantizationPlan`); supplied by the privacy
#: mechanism through ``secure_fl.stages`` (``protocols`` never imports ``privacy``).
NoiseHeadroom = Callable[[int, int, int, float], int]


class SecAggPlus(SecureAggregation):
    """SecAgg+ masking with dropout recovery; the server learns one weighted sum per bucket.

    Parameters
    ----------
    bucket_size : int
        Most clients per bucket; the cohort is split at random into ``ceil(n / bucket_size)``
        buckets of near-equal size. 0 (default) keeps the whole cohort in one bucket. At least 3.
        Usually set as ``[secure] bucket_size``.
    neighbours : int or None
        k, the degree of the random Harary graph H(n, k) along which masks and shares are
        exchanged; must be even. None (default): chosen per bucket by the parameter analysis
        (`protocols.secagg.secaggplus_params`); 0, or ``k >= n - 1``, links every pair (classic SecAgg).
    threshold : float or None
        Shares needed to reconstruct a secret, as a fraction of the client's neighbourhood m: t is
        the smallest integer above ``threshold * m`` (capped at m). None (default): the smallest t
        that meets the security target, with a majority of the neighbourhood.
    corrupt_fraction : float
        gamma: the fraction of a bucket's clients that may collude with the server, in [0, 1).
    dropout_fraction : float
        delta: the fraction of a bucket's clients that may drop out over a round, in [0, 1).
    security_bits : int
        sigma: the chosen (k, t) leak a client's input with probability at most 2^-sigma.
    correctness_bits : int
        eta: with at most the tolerated dropouts a round aborts with probability at most 2^-eta.
    phase_timeout : float or None
        Seconds the phases that do not train (advertise-keys, share-keys, unmask) stay open; their
        messages are small, so a short deadline makes a client that died cheap to notice. None
        (default): the round's deadline, ``run.round_timeout``.
    clip_range : float
        Coordinates are clipped to ``[-clip_range, clip_range]`` before quantisation.
    precision : float
        Largest quantisation step (`QuantizationPlan.for_precision`).
    max_weight : int
        Client weights (example counts) are rounded and clamped into ``[1, max_weight]``.

    Raises
    ------
    ValueError
        Naming the setting, for values out of range or combinations that cannot work (t < 2, an
        explicit (k, t) that misses the security or correctness target for ``bucket_size``, or a
        bucket whose sum needs more than 32-bit words). `check_cohort` runs the same checks for the
        buckets a cohort of a given size splits into, when the server starts.
    """

    name = "secagg+"
    paper = "https://eprint.iacr.org/2020/704"
    reveals_individual_updates = False

    def __init__(
        self, *, bucket_size: int = 0, neighbours: int | None = None, threshold: float | None = None,
        corrupt_fraction: float = 0.05, dropout_fraction: float = 0.1, security_bits: int = DEFAULT_SECURITY_BITS,
        correctness_bits: int = DEFAULT_CORRECTNESS_BITS, phase_timeout: float | None = None, clip_range: float = 8.0, precision: float = 2.0**-12,
        max_weight: int = 1024,
    ) -> None:
        for key, value in (("bucket_size", bucket_size), ("neighbours", neighbours), ("max_weight", max_weight)):
            if value is None and key == "neighbours":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"secagg+ setting {key} must be a non-negative integer, got {value!r}")
        if 0 < bucket_size < st.MIN_BUCKET:
            raise ValueError(f"secagg+ setting bucket_size must be 0 (whole cohort) or >= {st.MIN_BUCKET}, got {bucket_size}")
        if neighbours is not None and neighbours % 2:
            raise ValueError(f"secagg+ setting neighbours must be even (Harary graph H(n, k)), got {neighbours}")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1
        ):
            raise ValueError(f"secagg+ setting threshold must lie in (0, 1], got {threshold!r}")
        if phase_timeout is not None and (
            isinstance(phase_timeout, bool) or not isinstance(phase_timeout, (int, float)) or not phase_timeout > 0
        ):
            raise ValueError(f"secagg+ setting phase_timeout must be a positive number of seconds, got {phase_timeout!r}")
        if max_weight < 1:
            raise ValueError(f"secagg+ setting max_weight must be >= 1, got {max_weight}")
        if neighbours and threshold is not None and st.share_threshold(neighbours, threshold) < 2:
            raise ValueError(
                f"secagg+ settings threshold={threshold} and neighbours={neighbours} give t = "
                f"{st.share_threshold(neighbours, threshold)} < 2: each share would be the secret itself"
            )
        self.bucket_size, self.neighbours = bucket_size, neighbours
        self.threshold = None if threshold is None else float(threshold)
        self.corrupt_fraction, self.dropout_fraction = corrupt_fraction, dropout_fraction
        self.security_bits, self.correctness_bits = security_bits, correctness_bits
        self.phase_timeout = None if phase_timeout is None else float(phase_timeout)
        self.clip_range, self.precision, self.max_weight = float(clip_range), float(precision), max_weight
        self._parameters: dict[int, GraphParameters] = {}
        self._planned: tuple[int, ...] = (bucket_size,) if bucket_size else ()
        self._headroom: NoiseHeadroom | None = None  # set by `enable_distributed_noise`
        self._uniform_weights = False
        self._integer = False  # set by `enable_integer_inputs`
        try:
            self.plan(bucket_size or st.MIN_BUCKET)
        except ValueError as exc:
            raise ValueError(f"secagg+ settings clip_range, precision, max_weight, bucket_size: {exc}") from None
        if bucket_size:
            self.parameters(bucket_size)  # also checks the fractions and the security targets

    def parameters(self, n: int) -> GraphParameters:
        """The (k, t) of a bucket of ``n`` clients: the analysis's choice, or the explicit settings checked.

        Raises
        ------
        ValueError
            Naming the condition (security, correctness, t < 2) that no (k, t), or the explicit one, meets.
        """
        if n not in self._parameters:
            self._parameters[n] = check_parameters(
                n, k=self.neighbours, threshold=self.threshold, corrupt_fraction=self.corrupt_fraction,
                dropout_fraction=self.dropout_fraction, security_bits=self.security_bits,
                correctness_bits=self.correctness_bits,
            )
        return self._parameters[n]

    def share_threshold(self, parameters: GraphParameters, neighbourhood: int) -> int:
        """t for a client that shares among ``neighbourhood`` neighbours in a bucket with ``parameters``.

        With an explicit ``threshold`` fraction it follows the client's actual neighbourhood
        (`secaggplus_stages.share_threshold`); otherwise it is the analysis's t, never lowered.
        """
        if self.threshold is not None:
            return st.share_threshold(neighbourhood, self.threshold)
        return parameters.t

    # ------------------------------------------------------------------ distributed DP
    def enable_distributed_noise(self, *, headroom: NoiseHeadroom, uniform_weights: bool = True) -> None:
        """Make room for client noise: every plan reserves ``headroom(...)``, unmasking needs enough survivors.

        Called once, before any round, by ``secure_fl.stages`` when the privacy mechanism adds its
        noise on the clients. ``uniform_weights`` makes every client's weight 1 (the plan's
        ``max_weight`` becomes 1, which saves ``log2(max_weight)`` bits per word).

        Raises
        ------
        ValueError
            If the quantisation has a single level (``clip_range / step`` must be an integer so a
            zero update quantises exactly).
        """
        if self.plan(st.MIN_BUCKET).levels < 2:
            raise ValueError(
                f"secagg+ settings clip_range={self.clip_range}, precision={self.precision} give one quantisation "
                "level; distributed noise needs precision < clip_range"
            )
        self._headroom = headroom
        self._uniform_weights = bool(uniform_weights)

    # ------------------------------------------------------------------ integer inputs (votes)
    def enable_integer_inputs(self) -> None:
        """Sum integer inputs exactly: every value is an integer in ``[0, d - 1]``, every weight 1.

        Called once, before any round, by ``secure_fl.stages`` for a PEFT rule whose messages are
        integers (rank votes, ``integer_message``). With ``d`` the update's number of values, each
        plan then uses ``clip_range = c``, the smallest power of two ``>= d - 1``, and ``precision = 1``,
        so ``Q = 2c`` and the step is exactly 1: an integer ``x`` quantises to ``x + c`` (stochastic
        rounding has nothing to round) and the bucket sum decodes to the exact integer sum. The
        ``clip_range`` and ``precision`` settings are not used; weights are all 1 (raw counts).

        Raises
        ------
        ValueError
            Together with distributed noise (noise would make the sum inexact).
        """
        if self._headroom is not None:
            raise ValueError("secagg+: integer inputs (an exact integer sum) cannot carry distributed noise")
        self._integer = True
        self._uniform_weights = True

    @property
    def integer_inputs(self) -> bool:
        """Whether plans sum integers exactly (`enable_integer_inputs` was called)."""
        return self._integer

    def _range(self, num_values: int | None) -> tuple[float, float]:
        """``(clip_range, precision)`` of a plan for an update of ``num_values`` values."""
        if not self._integer:
            return self.clip_range, self.precision
        bound = max(1, (num_values or 2) - 1)  # the largest integer input
        return float(1 << (bound - 1).bit_length()), 1.0

    @property
    def noise_enabled(self) -> bool:
        """Whether clients add distributed noise (`enable_distributed_noise` was called)."""
        return self._headroom is not None

    @property
    def weight_bound(self) -> int:
        """The largest client weight in use: 1 with uniform weights, else ``max_weight``."""
        return 1 if self._uniform_weights else self.max_weight

    @property
    def quantisation_step(self) -> float:
        """gamma = 2c / Q, the input units of one integer step (the same for every bucket size)."""
        return self.plan(st.MIN_BUCKET).step

    def min_survivors(self, n: int) -> int:
        """Fewest clients of a bucket of ``n`` whose inputs may be unmasked: ``n`` minus the tolerated dropouts.

        The tolerated dropouts are the ``ceil(dropout_fraction * n)`` of the (k, t) analysis
        (`GraphParameters.dropouts`), the same bound the correctness target is stated for.
        """
        return n - self.parameters(n).dropouts

    def noise_buckets(self, cohort_size: int) -> list[tuple[int, int]]:
        """``(bucket size, min_survivors)`` for each distinct bucket size a cohort of ``cohort_size`` splits into."""
        return [(n, self.min_survivors(n)) for n in self._bucket_sizes(cohort_size)]

    def _bucket_sizes(self, size: int) -> list[int]:
        count = 1 if not self.bucket_size or size <= self.bucket_size else math.ceil(size / self.bucket_size)
        return sorted({size // count, -(-size // count)})

    def check_cohort(self, size: int, *, num_values: int | None = None) -> None:
        """Refuse, before any round, a cohort of ``size`` whose buckets no safe (k, t) protects.

        With distributed noise and the update's ``num_values`` known, each bucket's plan also
        includes the noise headroom, and a plan past 32 bits is refused naming what to lower.
        """
        sizes = self._bucket_sizes(size)
        for n in sizes:
            if n < st.MIN_BUCKET:
                raise ValueError(
                    f"secagg+: a cohort of {size} split into buckets of at most {self.bucket_size or size} gives "
                    f"buckets of {n} clients; a bucket needs at least {st.MIN_BUCKET}"
                )
            if self._integer and num_values is not None:
                try:
                    self.plan(n, num_values)
                except ValueError as exc:
                    raise ValueError(
                        f"secagg+: a bucket of {n} clients summing integers below {num_values} needs more than 32-bit "
                        f"words ({exc}); lower [secure] bucket_size"
                    ) from None
            if self.noise_enabled and num_values is not None:
                if self.min_survivors(n) < 1:
                    raise ValueError(
                        f"secagg+: a bucket of {n} clients tolerates {self.parameters(n).dropouts} dropouts "
                        f"(dropout_fraction={self.dropout_fraction}), leaving no client whose noise share counts; "
                        "lower [secure.params] dropout_fraction"
                    )
                try:
                    self.plan(n, num_values)
                except ValueError as exc:
                    raise ValueError(
                        f"secagg+: a bucket of {n} clients with distributed noise for {num_values} values needs "
                        f"more than 32-bit words ({exc}); raise [secure.params] precision (coarser steps), lower "
                        f"[secure.params] clip_range, [secure] bucket_size or privacy.params.noise_multiplier"
                    ) from None
            try:
                self.plan(n)
            except ValueError:
                raise ValueError(
                    f"secagg+: a bucket of {n} clients needs more than 32-bit words with clip_range={self.clip_range}, "
                    f"precision={self.precision}, max_weight={self.max_weight}; set bucket_size <= {self.largest_bucket()}"
                ) from None
            self.parameters(n)
        self._planned = tuple(sizes)

    def plan(self, bucket: int, num_values: int | None = None) -> QuantizationPlan:
        """The quantisation plan of a bucket of ``bucket`` clients (raises ValueError past 32 bits).

        With distributed noise and ``num_values`` (the update's size) given, the plan reserves the
        mechanism's noise headroom for that bucket; without noise ``num_values`` is ignored.
        """
        clip_range, precision = self._range(num_values)
        plan = QuantizationPlan.for_precision(
            clip_range=clip_range, precision=precision, bucket_size=bucket, max_weight=self.weight_bound
        )
        if self._headroom is None or num_values is None:
            return plan
        headroom = int(self._headroom(bucket, self.min_survivors(bucket), num_values, plan.step))
        return QuantizationPlan.for_precision(
            clip_range=self.clip_range, precision=self.precision, bucket_size=bucket, max_weight=self.weight_bound,
            noise_headroom=headroom,
        )

    def largest_bucket(self) -> int:
        """The most clients one bucket may hold before its sum needs more than 32-bit words (without noise)."""
        levels = self.plan(st.MIN_BUCKET).levels
        return (1 << 31) // (levels * self.weight_bound)

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
        """What the server and colluders can learn, for the threat model (docs/threat-model.md)."""
        if self.neighbours is None and self.threshold is None:
            rule = ("k and t chosen per bucket from n, corrupt_fraction and dropout_fraction by the conditions of "
                    "Bell et al. 2020 (smallest even k, then the smallest majority t, meeting both targets)")
        else:
            rule = (f"explicit: neighbours={self.neighbours if self.neighbours is not None else 'chosen'}, "
                    f"threshold={self.threshold if self.threshold is not None else 'chosen'}, checked against both targets")
        facts: dict[str, object] = {
            **super().describe(),
            "bucket_size": self.bucket_size or "cohort",
            "neighbours": ("chosen per bucket" if self.neighbours is None
                           else self.neighbours or "all members of the bucket"),
            "threshold": (f"t = floor({self.threshold} * m) + 1 of a client's m neighbours (at most m)"
                          if self.threshold is not None else "chosen per bucket (a majority of the neighbours)"),
            "k_t_rule": rule,
            "tolerates": (f"up to {self.corrupt_fraction:g} of a bucket colluding with the server and "
                          f"{self.dropout_fraction:g} dropping out"),
            "targets": f"security 2^-{self.security_bits}, correctness 2^-{self.correctness_bits}",
            "server_learns": "one weighted sum per bucket (and which clients it contains)",
            "collusion": ("a client's input if t or more of its neighbours collude with the server; sums over parts "
                          "of a bucket if dropped and colluding clients split the honest survivors' neighbour graph"),
            "adversary_model": ("honest-but-curious server: no consistency-check phase and no authenticated keys, "
                                "so a server that lies about dropouts or substitutes keys is not stopped"),
            "deviating_server": ("a client's input, by telling some of its neighbours that it dropped and others that "
                                 "it survived (with 1 or 2 colluding neighbours), or every input, by substituting public keys"),
            "on_abort": "nothing is released; the secrets revealed so far are discarded with the round",
            "key_custody": "clients; the server routes encrypted shares",
        }
        if self._planned:  # the planned bucket sizes, once `check_cohort` has seen the cohort size
            facts["bucket_parameters"] = [self.parameters(n).describe() for n in self._planned]
        if self._integer:
            facts["integer_inputs"] = (
                "exact integer sums (rank votes): step 1, values in [0, d - 1], every client's weight 1; "
                "the server cannot check that a client's input is a valid vote"
            )
        if self.noise_enabled:
            facts["distributed_noise"] = (
                "clients add integer noise before masking; plans reserve its headroom; a bucket with fewer "
                "survivors than n minus the tolerated dropouts is not unmasked (clients refuse, the server aborts)"
            )
            facts["weights"] = "uniform: every client's weight is 1" if self._uniform_weights else "example counts"
        return facts


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
        self.size = 0  # clients in my bucket, as the server announced in advertise-keys
        self.plan: QuantizationPlan | None = None
        self.parameters: GraphParameters | None = None
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
            try:
                self.parameters = self.protocol.parameters(size)
                self.plan = self.protocol.plan(size, self.num_values)
            except ValueError as exc:
                raise Refused(f"secagg+ client {self.me}: refusing a bucket of {size}: {exc}") from None
            self.size = size
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
        assert self.parameters is not None
        if len(peers) > self.parameters.k:
            raise Refused(f"secagg+ client {self.me}: sent {len(peers)} neighbours, but k = {self.parameters.k}")
        t = self.protocol.share_threshold(self.parameters, len(peers))
        if not 2 <= t <= len(peers):
            raise Refused(f"secagg+ client {self.me}: {len(peers)} neighbour(s) with t = {t}; refusing to share")
        shares = ShamirScheme(t, len(peers)).split([self.seed, private_key_bytes(self.mask_key)])
        blobs = {}
        for peer, share in zip(peers, shares):
            key = self._derive(agree(self.enc_key, self.enc_public[peer]), INFO_SHARE_ENCRYPTION)
            blobs[st.SHARE + peer] = encrypt_share(key, share.to_bytes(), route=self._route(self.me, peer))
        return PhaseData(blobs=blobs)

    @property
    def num_values(self) -> int:
        """d, the number of values of the update (the weight word not counted)."""
        return sum(size for _, _, size in st.update_layout(self.context.update_spec))

    @property
    def quantisation_step(self) -> float | None:
        """gamma = 2c / Q of my bucket's plan (input units per integer step); None before advertise-keys."""
        return None if self.plan is None else self.plan.step

    @property
    def bucket_size(self) -> int | None:
        """Clients in my bucket, once the server announced it (advertise-keys)."""
        return self.size or None

    @property
    def worst_case_dropouts(self) -> int:
        """Most clients of my bucket that may drop while it is still unmasked (0 before advertise-keys)."""
        return 0 if self.parameters is None else self.parameters.dropouts

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
            try:
                share = Share.from_bytes(decrypt_share(key, blob, route=self._route(sender, self.me)))
            except MalformedMessage as exc:
                raise MalformedMessage(f"secagg+ client {self.me}: share from {sender!r}: {exc}") from None
            if len(share.values) != 2:
                raise MalformedMessage(f"secagg+ client {self.me}: share from {sender!r} holds {len(share.values)} secrets")
            self.held[sender] = share
        layout = st.update_layout(self.context.update_spec)
        if sorted(quantised) != [name for name, _, _ in layout]:
            raise MalformedMessage(f"secagg+ client {self.me}: update tensors {sorted(quantised)} differ from the spec")
        bits = self.plan.bits
        w = max(1, min(self.protocol.weight_bound, int(round(weight))))
        dtype = word_dtype(bits)
        values = np.empty(sum(size for _, _, size in layout) + 1, dtype=dtype)
        offset = 0
        for name, _, size in layout:  # a noise share may have left [0, Q]: the cast wraps it into the ring
            part = np.ravel(quantised[name])
            if part.size != size:
                raise MalformedMessage(f"secagg+ client {self.me}: tensor {name!r} has {part.size} values, the spec {size}")
            np.copyto(values[offset : offset + size], part if part.dtype.kind in "iu" else part.astype(np.int64),
                      casting="unsafe")
            offset += size
        values[-1] = 1
        values *= dtype.type(w % (1 << 8 * dtype.itemsize))  # modulo 2**width, a multiple of 2**bits
        masked = mask_input(
            values, bits=bits, me=self.me, self_seed=self.seed, mask_private_key=self.mask_key,
            neighbour_mask_publics={peer: self.mask_public[peer] for peer in self.held},
            run_id=self.context.run_id, round=self.context.round, bucket=self.bucket,
        )
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
        if self.protocol.noise_enabled:
            self._check_survivors(survived, dropped, st.decode_ids(data.blobs.get(st.SURVIVORS)))
        blobs = {st.SEED_SHARE + v: self.held[v].select(0).to_bytes() for v in survived}
        blobs.update({st.KEY_SHARE + v: self.held[v].select(1).to_bytes() for v in dropped})
        return PhaseData(blobs=blobs)

    def _check_survivors(self, survived: Sequence[str], dropped: Sequence[str], everyone: Sequence[str]) -> None:
        """Refuse to unmask a bucket whose survivors carry less noise than the noise was sized for.

        Each client's noise share is sized for ``min_survivors`` clients; unmasking a sum of fewer
        would release it with less than the accounted noise. The list is the server's word (an
        honest-but-curious server; the consistency-check phase that would let clients verify it is
        not implemented), checked against what this client knows: itself and the neighbours named.
        """
        need = self.protocol.min_survivors(self.size)
        alive = set(everyone)
        if self.me not in alive or not set(survived) <= alive or alive & set(dropped):
            raise Refused(
                f"secagg+ client {self.me}: the survivor list of bucket {self.bucket} contradicts the unmask request "
                "(it must name me and every surviving neighbour, and no dropped one); refusing to unmask"
            )
        if len(alive) < need:
            raise Refused(
                f"secagg+ client {self.me}: bucket {self.bucket} of {self.size} has {len(alive)} survivor(s), but the "
                f"distributed noise was sized for at least {need}; refusing to unmask a sum with less noise"
            )

    def close(self) -> None:
        """Forget keys, seed and held shares (Python cannot wipe memory; the references go)."""
        self.seed = b""
        self.held.clear()
        self.enc_public.clear()
        self.mask_public.clear()
        self.stage = len(st.PHASES)

