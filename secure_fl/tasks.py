"""Training tasks: how examples become model inputs, how a step's loss is computed, how a model
is evaluated. ``[model] task`` selects one: ``seq-cls`` (`SequenceClassification`) or
``causal-lm`` (`CausalLanguageModeling`: instruction or text fine-tuning of a decoder).

A task tokenises a dataset once (`Task.encode`), then local training draws batches from
the encoded tensors.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from secure_fl.data import TextDataset
from secure_fl.device import model_device, to_device


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
    #: The metrics `evaluate` reports, in the order a round's record lists them.
    metric_names: ClassVar[tuple[str, ...]] = ("accuracy", "loss")

    @abstractmethod
    def encode(self, tokenizer: Any, dataset: Any, *, max_length: int) -> BatchSource:
        """Tokenise ``dataset`` once (returns prepared data with ``len`` and ``batch(index)``)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean loss of ``batch``."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, data: Any, *, batch_size: int) -> dict[str, float]:
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
        correct, loss_sum, device = 0, 0.0, model_device(model)
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                batch = to_device(data.batch(torch.arange(start, min(start + batch_size, len(data)))), device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
        model.train(was_training)
        return {"accuracy": correct / len(data), "loss": loss_sum / len(data)}


#: Label id of the tokens the causal-LM loss skips (prompt and padding); torch's ``ignore_index``.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenDataset:
    """Causal-LM token ids padded to a common length, their true lengths and per-token labels.

    ``labels`` equal ``input_ids`` where the loss counts (response tokens and the end token) and
    `IGNORE_INDEX` elsewhere (the prompt, the start token, padding).
    """

    input_ids: torch.Tensor  # (n, L) int64
    lengths: torch.Tensor  # (n,) int64
    labels: torch.Tensor  # (n, L) int64

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs and labels for the examples at ``index``, trimmed to the longest of them."""
        lengths = self.lengths[index]
        width = int(lengths.max()) if len(index) else 1
        mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
        return {"input_ids": self.input_ids[index, :width], "attention_mask": mask, "labels": self.labels[index, :width]}

    @property
    def target_tokens(self) -> int:
        """How many tokens the loss is computed on."""
        return int((self.labels != IGNORE_INDEX).sum())


def special_ids(tokenizer: Any) -> tuple[int | None, int | None, int]:
    """``(start, end, pad)`` token ids: BOS/EOS where the tokenizer has them (GPT-2, Llama), else
    BERT-style [CLS]/[SEP]; padding falls back to the end token, then 0 (padding is masked)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(tokenizer, "cls_token_id", None)
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (end if end is not None else 0)
    return start, end, int(pad)


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids a prompt is given to the model as: the start token, then the prompt.

    Training sees every example as ``start + prompt + response + end``; generation feeds this and
    lets the model continue (see ``docs``: the ``generate`` example).
    """
    start, _, _ = special_ids(tokenizer)
    ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    return ([start] if start is not None else []) + list(ids)


class CausalLanguageModeling(Task):
    """Next-token prediction on prompt/response pairs (or plain text); reports loss and perplexity.

    The loss is the mean next-token cross-entropy over the response tokens and the end token of
    a batch; prompt tokens are context only (their labels are `IGNORE_INDEX`), so instruction
    tuning learns the responses, not the instructions. Perplexity is ``exp`` of the
    token-weighted mean loss over the whole evaluation set.
    """

    name = "causal-lm"
    metric_names = ("loss", "perplexity")

    def encode(self, tokenizer: Any, dataset: Any, *, max_length: int) -> TokenDataset:
        """Tokenise ``start + prompt + response + end`` per example, truncated to ``max_length`` on the right.

        An example whose prompt fills ``max_length`` keeps no response token and adds nothing
        to the loss (shorten such prompts or raise ``model.max_length``).
        """
        start, end, pad = special_ids(tokenizer)
        n = len(dataset)
        if n == 0:
            empty = torch.zeros((0, 1), dtype=torch.long)
            return TokenDataset(empty, torch.zeros(0, dtype=torch.long), empty.clone())
        head = [start] if start is not None else []
        tail = [end] if end is not None else []
        prompts = [head + ids for ids in _token_ids(tokenizer, dataset.prompts)]
        responses = [ids + tail for ids in _token_ids(tokenizer, dataset.responses)]
        prompt_len = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=n)
        full_len = prompt_len + np.fromiter((len(r) for r in responses), dtype=np.int64, count=n)
        lengths = np.minimum(full_len, max_length)
        width = int(lengths.max())
        flat = np.fromiter((t for p, r in zip(prompts, responses) for t in (*p, *r)), dtype=np.int64, count=int(full_len.sum()))
        positions = np.arange(int(full_len.max()))
        inside = positions[None, :] < full_len[:, None]
        ids = np.full(inside.shape, pad, dtype=np.int64)
        ids[inside] = flat  # row-major fill: each row's tokens in order
        ids = ids[:, :width]
        pos = positions[None, :width]
        counted = (pos >= prompt_len[:, None]) & (pos < lengths[:, None])
        labels = np.where(counted, ids, IGNORE_INDEX)
        return TokenDataset(torch.from_numpy(ids), torch.from_numpy(lengths), torch.from_numpy(labels))

    def _token_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum of next-token losses, number of counted tokens)`` of ``batch``."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        total = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        return total, (targets != IGNORE_INDEX).sum()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over the batch's response tokens (0 if it has none)."""
        total, count = self._token_losses(model, batch)
        return total / count.clamp(min=1)

    def evaluate(self, model: torch.nn.Module, data: TokenDataset, *, batch_size: int) -> dict[str, float]:
        """Token-weighted mean loss over ``data`` and its perplexity ``exp(loss)``."""
        if len(data) == 0 or data.target_tokens == 0:
            return {"loss": math.nan, "perplexity": math.nan}
        was_training = model.training
        model.eval()
        loss_sum, tokens, device = 0.0, 0, model_device(model)
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                batch = to_device(data.batch(torch.arange(start, min(start + batch_size, len(data)))), device)
                total, count = self._token_losses(model, batch)
                loss_sum += float(total)
                tokens += int(count)
        model.train(was_training)
        loss = loss_sum / tokens
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def _token_ids(tokenizer: Any, texts: tuple[str, ...]) -> list[list[int]]:
    """Token ids of each text without special tokens (an empty text has none)."""
    ids: list[list[int]] = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(row) for row in ids]


TASKS: dict[str, type[Task]] = {"seq-cls": SequenceClassification, "causal-lm": CausalLanguageModeling}


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
    between rounds, which would otherwise leak across rounds and break statelessness). Batches
    are moved to the model's device (`secure_fl.device.to_device`).
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(data))
    order = torch.randperm(len(data), generator=generator)
    cursor, losses, device = 0, [], model_device(model)
    model.train()
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        batch = to_device(data.batch(order[cursor : cursor + batch_size]), device)
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
