"""Register your own secure-aggregation modes (a one-shot codec and a two-phase masking protocol)
and a privacy mechanism.

``plain-fp16`` is one-shot: it uploads updates as float16 (half the bytes; the server still sees
each update, so it declares ``reveals_individual_updates = True``) and only implements ``encode``,
``payload_spec`` and ``aggregate``.

``pairwise-demo`` is a multi-phase protocol in the shape SecAgg uses, cut down to show the round
engine's phases (it is a teaching example, not a secure-aggregation product: it has no dropout
recovery and no authentication of keys):

1. phase ``advertise``: every client of the cohort sends an X25519 public key (a blob);
2. phase ``masked-input`` (the training phase): each survivor gets its peers' public keys, trains,
   quantises its update to fixed point (integers modulo 2^64), multiplies it by its weight and
   adds, for every peer, a mask expanded with ChaCha20 from the X25519 shared secret (HKDF-SHA256
   bound to the run and round), with a sign that makes each pair's masks cancel in the sum;
3. the server adds the masked vectors modulo 2^64 and learns only the weighted sum.

A client that drops during ``advertise`` is simply left out. A client that drops after the keys
were agreed takes the other half of its pairwise masks with it, so the server aborts the round
with that reason (SecAgg+ shares the seeds to recover from exactly this).

``clip`` bounds every client's influence by clipping its update to L2 norm ``max_norm`` on the
client; on its own that is *not* differential privacy (there is no noise), which is why its
``privacy_event`` has ``noise_multiplier=0``: the ledger and the audit report then show an
unbounded epsilon.

Run:  python examples/custom_secure_mode.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import secure_fl
from protocols.errors import ProtocolAbort
from protocols.secagg import (
    AnswerSpec, BlobSpec, BucketSum, ClientContext, ClientRound, Phase, PhaseData, PhaseResult, RoundContext,
    ServerRound, require_participants,
)
from protocols.wire.serde import TensorSpec

SCALE = 2.0**16  # fixed point: 16 fractional bits
WEIGHT = "__weight__"


class PlainFP16(secure_fl.SecureAggregation):
    """Send float16; one bucket per client, like plain."""

    name = "plain-fp16"
    reveals_individual_updates = True

    def encode(self, update: Mapping[str, np.ndarray], *, weight: float) -> dict[str, np.ndarray]:
        return {key: value.astype(np.float16) for key, value in update.items()}

    def payload_spec(self, update_spec: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        return {key: TensorSpec(key, "float16", spec.shape) for key, spec in update_spec.items()}

    def aggregate(self, contributions: Sequence[secure_fl.Contribution]) -> list[secure_fl.BucketSum]:
        return [
            secure_fl.BucketSum(
                total={k: v.astype(np.float32) * np.float32(c.weight) for k, v in c.tensors.items()},
                weight=c.weight,
                members=(c.client_id,),
            )
            for c in contributions
        ]


def _mask(secret: bytes, context: ClientContext | RoundContext, count: int) -> np.ndarray:
    """``count`` uint64 words of ChaCha20 keystream keyed by HKDF(secret), bound to run and round."""
    key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=f"{context.run_id}/{context.round}".encode(),
        info=b"secure-fl pairwise-demo mask",
    ).derive(secret)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * count))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


class PairwiseServer(ServerRound):
    def __init__(self, context: RoundContext) -> None:
        self.context = context
        self.keys: dict[str, bytes] = {}
        self.sum: BucketSum | None = None

    def first_phase(self) -> Phase:
        return Phase("advertise", self.context.cohort, AnswerSpec(blobs=(BlobSpec("pk", 32),)))

    def next_phase(self, result: PhaseResult) -> Phase | None:
        if result.phase.name == "advertise":
            self.keys = {c: a.blobs["pk"] for c, a in result.answers.items() if len(a.blobs.get("pk", b"")) == 32}
            if len(self.keys) < 2:
                raise ProtocolAbort(f"only {len(self.keys)} client(s) advertised a key; pairwise masks need two")
            survivors = tuple(sorted(self.keys))
            spec = {k: TensorSpec(k, "uint64", v.shape) for k, v in self.context.update_spec.items()}
            spec[WEIGHT] = TensorSpec(WEIGHT, "uint64", (1,))
            payloads = {
                c: PhaseData(blobs={f"pk/{peer}": self.keys[peer] for peer in survivors if peer != c}) for c in survivors
            }
            return Phase("masked-input", survivors, AnswerSpec(tensors=spec), payloads=payloads, trains=True)
        # masked-input: every survivor of advertise must deliver, or some masks never cancel
        require_participants(result, result.phase.participants, "its pairwise masks cannot be removed (no recovery in this demo)")
        totals = {k: np.zeros(v.shape, np.uint64) for k, v in result.phase.answer.tensors.items()}
        with np.errstate(over="ignore"):
            for answer in result.answers.values():
                for k in totals:
                    totals[k] += answer.tensors[k]  # modulo 2^64: the masks cancel
        weight = float(totals.pop(WEIGHT).view(np.int64)[0])
        total = {k: v.view(np.int64).astype(np.float64) / SCALE for k, v in totals.items()}
        self.sum = BucketSum(total=total, weight=weight, members=result.phase.participants)
        return None

    def result(self) -> list[BucketSum]:
        assert self.sum is not None
        return [self.sum]


class PairwiseClient(ClientRound):
    def __init__(self, context: ClientContext) -> None:
        self.context = context
        self.secret: X25519PrivateKey | None = X25519PrivateKey.generate()  # forgotten in close()

    def on_phase(self, phase: str, data: PhaseData) -> PhaseData:
        if phase != "advertise" or self.secret is None:
            return super().on_phase(phase, data)
        public = self.secret.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PhaseData(blobs={"pk": public})

    def quantise(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.round(np.asarray(v, np.float64) * SCALE).astype(np.int64) for k, v in update.items()}

    def mask(self, quantised: Mapping[str, np.ndarray], *, weight: float, data: PhaseData) -> PhaseData:
        assert self.secret is not None, "the session was closed"
        w = int(weight)
        out = {k: (v * w).astype(np.int64).view(np.uint64) for k, v in quantised.items()}
        out[WEIGHT] = np.array([w], np.int64).view(np.uint64)
        sizes = [v.size for v in out.values()]
        me = self.context.client_id
        with np.errstate(over="ignore"):
            for blob, key in data.blobs.items():
                peer = blob.split("/", 1)[1]
                stream = _mask(self.secret.exchange(X25519PublicKey.from_public_bytes(key)), self.context, sum(sizes))
                offset = 0
                for name, size in zip(out, sizes):
                    piece = stream[offset : offset + size].reshape(out[name].shape)
                    out[name] = out[name] + piece if me < peer else out[name] - piece
                    offset += size
        return PhaseData(tensors=out)

    def close(self) -> None:
        self.secret = None


class PairwiseDemo(secure_fl.SecureAggregation):
    """Two phases: agree pairwise keys, then upload masked fixed-point updates that sum exactly."""

    name = "pairwise-demo"
    reveals_individual_updates = False

    def server_round(self, context: RoundContext) -> ServerRound:
        return PairwiseServer(context)

    def client_round(self, context: ClientContext) -> ClientRound:
        return PairwiseClient(context)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "bucket_size": "cohort", "key_custody": "clients (X25519 per round)"}


class ClipOnly(secure_fl.PrivacyMechanism):
    """Clip each update to L2 norm ``max_norm`` (all tensors together); no noise, no DP claim."""

    name = "clip"

    def __init__(self, max_norm: float = 0.5) -> None:
        self.max_norm = max_norm

    def client_transform(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.values())))
        scale = min(1.0, self.max_norm / max(norm, 1e-12))
        return {key: (value * scale).astype(np.float32) for key, value in update.items()}

    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: int) -> dict[str, np.ndarray]:
        return dict(delta)

    def privacy_event(self, *, cohort_size: int, population: int, contributions: int) -> secure_fl.GaussianEvent:
        return secure_fl.GaussianEvent(noise_multiplier=0.0, sample_rate=cohort_size / population)

    def describe(self) -> dict[str, Any]:
        return {"mode": self.name, "guarantee": "none", "clip_norm": self.max_norm, "noise_multiplier": 0.0}


secure_fl.register_secure_aggregation("plain-fp16", PlainFP16)
secure_fl.register_secure_aggregation("pairwise-demo", PairwiseDemo)
secure_fl.register_privacy_mechanism("clip", ClipOnly)


def main(fast: bool = False, out: str | None = None) -> secure_fl.RunResult:
    rounds = 2 if fast else 4
    config = secure_fl.load_preset("smoke").with_overrides(
        ["secure.mode=plain-fp16", "privacy.mode=clip", f"run.rounds={rounds}"]
    )
    result = secure_fl.simulate(config, out, progress=not fast)
    for record in result.metrics:
        print(f"round {record['round']}: {record['stages']}, up {record['bytes_up']} B, accuracy {record['accuracy']:.3f}")
    masked = secure_fl.simulate(
        config.with_overrides(["secure.mode=pairwise-demo", "privacy.mode=none"]),
        None if out is None else Path(out) / "pairwise", progress=not fast,
    )
    for record in masked.metrics:
        phases = ", ".join(f"{p['phase']} {p['answered']}/{p['participants']}" for p in record["phases"])
        print(f"pairwise-demo round {record['round']}: phases {phases}; accuracy {record['accuracy']:.3f}")
    assert all(math.isfinite(r["accuracy"]) for r in masked.metrics)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two rounds (used by the test suite)")
    parser.add_argument("--out", help="run directory (default runs/<run-id>)")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
