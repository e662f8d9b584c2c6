"""Rank voting (FRL, Mozaffari et al., USENIX Security 2023): clients vote on edges, not weights.

``peft.rule = "rank-vote"`` turns every LoRA tensor and the classifier head into an edge-popup
supermask over frozen signed constants; clients train per-edge scores and send only each edge's
rank position. The server sums the positions and keeps the top ``sparsity`` of the global order.
This runs the smoke preset in ``plain`` mode (every vote is checked to be a permutation) and under
``secagg+`` (the server sees only the vote sums), and shows that both give the same model.

Run:  python examples/rank_vote.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import secure_fl
from secure_fl.peft_agg import create_rule


def main(fast: bool = False, out: str | None = None) -> dict[str, object]:
    rounds = 2 if fast else 5
    base = Path(out) if out is not None else None
    config = secure_fl.load_preset("smoke").with_overrides([
        "peft.rule=rank-vote", "peft.rule_params.sparsity=0.5", "client.lr=0.1", f"run.rounds={rounds}",
    ])
    plain = secure_fl.simulate(config, base / "plain" if base else None, progress=not fast)
    secure = secure_fl.simulate(
        config.with_overrides(["secure.mode=secagg+"]), base / "secagg" if base else None, progress=False
    )
    same = all(np.array_equal(plain.global_state[k], secure.global_state[k]) for k in plain.global_state)
    rule = create_rule("rank-vote", sparsity=0.5)
    kept = {k.split(".parametrizations")[0]: float(rule.mask(v).mean()) for k, v in plain.global_state.items()}
    for mine, theirs in zip(plain.metrics, secure.metrics):
        print(f"round {mine['round']}: accuracy plain {mine['accuracy']:.3f}, secagg+ {theirs['accuracy']:.3f}; "
              f"bytes_up per client {mine['bytes_up'] // mine['clients']} (secagg+ {theirs['bytes_up'] // theirs['clients']})")
    print(f"voted tensors: {len(kept)}, fraction of edges kept: {sorted(set(kept.values()))}")
    print(f"secagg+ vote sums give the plaintext model bit for bit: {same}")
    summary = {"accuracy": plain.metrics[-1]["accuracy"], "secagg_accuracy": secure.metrics[-1]["accuracy"],
               "same_model": same, "rounds": rounds}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two rounds (used by the test suite)")
    parser.add_argument("--out", help="directory for the two runs (default runs/<run-id>)")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
