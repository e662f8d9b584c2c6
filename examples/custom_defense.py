"""Register your own Byzantine defense (and, for the demo, your own simulated attack).

One class plus one registration call each, no edits inside secure-fl. The defense drops every
update whose L2 norm is more than ``factor`` times a running reference norm (a moving average of
each round's median norm: state kept across rounds and saved with every checkpoint); the attack
makes one of four clients send its update flipped and scaled by 20. ``factor`` comes from the
config, as in a TOML file::

    [robustness]
    defense = "norm-filter"

    [robustness.params]
    factor = 4.0

The metrics show the excluded client, the report the defense's real settings, and the last
checkpoint the defense's state.

Run:  python examples/custom_defense.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import numpy as np

import secure_fl
from robustness.attacks import Attack, register_attack
from secure_fl.server.rundir import RunDirectory


class NormFilter(secure_fl.Defense):
    """Exclude rows whose norm exceeds ``factor`` x a running reference norm (vectorised over rows).

    The reference is an exponential moving average of each round's median norm, so it is state
    that lives across rounds (saved with every checkpoint through `state_dict`).

    Parameters
    ----------
    factor:
        A row is excluded when its L2 norm exceeds this many times the reference norm.
    momentum:
        Weight of the previous rounds in the reference norm (0: this round's median only).
    """

    name = "norm-filter"
    paper = "https://arxiv.org/abs/1911.07963"  # norm bounding, Sun et al. 2019

    def __init__(self, *, factor: float = 3.0, momentum: float = 0.5) -> None:
        if not factor > 1:
            raise ValueError(f"factor must be > 1, got {factor}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.factor, self.momentum = factor, momentum
        self._reference: float | None = None  # state across rounds
        self._rounds = 0

    def aggregate(self, updates: np.ndarray, weights: np.ndarray) -> secure_fl.DefenseResult:
        norms = np.linalg.norm(updates, axis=1)
        median = float(np.median(norms))
        previous = self._reference
        reference = median if previous is None else self.momentum * previous + (1 - self.momentum) * median
        keep = norms <= self.factor * reference
        self._reference, self._rounds = reference, self._rounds + 1
        excluded = tuple(int(i) for i in np.flatnonzero(~keep))
        return secure_fl.DefenseResult(
            updates=updates[keep], weights=weights[keep], excluded=excluded,
            info={"median_norm": median, "reference_norm": reference},
        )

    def state_dict(self) -> dict[str, Any]:
        return {"reference_norm": self._reference, "rounds": self._rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._reference, self._rounds = state["reference_norm"], int(state["rounds"])


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
            "robustness.params.factor=4.0",
            "attack.kind=flip-scale",
            "attack.fraction=0.25",
            f"run.rounds={2 if fast else 4}",
        ]
    )
    result = secure_fl.simulate(config, out, progress=not fast)
    for record in result.metrics:
        print(
            f"round {record['round']}: defense {record['stages']['defense']} excluded {record['excluded']} "
            f"(reference norm {record['reference_norm']:.4f}), accuracy {record['accuracy']:.3f}"
        )
    print("settings in the report:", result.report["stages"]["defense"]["params"] if result.report else None)
    checkpoint = RunDirectory(result.run_dir).load_checkpoint()
    print("defense state in the last checkpoint:", checkpoint.plugin_state["defense"] if checkpoint else None)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two rounds (used by the test suite)")
    parser.add_argument("--out", help="run directory (default runs/<run-id>)")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
