"""Workloads: the model- and data-specific half of a federated run.

The round engine knows nothing about models or examples; a `Workload` builds the adapted
model (identically on every party), turns a dataset into batches once, computes a batch's loss,
evaluates, and saves the adapter. Three are provided:

* `TextClassification`: what the config describes (``[model]``, ``[peft]``, ``[data]``):
  MiniLM / tiny-bert / a local checkpoint with a LoRA adapter on text examples;
* `CausalLM`: the config's ``model.task = "causal-lm"``: tiny-gpt2 or a local decoder checkpoint
  with a LoRA adapter on prompt/response pairs or plain text (`config_workload` picks one of the two);
* `CustomWorkload`: the user's own model factory (any transformers model or torch module)
  with a peft config, and datasets given as a torch ``Dataset``, a Hugging Face ``datasets.Dataset``
  or a plain list of examples, with optional ``collate_fn``, ``loss_fn`` and ``metric_fn``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import save_file

from secure_fl.config import Config, ModelConfig, PeftSection
from secure_fl.data import InstructionDataset, TextDataset
from secure_fl.device import model_device, to_device
from secure_fl.errors import ModelError
from secure_fl.models import BUILD_LOCK, AdaptedModel, build_model, save_adapter, trainable_names
from secure_fl.tasks import create_task

CollateFn = Callable[[list[Any]], Any]
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]
MetricFn = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


class Batches(Protocol):
    """Prepared data: a length and a way to build the batch for some example indices."""

    def __len__(self) -> int: ...

    def batch(self, index: torch.Tensor) -> Any: ...


class Workload(ABC):
    """What a run trains and on what; shared by the server and every client."""

    #: The metrics `evaluate` reports, listed (as ``null`` until evaluated) in every round's record.
    metric_names: tuple[str, ...] = ("accuracy", "loss")

    @abstractmethod
    def build(self, *, seed: int) -> AdaptedModel:
        """Build the adapted model; the same seed must give the same model on every party."""

    @abstractmethod
    def prepare(self, adapted: AdaptedModel, dataset: Any) -> Batches:
        """Turn a dataset into `Batches` once (tokenise, wrap)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Mean loss of one batch (differentiable)."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, data: Batches, *, batch_size: int) -> dict[str, float]:
        """Metrics of ``model`` on ``data`` (``loss`` and, where defined, ``accuracy``).

        ``model`` may be on a GPU (``run.device``): move each batch to its device
        (`secure_fl.device.to_device`); ``loss`` receives batches already moved.
        """

    @abstractmethod
    def save(self, adapted: AdaptedModel, directory: Path, *, seed: int) -> None:
        """Save the trained adapter (a peft adapter directory where possible)."""


class TextClassification(Workload):
    """The config-driven workload: a sequence-classification model with LoRA on text examples."""

    def __init__(self, model: ModelConfig, peft: PeftSection, label_names: Sequence[str]) -> None:
        self.model_cfg = model
        self.peft_cfg = peft
        self.label_names = tuple(label_names)
        self.task = create_task(model.task)

    def build(self, *, seed: int) -> AdaptedModel:
        """Tokenizer + base model + LoRA, as ``[model]`` and ``[peft]`` say."""
        return build_model(self.model_cfg, self.peft_cfg, num_labels=len(self.label_names), seed=seed)

    def prepare(self, adapted: AdaptedModel, dataset: Any) -> Batches:
        """Tokenise a `TextDataset` once."""
        if not isinstance(dataset, TextDataset):
            raise ModelError(f"the text-classification workload needs a TextDataset, got {type(dataset).__name__}")
        return self.task.encode(adapted.tokenizer, dataset, max_length=self.model_cfg.max_length)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Cross-entropy."""
        return self.task.loss(model, batch)

    def evaluate(self, model: torch.nn.Module, data: Batches, *, batch_size: int) -> dict[str, float]:
        """Accuracy and loss."""
        return self.task.evaluate(model, data, batch_size=batch_size)

    def save(self, adapted: AdaptedModel, directory: Path, *, seed: int) -> None:
        """A peft adapter directory plus tokenizer and label names."""
        save_adapter(adapted, directory, label_names=self.label_names, model_cfg=self.model_cfg, seed=seed)


class CausalLM(TextClassification):
    """The config-driven causal-LM workload: a decoder with LoRA on `InstructionDataset` examples.

    Built, trained and saved as `TextClassification` is, with `secure_fl.tasks.CausalLanguageModeling`
    as the task: the loss covers response tokens only, evaluation reports loss and perplexity,
    and the adapter reloads with ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)``.
    """

    metric_names = ("loss", "perplexity")

    def __init__(self, model: ModelConfig, peft: PeftSection) -> None:
        if model.task != "causal-lm":
            raise ModelError(f"the causal-LM workload needs model.task = 'causal-lm', got {model.task!r}")
        super().__init__(model, peft, InstructionDataset((), ()).label_names)

    def prepare(self, adapted: AdaptedModel, dataset: Any) -> Batches:
        """Tokenise an `InstructionDataset` once (prompt tokens masked out of the labels)."""
        if not isinstance(dataset, InstructionDataset):
            raise ModelError(f"the causal-LM workload needs an InstructionDataset, got {type(dataset).__name__}")
        return self.task.encode(adapted.tokenizer, dataset, max_length=self.model_cfg.max_length)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Mean next-token cross-entropy over the response tokens."""
        return self.task.loss(model, batch)

    def evaluate(self, model: torch.nn.Module, data: Batches, *, batch_size: int) -> dict[str, float]:
        """Token-weighted loss and perplexity."""
        return self.task.evaluate(model, data, batch_size=batch_size)


def config_workload(config: Config, label_names: Sequence[str]) -> TextClassification:
    """The workload ``config`` describes: `CausalLM` for ``model.task = "causal-lm"``, else `TextClassification`."""
    if config.model.task == "causal-lm":
        return CausalLM(config.model, config.peft)
    return TextClassification(config.model, config.peft, label_names)


class ExampleBatches:
    """Examples from any indexable dataset, batched by a collate function."""

    def __init__(self, dataset: Any, collate_fn: CollateFn) -> None:
        try:
            self.size = len(dataset)
        except TypeError as exc:
            raise ModelError(f"a dataset must support len() and indexing, got {type(dataset).__name__}") from exc
        self.dataset = dataset
        self.collate_fn = collate_fn

    def __len__(self) -> int:
        return self.size

    def batch(self, index: torch.Tensor) -> Any:
        """Collate the examples at ``index``."""
        return self.collate_fn([self.dataset[int(i)] for i in index])


def _default_collate(examples: list[Any]) -> Any:
    from torch.utils.data import default_collate

    return default_collate(examples)


class CustomWorkload(Workload):
    """The user's own model and data.

    Parameters
    ----------
    model_factory:
        Returns a fresh base model (any transformers model or ``torch.nn.Module``) or a model that
        is already a ``peft.PeftModel``. It is called after ``torch.manual_seed(seed)``, so random
        initialisation is identical on every party.
    peft_config:
        A ``peft`` config (e.g. ``LoraConfig``) applied with ``get_peft_model``; ``None`` when the
        factory already returns a peft model. Without peft, every parameter with ``requires_grad``
        is trained and sent.
    collate_fn:
        Builds a batch from a list of examples (default: ``torch.utils.data.default_collate``).
    loss_fn:
        ``loss_fn(model, batch) -> scalar tensor``. Default: ``model(**batch).loss`` when the model
        returns one, else cross-entropy of the logits against ``batch["labels"]``; a ``(x, y)``
        batch gives cross-entropy of ``model(x)`` against ``y``.
    metric_fn:
        ``metric_fn(logits, labels) -> {name: value}`` on the whole evaluation set (numpy arrays),
        like a transformers ``compute_metrics``; its results join ``loss`` and ``accuracy``.
    """

    def __init__(
        self,
        model_factory: Callable[[], torch.nn.Module],
        *,
        peft_config: Any | None = None,
        collate_fn: CollateFn | None = None,
        loss_fn: LossFn | None = None,
        metric_fn: MetricFn | None = None,
        tokenizer: Any | None = None,
    ) -> None:
        self.model_factory = model_factory
        self.peft_config = peft_config
        self.collate_fn = collate_fn or _default_collate
        self.loss_fn = loss_fn
        self.metric_fn = metric_fn
        self.tokenizer = tokenizer

    def build(self, *, seed: int) -> AdaptedModel:
        """Call the factory under a fixed seed and apply the peft config."""
        with BUILD_LOCK:
            torch.manual_seed(seed)
            model = self.model_factory()
            if not isinstance(model, torch.nn.Module):
                raise ModelError(f"model_factory must return a torch.nn.Module, got {type(model).__name__}")
            if self.peft_config is not None:
                from peft import get_peft_model

                torch.manual_seed(seed)
                try:
                    model = get_peft_model(model, self.peft_config)
                except ValueError as exc:
                    raise ModelError(f"the peft config does not fit the model: {exc}") from exc
        names = trainable_names(model)
        if not names:
            raise ModelError("the model has no trainable parameters: give a peft_config or unfreeze what should train")
        return AdaptedModel(model, self.tokenizer, names)

    def prepare(self, adapted: AdaptedModel, dataset: Any) -> Batches:
        """Wrap an indexable dataset (torch / HF datasets / list)."""
        return ExampleBatches(dataset, self.collate_fn)

    def _forward(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(loss, logits, labels)`` of one batch with the default rules."""
        if isinstance(batch, Mapping):
            out = model(**batch)
            labels = batch.get("labels")
            logits = getattr(out, "logits", out if isinstance(out, torch.Tensor) else None)
            loss = getattr(out, "loss", None)
            if loss is None:
                if logits is None or labels is None:
                    raise ModelError("cannot compute a loss: the model returned no .loss and the batch has no 'labels'; pass loss_fn")
                loss = torch.nn.functional.cross_entropy(logits, labels)
            return loss, logits, labels
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            x, y = batch
            out = model(x)
            logits = getattr(out, "logits", out)
            return torch.nn.functional.cross_entropy(logits, y), logits, y
        raise ModelError(f"cannot compute a loss for a batch of type {type(batch).__name__}; pass loss_fn")

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The user's ``loss_fn`` or the default rules."""
        if self.loss_fn is not None:
            return self.loss_fn(model, batch)
        return self._forward(model, batch)[0]

    def evaluate(self, model: torch.nn.Module, data: Batches, *, batch_size: int) -> dict[str, float]:
        """Loss, accuracy (for class logits with integer labels) and ``metric_fn`` results."""
        if len(data) == 0:
            return {"loss": math.nan}
        was_training = model.training
        model.eval()
        loss_sum, logits_all, labels_all, complete = 0.0, [], [], True
        device = model_device(model)
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                index = torch.arange(start, min(start + batch_size, len(data)))
                batch = to_device(data.batch(index), device)
                if self.loss_fn is not None:
                    loss_sum += float(self.loss_fn(model, batch)) * len(index)
                    try:
                        _, logits, labels = self._forward(model, batch)
                    except ModelError:
                        logits = labels = None
                else:
                    loss, logits, labels = self._forward(model, batch)
                    loss_sum += float(loss) * len(index)
                if logits is None or labels is None:
                    complete = False
                else:
                    logits_all.append(logits.float().cpu().numpy())
                    labels_all.append(labels.cpu().numpy())
        model.train(was_training)
        metrics = {"loss": loss_sum / len(data)}
        if complete and logits_all:
            logits_np, labels_np = np.concatenate(logits_all), np.concatenate(labels_all)
            if logits_np.ndim == 2 and labels_np.ndim == 1 and labels_np.dtype.kind in "iu":
                metrics["accuracy"] = float((logits_np.argmax(-1) == labels_np).mean())
            if self.metric_fn is not None:
                metrics.update({k: float(v) for k, v in self.metric_fn(logits_np, labels_np).items()})
        return metrics

    def save(self, adapted: AdaptedModel, directory: Path, *, seed: int) -> None:
        """``save_pretrained`` for peft models; otherwise the trainable tensors as safetensors."""
        directory.mkdir(parents=True, exist_ok=True)
        model: Any = adapted.model
        if hasattr(model, "peft_config") and hasattr(model, "save_pretrained"):
            model.save_pretrained(str(directory))
        else:
            state = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
            save_file(state, str(directory / "trainable.safetensors"))
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(directory))
