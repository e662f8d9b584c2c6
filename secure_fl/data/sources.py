"""From ``[data]`` to datasets: the train/test split and each client's partition.

Every party derives the same split and partitions from the config and the run seed, so a client
process holding only ``--client-id 3`` trains on exactly the partition simulation would give it,
and the server's held-out test split never overlaps any client's training data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Union

import numpy as np

from secure_fl.config import Config
from secure_fl.errors import ConfigError
from secure_fl.data.datasets import DataError, TextDataset, load_bbc_news, load_text_file, make_synthetic
from secure_fl.data.instructions import (
    LM_LABEL_NAMES,
    InstructionDataset,
    load_instruction_file,
    make_synthetic_instructions,
)
from secure_fl.data.partition import partition, train_test_split

log = logging.getLogger(__name__)

#: What the config's data loads as: labelled texts (seq-cls) or prompt/response pairs (causal-lm).
ConfigDataset = Union[TextDataset, InstructionDataset]


def load_source(config: Config) -> ConfigDataset:
    """The whole configured dataset (before splitting), in the form ``model.task`` trains on."""
    data = config.data
    causal = config.model.task == "causal-lm"
    if data.dataset == "bbc-news":
        news = load_bbc_news()
        return InstructionDataset(("",) * len(news), news.texts) if causal else news
    if data.dataset == "synthetic":
        if causal:
            return make_synthetic_instructions(data.synthetic_examples, num_topics=data.synthetic_labels, seed=config.run.seed)
        return make_synthetic(data.synthetic_examples, num_labels=data.synthetic_labels, seed=config.run.seed)
    _require_file("data.path", data.path)
    return load_data_file(config, data.path)


def load_data_file(config: Config, path: str | Path, *, label_names: tuple[str, ...] | None = None) -> ConfigDataset:
    """One data file read as the config's ``[data]`` columns and ``model.task`` say."""
    data = config.data
    if config.model.task == "causal-lm":
        return load_instruction_file(
            path, prompt_column=data.prompt_column, response_column=data.response_column, text_column=data.text_column
        )
    return load_text_file(
        path, text_column=data.text_column, label_column=data.label_column,
        label_names=label_names or data.label_names or None,
    )


def load_splits(config: Config) -> tuple[ConfigDataset, ConfigDataset]:
    """``(train, test)``: a separate test file when configured, else a stratified split."""
    data = config.data
    full = load_source(config)
    if data.dataset == "file" and data.test_path:
        _require_file("data.test_path", data.test_path)
        return full, load_data_file(config, data.test_path, label_names=full.label_names)
    return train_test_split(full, test_fraction=data.test_fraction, seed=config.run.seed)


def _require_file(key: str, path: str) -> None:
    """Refuse a configured data file that does not exist, naming the key and the path."""
    if not Path(path).is_file():
        raise DataError(f"{key}: file {path!r} does not exist (relative paths are read from {Path.cwd()})")


def client_partitions(config: Config, train: ConfigDataset) -> list[ConfigDataset]:
    """Split ``train`` among ``run.num_clients`` clients as ``[data] partition`` says."""
    return [train.subset(indices) for indices in client_partition_indices(config, train)]


def client_partition_indices(config: Config, train: ConfigDataset) -> list[np.ndarray]:
    """The indices into ``train`` of each client's partition (what `client_partitions` cuts)."""
    return partition(
        train.labels, config.run.num_clients, method=config.data.partition, alpha=config.data.alpha, seed=config.run.seed
    )


def client_dataset(config: Config, index: int) -> ConfigDataset:
    """The training partition of client ``index`` (0-based)."""
    if not 0 <= index < config.run.num_clients:
        raise ValueError(f"client index {index} is outside 0..{config.run.num_clients - 1} (run.num_clients)")
    train, _ = load_splits(config)
    return client_partitions(config, train)[index]


def load_eval_set(config: Config) -> tuple[tuple[str, ...], ConfigDataset | None]:
    """Label names and the server's held-out evaluation set (``None`` if the server has no data).

    With ``data.dataset = 'file'``, a configured ``data.test_path`` must exist: a mistyped one
    would otherwise silently turn evaluation off. Without it, the server evaluates on a split of
    ``data.path``; a server that does not hold that file (the parties keep their data) runs
    without evaluation when ``data.label_names`` is set, with a warning naming the path, and is
    refused with the missing path named when it is not. A causal-LM server needs no labels: it
    runs without evaluation (with the warning) when it holds no data file.
    """
    data = config.data
    causal = config.model.task == "causal-lm"
    if data.dataset == "file":
        if data.test_path:
            if not Path(data.test_path).is_file():
                raise ConfigError(
                    f"data.test_path: the server's test file {data.test_path!r} does not exist (relative paths are "
                    f"read from {Path.cwd()}); fix the path, or remove data.test_path", key="data.test_path",
                )
            test = load_data_file(config, data.test_path)
            return (data.label_names or test.label_names), test
        if not Path(data.path).is_file():
            if causal:
                log.warning(
                    "data.path %r does not exist here: the server has no evaluation data and reports loss and "
                    "perplexity null (set data.test_path to evaluate)", data.path,
                )
                return LM_LABEL_NAMES, None
            if not data.label_names:
                raise ConfigError(
                    f"data.path: file {data.path!r} does not exist (relative paths are read from {Path.cwd()}); "
                    "a server that holds no data file needs data.label_names instead", key="data.path",
                )
            log.warning(
                "data.path %r does not exist here: the server has no evaluation data and reports accuracy null "
                "(set data.test_path to evaluate)", data.path,
            )
            return data.label_names, None
    _, test = load_splits(config)
    return test.label_names, test
