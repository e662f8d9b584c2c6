"""Register your own PEFT aggregation rule: FedAvgM (server momentum, Hsu et al. 2019).

The rule keeps state across rounds: the global delta is ``beta * previous + weighted mean``; the
momentum is saved with every round's checkpoint (`state_dict`), and ``beta`` is a setting
(``[peft.rule_params] beta = 0.7``).
Linear in the client updates, so it would also run under secure aggregation.

Run:  python examples/custom_rule.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import numpy as np

import secure_fl
from secure_fl.tensors import Layout


class FedAvgM(secure_fl.AggregationRule):
    """Weighted mean of the updates plus server momentum."""

    name = "fedavgm"
    paper = "https://arxiv.org/abs/1909.06335"

    def __init__(self, beta: float = 0.7) -> None:
        self.beta = beta
        self.velocity: np.ndarray | None = None

    def aggregate(self, updates: np.ndarray, weights: np.ndarray, layout: Layout) -> np.ndarray:
        mean = (weights @ updates.astype(np.float64) / weights.sum()).astype(np.float32)
        self.velocity = mean if self.velocity is None else self.beta * self.velocity + mean
        return self.velocity

    def state_dict(self) -> dict[str, Any]:
        # saved with every round's checkpoint (arrays as tensors), so a resumed run keeps its momentum
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.velocity = state.get("velocity")


secure_fl.register_rule("fedavgm", FedAvgM)


def main(fast: bool = False, out: str | None = None) -> secure_fl.RunResult:
    config = secure_fl.load_preset("smoke").with_overrides(["peft.rule=fedavgm", f"run.rounds={2 if fast else 4}"])
    result = secure_fl.simulate(config, out, progress=not fast)
    for record in result.metrics:
        print(f"round {record['round']}: rule {record['stages']['rule']}, accuracy {record['accuracy']:.3f}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two rounds (used by the test suite)")
    parser.add_argument("--out", help="run directory (default runs/<run-id>)")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
