"""From ``[data]`` to datasets: the train/test split and each client's partition.

Every party derives the same split and partitions from the config and the run seed, so a client
process holding only ``--client-id 3`` trains on exactly the partition simulation would give it,
and the server's held-out test split never overlaps any client's training data.
"""

from __future__ import annotations

import logging
from pathlib import Path

from secure_fl.config import Config
from secure_fl.errors import ConfigError
from secure_fl.data.datasets import DataError, TextDataset, load_bbc_news, load_text_file, make_synthetic
from secure_fl.data.partition import partition, train_test_split

log = logging.getLogger(__name__)


def load_source(config: Config) -> TextDataset:
    """The whole configured dataset (before splitting)."""
    data = config.data
    if data.dataset == "bbc-news":
        return load_bbc_news()
    if data.dataset == "synthetic":
        return make_synthetic(data.synthetic_examples, num_labels=data.synthetic_labels, seed=config.run.seed)
    _require_file("data.path", data.path)
    return load_text_file(
        data.path, text_column=data.text_column, label_column=data.label_column, label_names=data.label_names or None
    )


def load_splits(config: Config) -> tuple[TextDataset, TextDataset]:
    """``(train, test)``: a separate test file when configured, else a stratified split."""
    data = config.data
    full = load_source(config)
    if data.dataset == "file" and data.test_path:
        _require_file("data.test_path", data.test_path)
        test = load_text_file(
            data.test_path,
            text_column=data.text_column,
            label_column=data.label_column,
            label_names=data.label_names or full.label_names,
        )
        return full, test
    return train_test_split(full, test_fraction=data.test_fraction, seed=config.run.seed)


def _require_file(key: str, path: str) -> None:
    """Refuse a configured data file that does not exist, naming the key and the path."""
    if not Path(path).is_file():
        raise DataError(f"{key}: file {path!r} does not exist (relative paths are read from {Path.cwd()})")


def client_partitions(config: Config, train: TextDataset) -> list[TextDataset]:
    """Split ``train`` among ``run.num_clients`` clients as ``[data] partition`` says."""
    parts = partition(
        train.labels, config.run.num_clients, method=config.data.partition, alpha=config.data.alpha, seed=config.run.seed
    )
    return [train.subset(indices) for indices in parts]


def client_dataset(config: Config, index: int) -> TextDataset:
    """The training partition of client ``index`` (0-based)."""
    if not 0 <= index < config.run.num_clients:
        raise ValueError(f"client index {index} is outside 0..{config.run.num_clients - 1} (run.num_clients)")
    train, _ = load_splits(config)
    return client_partitions(config, train)[index]


def load_eval_set(config: Config) -> tuple[tuple[str, ...], TextDataset | None]:
    """Label names and the server's held-out evaluation set (``None`` if the server has no data).

    With ``data.dataset = 'file'``, a configured ``data.test_path`` must exist: a mistyped one
    would otherwise silently turn evaluation off. Without it, the server evaluates on a split of
    ``data.path``; a server that does not hold that file (the parties keep their data) runs
    without evaluation when ``data.label_names`` is set, with a warning naming the path, and is
    refused with the missing path named when it is not.
    """
    data = config.data
    if data.dataset == "file":
        if data.test_path:
            if not Path(data.test_path).is_file():
                raise ConfigError(
                    f"data.test_path: the server's test file {data.test_path!r} does not exist (relative paths are "
                    f"read from {Path.cwd()}); fix the path, or remove data.test_path", key="data.test_path",
                )
            test = load_text_file(
                data.test_path, text_column=data.text_column, label_column=data.label_column,
                label_names=data.label_names or None,
            )
            return (data.label_names or test.label_names), test
        if not Path(data.path).is_file():
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
