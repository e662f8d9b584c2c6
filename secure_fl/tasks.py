"""Training tasks: how examples become model inputs, how a step's loss is computed, how a model
is evaluated. ``[model] task`` selects one; sequence classification is built in.

A task tokenises a dataset once (`Task.encode`), then local training draws batches from
the encoded tensors. A causal-LM instruction-tuning task fits the same three methods (encode
prompts and responses with the prompt masked out of the labels, loss from the model's output,
evaluation by perplexity); it is not shipped yet.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from secure_fl.data import TextDataset


@dataclass(frozen=True)
class EncodedDataset:
    """Token ids padded to a common length, with their true lengths and labels."""

    input_ids: torch.Tensor  # (n, L) int64
    lengths: torch.Tensor  # (n,) int64
    labels: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs for the examples at ``index``, trimmed to the longest of them."""
        lengths = self.lengths[index]
        width = int(lengths.max()) if len(index) else 1
        ids = self.input_ids[index, :width]
        mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[index]}


class Task(ABC):
    """A training objective; ``name`` is its ``[model] task`` value."""

    name: ClassVar[str]

    @abstractmethod
    def encode(self, tokenizer: Any, dataset: TextDataset, *, max_length: int) -> EncodedDataset:
        """Tokenise ``dataset`` once."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean loss of ``batch``."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, data: EncodedDataset, *, batch_size: int) -> dict[str, float]:
        """Metrics of ``model`` on ``data`` (at least ``loss``)."""


class SequenceClassification(Task):
    """Single-label text classification with cross-entropy; reports accuracy and loss."""

    name = "seq-cls"

    def encode(self, tokenizer: Any, dataset: TextDataset, *, max_length: int) -> EncodedDataset:
        """Tokenise with truncation to ``max_length`` and pad to the longest example."""
        labels = torch.tensor(np.asarray(dataset.labels), dtype=torch.long)
        if len(dataset) == 0:
            return EncodedDataset(torch.zeros((0, 1), dtype=torch.long), torch.zeros(0, dtype=torch.long), labels)
        encoded = tokenizer(
            list(dataset.texts), truncation=True, max_length=max_length, padding="longest", return_tensors="np"
        )
        ids = torch.from_numpy(np.ascontiguousarray(encoded["input_ids"], dtype=np.int64))
        lengths = torch.from_numpy(np.asarray(encoded["attention_mask"], dtype=np.int64).sum(axis=1))
        return EncodedDataset(ids, lengths, labels)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the model's logits."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    def evaluate(self, model: torch.nn.Module, data: EncodedDataset, *, batch_size: int) -> dict[str, float]:
        """Accuracy and mean cross-entropy over ``data``."""
        if len(data) == 0:
            return {"accuracy": math.nan, "loss": math.nan}
        was_training = model.training
        model.eval()
        correct, loss_sum = 0, 0.0
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                batch = data.batch(torch.arange(start, min(start + batch_size, len(data))))
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
        model.train(was_training)
        return {"accuracy": correct / len(data), "loss": loss_sum / len(data)}


TASKS: dict[str, type[Task]] = {"seq-cls": SequenceClassification}


def create_task(name: str) -> Task:
    """Instantiate the task registered under ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} for model.task; allowed: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


class LossSource(Protocol):
    """Anything with a ``loss(model, batch)`` method (a task or a workload)."""

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...


class BatchSource(Protocol):
    """Anything with a length and ``batch(index)`` (encoded or wrapped examples)."""

    def __len__(self) -> int: ...

    def batch(self, index: torch.Tensor) -> Any: ...


def train_steps(
    model: torch.nn.Module,
    task: LossSource,
    data: BatchSource,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_grad_norm: float,
    seed: int,
) -> dict[str, float]:
    """Run ``steps`` AdamW steps on the trainable parameters, cycling through shuffled epochs.

    A fresh optimizer each round is the usual FedAvg choice (clients keep no optimizer state
    between rounds, which would otherwise leak across rounds and break statelessness).
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(data))
    order = torch.randperm(len(data), generator=generator)
    cursor, losses = 0, []
    model.train()
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        batch = data.batch(order[cursor : cursor + batch_size])
        cursor += batch_size
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return {"train_loss": float(np.mean(losses)), "train_examples": float(steps * batch_size)}
