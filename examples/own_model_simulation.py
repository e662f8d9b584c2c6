"""Your own model and your own data, federated in simulation.

A plain PyTorch module (a small classifier over 16 sensor readings) gets a peft LoRA adapter on
its hidden layers plus a fully trained head; five parties each hold a torch ``TensorDataset`` with
a different class mix; the server evaluates on a held-out set with an extra macro-F1 metric.

Run:  python examples/own_model_simulation.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from peft import LoraConfig
from torch.utils.data import TensorDataset

import secure_fl

NUM_FEATURES, NUM_CLASSES = 16, 3


class SensorNet(torch.nn.Module):
    """Any torch module works; peft wraps the Linear layers named in target_modules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(NUM_FEATURES, 64)
        self.fc2 = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def make_party_data(n: int, class_weights: list[float], rng: np.random.Generator) -> TensorDataset:
    """Readings drawn around a class-specific centre; each party has its own class mix."""
    centres = np.random.default_rng(0).normal(size=(NUM_CLASSES, NUM_FEATURES)).astype(np.float32)
    labels = rng.choice(NUM_CLASSES, size=n, p=class_weights)
    features = centres[labels] + rng.normal(scale=1.5, size=(n, NUM_FEATURES)).astype(np.float32)
    return TensorDataset(torch.from_numpy(features), torch.from_numpy(labels).long())


def macro_f1(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """A metric function in the style of transformers' compute_metrics."""
    predictions = logits.argmax(-1)
    scores = []
    for c in range(NUM_CLASSES):
        tp = np.sum((predictions == c) & (labels == c))
        precision = tp / max(np.sum(predictions == c), 1)
        recall = tp / max(np.sum(labels == c), 1)
        scores.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return {"macro_f1": float(np.mean(scores))}


def main(fast: bool = False, out: str | None = None) -> secure_fl.RunResult:
    rng = np.random.default_rng(42)
    mixes = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.4, 0.4, 0.2], [0.2, 0.3, 0.5]]
    size = 60 if fast else 400
    client_datasets = [make_party_data(size, mix, rng) for mix in mixes]
    eval_dataset = make_party_data(300, [1 / 3, 1 / 3, 1 / 3], rng)

    workload = secure_fl.CustomWorkload(
        SensorNet,  # called under a fixed seed on every party, so the frozen weights agree
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"]),
        metric_fn=macro_f1,
    )
    config = secure_fl.Config(
        run=secure_fl.RunConfig(rounds=2 if fast else 8, num_clients=5, clients_per_round=5),
        client=secure_fl.ClientConfig(local_steps=5 if fast else 20, batch_size=32, lr=0.01),
    )
    result = secure_fl.simulate(
        config, out, workload=workload, client_datasets=client_datasets, eval_dataset=eval_dataset, progress=not fast
    )
    last = result.metrics[-1]
    print(f"accuracy {last['accuracy']:.3f}, macro-F1 {last['macro_f1']:.3f}; adapter saved in {result.adapter_dir}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="tiny data, two rounds (used by the test suite)")
    parser.add_argument("--out", help="run directory (default runs/<run-id>)")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
