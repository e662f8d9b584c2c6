"""Frozen LoRA A, as FFA-LoRA (Sun et al., ICLR 2024): the built-in ``peft.rule = "ffa-lora"`` against FedIT.

Every party re-draws each LoRA A from the run seed and freezes it (the rule's `prepare_model`
and `trained_keys` hooks, `secure_fl.peft_agg.ffa_lora`); only B and the classifier head are
trained and sent. Because A is common, the mean of the B's times A is the mean of the clients'
products: the aggregation is exact, and the LoRA part of every upload is half of FedIT's. A
frozen A counts as a base weight, so the model fingerprint covers it: a client that drew another
A is refused at Join. (To write a rule of your own with these hooks, see ``custom_rule.py`` and
the rule's source.)

Run:  python examples/frozen_a_rule.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import secure_fl
from secure_fl.peft_agg.ffa_lora import draw_a


def lora_bytes(run_dir: Path) -> int:
    """Bytes of LoRA tensors in one client's upload (float32), read from the run's checkpoint."""
    state = load_file(str(sorted((run_dir / "checkpoints").glob("*.safetensors"))[-1]))
    return sum(v.nbytes for k, v in state.items() if "lora_" in k)


def main(fast: bool = False, out: str | None = None) -> secure_fl.RunResult:
    rounds = 2 if fast else 4
    config = secure_fl.load_preset("smoke").with_overrides(["peft.rule=ffa-lora", f"run.rounds={rounds}"])
    result = secure_fl.simulate(config, out, progress=not fast)
    baseline = secure_fl.simulate(
        config.with_overrides(["peft.rule=fedit"]), result.run_dir / "fedit-baseline", progress=False
    )
    kinds = sorted({"lora_A" if "lora_A" in k else "lora_B" if "lora_B" in k else "head" for k in result.global_state})
    print(f"trained and sent: {kinds}")
    # A is not part of the global state; compare the saved adapter's A with a fresh draw from the seed.
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    a_keys = [k for k in saved if "lora_A" in k]
    unchanged = all(
        np.array_equal(saved[k], draw_a(_param_name(k), saved[k].shape, seed=config.run.seed, scale=1.0).numpy())
        for k in a_keys
    )
    print(f"A unchanged after {rounds} rounds ({len(a_keys)} tensors): {unchanged}")
    ratio = lora_bytes(result.run_dir) / lora_bytes(baseline.run_dir)
    print(f"LoRA bytes per upload: ffa-lora / fedit = {ratio:.2f}")
    for mine, theirs in zip(result.metrics, baseline.metrics):
        print(
            f"round {mine['round']}: accuracy {mine['accuracy']:.3f} (fedit {theirs['accuracy']:.3f}), "
            f"bytes_up per client {mine['bytes_up'] // mine['clients']} (fedit {theirs['bytes_up'] // theirs['clients']})"
        )
    print(json.dumps({"a_unchanged": unchanged, "lora_ratio": ratio}))
    return result


def _param_name(saved_key: str) -> str:
    """The live model's parameter name of a key in ``adapter_model.safetensors`` (peft drops the adapter name)."""
    return saved_key.replace(".weight", ".default.weight")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="two rounds (used by the test suite)")
    parser.add_argument("--out", help="run directory (default runs/<run-id>)")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
