"""From ``[data]`` to datasets: the train/test split and each client's partition.

Every party derives the same split and partitions from the config and the run seed, so a client
process holding only ``--client-id 3`` trains on exactly the partition simulation would give it,
and the server's held-out test split never overlaps any client's training data.
"""

from __future__ import annotations

from pathlib import Path

from secure_fl.config import Config
from secure_fl.data.datasets import DataError, TextDataset, load_bbc_news, load_text_file, make_synthetic
from secure_fl.data.partition import partition, train_test_split


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
