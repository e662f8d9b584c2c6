"""Register your own Byzantine defense (and, for the demo, your own simulated attack).

One class plus one registration call each, no edits inside secure-fl. The defense drops every
update whose L2 norm is more than ``factor`` times the median norm; the attack makes one of four
clients send its update flipped and scaled by 20. The metrics show the excluded client.

Run:  python examples/custom_defense.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import numpy as np

import secure_fl
from robustness.attacks import Attack, register_attack


class NormFilter(secure_fl.Defense):
    """Exclude rows whose norm exceeds ``factor`` x the median norm (vectorised over rows)."""

    name = "norm-filter"
    paper = "https://arxiv.org/abs/1911.07963"  # norm bounding, Sun et al. 2019

    def __init__(self, factor: float = 3.0) -> None:
        self.factor = factor

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> secure_fl.DefenseResult:
        norms = np.linalg.norm(updates, axis=1)
        keep = norms <= self.factor * np.median(norms)
        excluded = tuple(int(i) for i in np.flatnonzero(~keep))
        return secure_fl.DefenseResult(
            updates=updates[keep], weights=weights[keep], excluded=excluded, info={"median_norm": float(np.median(norms))}
        )


class FlipAndScale(Attack):
    """A crude model-poisoning attack: send -20 x the honest update."""

    name = "flip-scale"

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {key: -20.0 * value for key, value in update.items()}


secure_fl.register_defense("norm-filter", NormFilter)
register_attack("flip-scale", FlipAndScale)


def main(fast: bool = False, out: str | None = None) -> secure_fl.RunResult:
    config = secure_fl.load_preset("smoke").with_overrides(
        [
            "robustness.defense=norm-filter",
            "attack.kind=flip-scale",
            "attack.fraction=0.25",
            f"run.rounds={2 if fast else 4}",
        ]
    )
    result = secure_fl.simulate(config, out, progress=not fast)
    for record in result.metrics:
        print(f"round {record['round']}: defense {record['stages']['defense']} excluded {record['excluded']}, accuracy {record['accuracy']:.3f}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two rounds (used by the test suite)")
    parser.add_argument("--out", help="run directory (default runs/<run-id>)")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
