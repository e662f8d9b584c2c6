"""Register your own secure-aggregation mode (here a transport codec) and privacy mechanism.

``plain-fp16`` uploads updates as float16 (half the bytes; the server still sees each update,
so it declares ``reveals_individual_updates = True``). ``clip`` bounds every client's influence by
clipping its update to L2 norm ``max_norm`` on the client; on its own that is *not* differential
privacy (there is no noise), which is why its ``privacy_event`` has ``noise_multiplier=0``: the
ledger and the audit report then show an unbounded epsilon.

Run:  python examples/custom_secure_mode.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import secure_fl
from protocols.wire.serde import TensorSpec


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
secure_fl.register_privacy_mechanism("clip", ClipOnly)


def main(fast: bool = False, out: str | None = None) -> secure_fl.RunResult:
    rounds = 2 if fast else 4
    config = secure_fl.load_preset("smoke").with_overrides(
        ["secure.mode=plain-fp16", "privacy.mode=clip", f"run.rounds={rounds}"]
    )
    result = secure_fl.simulate(config, out, progress=not fast)
    for record in result.metrics:
        print(f"round {record['round']}: {record['stages']}, up {record['bytes_up']} B, accuracy {record['accuracy']:.3f}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two rounds (used by the test suite)")
    parser.add_argument("--out", help="run directory (default runs/<run-id>)")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
