"""Train/test splits and client partitioners for simulated federations.

All functions are deterministic for a seed (``np.random.default_rng(seed)``) so
that a simulation can be rerun exactly, and every partitioner assigns each
example to exactly one client and returns sorted int64 index arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np

from .datasets import DataError

__all__ = ["PARTITION_METHODS", "partition", "partition_dirichlet", "partition_iid", "train_test_split"]

PARTITION_METHODS: tuple[str, ...] = ("iid", "dirichlet")
_MAX_DIRICHLET_TRIES = 1000


def _check_int(name: str, value: object, low: int) -> int:
    """Return ``value`` as int, or raise DataError unless it is an int >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise DataError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    """Return ``labels`` as a 1-D int64 array, or raise DataError."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"labels must be a 1-D integer array, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _class_ranks(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Randomly order each class's examples.

    Returns ``(order, class_of, rank)``: ``order`` lists example indices grouped by
    class (classes ascending, random order inside a class); ``class_of[j]`` is the
    dense class id (0..C-1) of ``order[j]`` and ``rank[j]`` its position in its class.
    """
    _, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(-1)
    shuffled = rng.permutation(labels.size)
    order = shuffled[np.argsort(dense[shuffled], kind="stable")]
    class_of = dense[order]
    starts = np.searchsorted(class_of, class_of, side="left")
    return order, class_of, np.arange(labels.size) - starts


class Splittable(Protocol):
    """A dataset with int labels that can be subset (`TextDataset`, `InstructionDataset`)."""

    @property
    def labels(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def subset(self, indices: np.ndarray | Sequence[int]) -> Splittable: ...


_D = TypeVar("_D", bound=Splittable)


def train_test_split(ds: _D, *, test_fraction: float, seed: int) -> tuple[_D, _D]:
    """Split ``ds`` into (train, test), stratified by label.

    Each class of ``n_c`` examples puts ``round(test_fraction * n_c)`` of them in
    the test set, clamped to ``[1, n_c - 1]`` when ``n_c >= 2`` so every class is
    both trained on and evaluated; a singleton class stays in train. Both parts
    keep the original example order and all ``label_names``.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    order, class_of, rank = _class_ranks(ds.labels, rng)
    sizes = np.bincount(class_of) if class_of.size else np.zeros(0, dtype=np.int64)
    n_test = np.clip(np.rint(test_fraction * sizes).astype(np.int64), 1, np.maximum(sizes - 1, 0))
    is_test = np.zeros(len(ds), dtype=bool)
    is_test[order] = rank < n_test[class_of]
    if is_test.all() or not is_test.any():
        raise DataError(
            f"cannot split {len(ds)} examples with test_fraction={test_fraction}: train or test would be empty; "
            "every class needs at least 2 examples to appear in both"
        )
    train, test = ds.subset(np.flatnonzero(~is_test)), ds.subset(np.flatnonzero(is_test))
    return train, test  # type: ignore[return-value]  # subset returns the dataset's own type


def partition_iid(num_examples: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(num_examples)`` and deal it into ``num_clients`` near-equal parts.

    Part sizes differ by at most one. Every client gets at least one example, so
    ``num_examples >= num_clients`` is required.
    """
    num_clients = _check_int("num_clients", num_clients, 1)
    num_examples = _check_int("num_examples", num_examples, 0)
    if num_examples < num_clients:
        raise DataError(
            f"cannot give {num_clients} clients at least one example each from {num_examples} examples; "
            "use fewer clients or more data"
        )
    perm = np.random.default_rng(seed).permutation(num_examples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, *, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label-skewed partition: each class is split by Dirichlet(alpha) proportions.

    For every class ``c``, proportions ``p_c ~ Dirichlet(alpha * ones(num_clients))``
    cut that class's shuffled examples into consecutive runs, one per client.
    Small ``alpha`` (e.g. 0.1) gives clients few dominant classes; large ``alpha``
    (e.g. 100) approaches an IID split. Proportions are redrawn from the same
    generator until every client holds at least ``min_size`` examples (at most
    1000 tries), as a client with almost no data cannot train.

    Raises
    ------
    DataError
        If ``alpha <= 0``, ``num_clients < 1``, ``num_clients * min_size > len(labels)``,
        or no draw meets ``min_size`` within the try limit.
    """
    labels = _check_labels(labels)
    num_clients = _check_int("num_clients", num_clients, 1)
    min_size = _check_int("min_size", min_size, 0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"alpha must be a finite number > 0, got {alpha!r}")
    if num_clients * min_size > labels.size:
        raise DataError(
            f"num_clients * min_size = {num_clients} * {min_size} = {num_clients * min_size} exceeds the "
            f"{labels.size} examples; use fewer clients, a smaller min_size or more data"
        )
    rng = np.random.default_rng(seed)
    order, class_of, rank = _class_ranks(labels, rng)
    class_sizes = np.bincount(class_of) if class_of.size else np.zeros(0, dtype=np.int64)
    num_classes = class_sizes.size
    # Sort keys that make one global searchsorted do every class's cut lookup:
    # element key = c * stride + rank, cut key = c * stride + cut (cuts <= n_c < stride).
    stride = labels.size + 1
    elem_key = class_of * stride + rank
    offset = np.arange(num_classes)[:, None] * stride
    for _ in range(_MAX_DIRICHLET_TRIES):
        props = rng.dirichlet(np.full(num_clients, float(alpha)), size=num_classes)
        cuts = np.floor(np.cumsum(props, axis=1)[:, :-1] * class_sizes[:, None]).astype(np.int64)
        cut_keys = (offset + cuts).reshape(-1)
        client = np.searchsorted(cut_keys, elem_key, side="right") - class_of * (num_clients - 1)
        if np.bincount(client, minlength=num_clients).min() >= min_size:
            owner = np.empty(labels.size, dtype=np.int64)
            owner[order] = client
            by_client = np.argsort(owner, kind="stable")
            bounds = np.cumsum(np.bincount(owner, minlength=num_clients))[:-1]
            return [part.astype(np.int64) for part in np.split(by_client, bounds)]
    raise DataError(
        f"no Dirichlet(alpha={alpha}) draw in {_MAX_DIRICHLET_TRIES} tries gave all {num_clients} clients "
        f">= {min_size} examples ({labels.size} examples, {num_classes} classes); raise alpha, "
        "use fewer clients or lower min_size"
    )


def partition(labels: np.ndarray, num_clients: int, *, method: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Partition example indices among clients with the named ``method``.

    ``"iid"`` ignores ``alpha`` and the labels' values (only their count);
    ``"dirichlet"`` uses `partition_dirichlet` with its default ``min_size``.
    """
    if method == "iid":
        return partition_iid(_check_labels(labels).size, num_clients, seed=seed)
    if method == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha=alpha, seed=seed)
    raise DataError(f"unknown partition method {method!r}; allowed values: {list(PARTITION_METHODS)}")
