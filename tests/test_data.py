"""Tests of the data layer: datasets, loaders, splits and partitioners."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_fl.data import (
    DataError,
    TextDataset,
    load_bbc_news,
    load_text_file,
    make_synthetic,
    partition,
    partition_dirichlet,
    partition_iid,
    train_test_split,
)

FAST = settings(max_examples=40, deadline=None, database=None)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "each part must be sorted without duplicates"
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    assert np.array_equal(np.sort(joined), np.arange(n))


# ---------------------------------------------------------------------------- TextDataset


def test_text_dataset_validates_and_subsets() -> None:
    ds = TextDataset(("a", "b", "c"), np.array([0, 1, 1]), ("x", "y"))
    assert len(ds) == 3 and ds.num_labels == 2 and ds.labels.dtype == np.int64
    sub = ds.subset([2, 0])
    assert sub.texts == ("c", "a") and sub.labels.tolist() == [1, 0] and sub.label_names == ("x", "y")
    assert len(ds.subset(np.array([], dtype=np.int64))) == 0
    with pytest.raises(ValueError):
        ds.labels[0] = 1  # read-only: shared datasets cannot be mutated
    with pytest.raises(DataError, match="3 texts but 2 labels"):
        TextDataset(("a", "b", "c"), np.array([0, 1]), ("x", "y"))
    with pytest.raises(DataError, match=r"\[0, 2\)"):
        TextDataset(("a",), np.array([2]), ("x", "y"))
    with pytest.raises(DataError, match="1-D"):
        TextDataset(("a",), np.array([[0]]), ("x", "y"))
    with pytest.raises(DataError, match="subset indices"):
        ds.subset([3])


# ---------------------------------------------------------------------------- BBC News


def test_load_bbc_news() -> None:
    ds = load_bbc_news()
    assert len(ds) == 2225
    assert ds.label_names == ("business", "entertainment", "politics", "sports", "tech")
    counts = np.bincount(ds.labels, minlength=ds.num_labels)
    assert counts.sum() == 2225 and counts.min() > 300
    assert all(t and t == t.strip() for t in ds.texts)
    assert np.all(np.diff(ds.labels) >= 0)  # classes read in sorted order
    again = load_bbc_news.__wrapped__()  # bypass the cache: a fresh read is identical
    assert again.texts == ds.texts and np.array_equal(again.labels, ds.labels)
    assert load_bbc_news() is ds  # cached


# ---------------------------------------------------------------------------- load_text_file


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_round_trip_int_labels(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.csv", 'text,label,extra\nhello world,0,x\n"a, quoted\ntext",2,y\n\nbye,1,z\n')
    ds = load_text_file(f)
    assert ds.texts == ("hello world", "a, quoted\ntext", "bye")
    assert ds.labels.tolist() == [0, 2, 1] and ds.label_names == ("0", "1", "2")


def test_csv_string_labels_with_names_and_custom_columns(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.csv", "body,cls\ngood movie,pos\nbad movie,neg\nok,1\n")
    ds = load_text_file(f, text_column="body", label_column="cls", label_names=["neg", "pos"])
    assert ds.labels.tolist() == [1, 0, 1] and ds.label_names == ("neg", "pos")


def test_jsonl_round_trip(tmp_path: Path) -> None:
    rows = [{"text": "one", "label": 1}, {"text": "two", "label": "0"}, {"text": "three", "label": 3}]
    f = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_text_file(f)
    assert ds.texts == ("one", "two", "three") and ds.labels.tolist() == [1, 0, 3]
    assert ds.label_names == ("0", "1", "2", "3")
    g = _write(tmp_path / "s.json", '{"text": "a", "label": "sci"}\n{"text": "b", "label": "art"}\n')
    named = load_text_file(g, label_names=("art", "sci"))
    assert named.labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "pattern"),
    [
        ("d.csv", "text,lab\nx,0\n", {}, r"line 1 \(header\): column 'label' is missing"),
        ("d.csv", "text,label\nx,0\n ,1\n", {}, r"line 3: column 'text' is empty"),
        ("d.csv", "text,label\nx,0\ny,1,extra\n", {}, r"line 3: 3 fields but the header has 2"),
        ("d.csv", "text,label\nx,0\ny,cat\n", {}, r"line 3: column 'label': string label 'cat'.*label_names"),
        ("d.csv", "text,label\nx,0\ny,cat\n", {"label_names": ["a", "b"]}, r"line 3: .*unknown label 'cat'"),
        ("d.csv", "text,label\nx,0\ny,5\n", {"label_names": ["a", "b"]}, r"line 3: .*out of range \[0, 2\)"),
        ("d.csv", "text,label\nx,-1\n", {}, r"line 2: column 'label': label id -1 is out of range"),
        ("d.csv", "text,label\nx,\n", {}, r"line 2: column 'label': label is empty"),
        ("d.csv", "", {}, r"d\.csv: empty file"),
        ("d.csv", "text,label\n", {}, r"d\.csv: empty file"),
        ("d.jsonl", "", {}, r"d\.jsonl: empty file"),
        ("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b"\n', {}, r"line 2: bad JSON"),
        ("d.jsonl", '{"text": "a", "label": 0}\n[1, 2]\n', {}, r"line 2: expected a JSON object, got list"),
        ("d.jsonl", '{"text": "a", "label": 0}\n{"label": 1}\n', {}, r"line 2: missing key 'text'"),
        ("d.jsonl", '{"text": "", "label": 0}\n', {}, r"line 1: 'text' must be a non-empty string"),
        ("d.jsonl", '{"text": "a", "label": 1.5}\n', {}, r"line 1: 'label' must be an int or a string"),
        ("d.jsonl", '{"text": "a", "label": 0}\n\n{"text": "b", "label": "x"}\n', {}, r"line 3: .*'x'"),
        ("d.txt", "text,label\nx,0\n", {}, r"d\.txt: unsupported extension '\.txt'.*\.csv.*\.jsonl"),
    ],
)
def test_load_text_file_errors(tmp_path: Path, name: str, content: str, kwargs: dict, pattern: str) -> None:
    f = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=pattern):
        load_text_file(f, **kwargs)


def test_load_text_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.csv: file not found"):
        load_text_file(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------- make_synthetic


def test_make_synthetic() -> None:
    a = make_synthetic(101, num_labels=4, seed=3)
    b = make_synthetic(101, num_labels=4, seed=3)
    assert a.texts == b.texts and np.array_equal(a.labels, b.labels)
    assert a.label_names == ("sports", "finance", "science", "music")
    counts = np.bincount(a.labels, minlength=4)
    assert counts.max() - counts.min() <= 1
    assert all(len(t.split()) == 24 for t in a.texts)
    c = make_synthetic(101, num_labels=4, seed=4)
    assert c.texts != a.texts
    assert make_synthetic(16, num_labels=8).num_labels == 8
    for bad in ({"num_labels": 9}, {"num_labels": 1}, {"words_per_text": 0}):
        with pytest.raises(DataError):
            make_synthetic(10, **bad)
    with pytest.raises(DataError, match="num_examples"):
        make_synthetic(0)


def test_make_synthetic_is_learnable_by_topic_words() -> None:
    """A bag-of-words nearest-centroid rule separates the classes (sanity of the signal)."""
    ds = make_synthetic(200, num_labels=5, seed=0)
    vocab = {w: i for i, w in enumerate(sorted({w for t in ds.texts for w in t.split()}))}
    x = np.zeros((len(ds), len(vocab)))
    for row, text in enumerate(ds.texts):
        np.add.at(x[row], [vocab[w] for w in text.split()], 1.0)
    centroids = np.stack([x[ds.labels == c].mean(axis=0) for c in range(ds.num_labels)])
    assert np.mean(np.argmax(x @ centroids.T, axis=1) == ds.labels) > 0.95


# ---------------------------------------------------------------------------- train_test_split


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_train_test_split_stratified(fraction: float) -> None:
    labels = np.repeat(np.arange(4), [7, 20, 33, 2])
    ds = TextDataset(tuple(f"t{i}" for i in range(labels.size)), labels, ("a", "b", "c", "d"))
    train, test = train_test_split(ds, test_fraction=fraction, seed=1)
    assert len(train) + len(test) == len(ds)
    assert not set(train.texts) & set(test.texts)
    sizes = np.bincount(labels)
    test_counts = np.bincount(test.labels, minlength=4)
    assert np.all(np.abs(test_counts - fraction * sizes) <= 1)
    assert np.all(test_counts >= 1) and np.all(test_counts < sizes)
    again = train_test_split(ds, test_fraction=fraction, seed=1)
    assert again[1].texts == test.texts
    assert train_test_split(ds, test_fraction=fraction, seed=2)[1].texts != test.texts


def test_train_test_split_bad_args() -> None:
    ds = make_synthetic(20, num_labels=2)
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(DataError, match=r"test_fraction must be a number in \(0, 1\)"):
            train_test_split(ds, test_fraction=bad, seed=0)
    single = TextDataset(("a", "b"), np.array([0, 1]), ("x", "y"))
    with pytest.raises(DataError, match="at least 2 examples"):
        train_test_split(single, test_fraction=0.5, seed=0)


# ---------------------------------------------------------------------------- partitioners


@FAST
@given(n=st.integers(1, 500), k=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_partition_iid_properties(n: int, k: int, seed: int) -> None:
    k = min(k, n)
    parts = partition_iid(n, k, seed=seed)
    assert len(parts) == k
    _assert_exact_cover(parts, n)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition_iid(n, k, seed=seed)))
    if n >= 20 and k >= 2:
        other = partition_iid(n, k, seed=seed + 1)
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


@FAST
@given(
    counts=st.lists(st.integers(0, 80), min_size=1, max_size=6).filter(lambda c: sum(c) >= 60),
    k=st.integers(1, 6),
    alpha=st.floats(0.5, 100.0),
    min_size=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_dirichlet_properties(counts: list[int], k: int, alpha: float, min_size: int, seed: int) -> None:
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    parts = partition_dirichlet(labels, k, alpha=alpha, seed=seed, min_size=min_size)
    assert len(parts) == k
    _assert_exact_cover(parts, labels.size)
    assert min(p.size for p in parts) >= min_size
    again = partition_dirichlet(labels, k, alpha=alpha, seed=seed, min_size=min_size)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if k >= 2:
        other = partition_dirichlet(labels, k, alpha=alpha, seed=seed + 1, min_size=min_size)
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def _mean_max_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / p.size for p in parts]))


def test_partition_dirichlet_skew_and_min_size() -> None:
    labels = load_bbc_news().labels
    skew_small = np.mean(
        [_mean_max_class_share(labels, partition_dirichlet(labels, 10, alpha=0.1, seed=s)) for s in range(5)]
    )
    skew_large = np.mean(
        [_mean_max_class_share(labels, partition_dirichlet(labels, 10, alpha=100.0, seed=s)) for s in range(5)]
    )
    assert skew_large < 0.3 < 0.55 < skew_small
    parts = partition_dirichlet(labels, 20, alpha=0.1, seed=0, min_size=5)
    assert min(p.size for p in parts) >= 5
    _assert_exact_cover(parts, labels.size)


def test_partitioner_bad_arguments() -> None:
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(DataError, match="alpha must be a finite number > 0"):
        partition_dirichlet(labels, 3, alpha=0.0, seed=0)
    with pytest.raises(DataError, match="num_clients must be an int >= 1"):
        partition_dirichlet(labels, 0, alpha=1.0, seed=0)
    with pytest.raises(DataError, match=r"16 \* 2 = 32 exceeds the 30 examples"):
        partition_dirichlet(labels, 16, alpha=1.0, seed=0)
    with pytest.raises(DataError, match="1-D integer array"):
        partition_dirichlet(labels.astype(float), 3, alpha=1.0, seed=0)
    with pytest.raises(DataError, match="in 1000 tries"):
        partition_dirichlet(np.zeros(30, dtype=np.int64), 15, alpha=1e-3, seed=0)
    with pytest.raises(DataError, match="num_clients must be an int >= 1"):
        partition_iid(10, 0, seed=0)
    with pytest.raises(DataError, match="3 clients at least one example each from 2"):
        partition_iid(2, 3, seed=0)
    with pytest.raises(DataError, match=r"allowed values: \['iid', 'dirichlet'\]"):
        partition(labels, 3, method="shards", alpha=1.0, seed=0)


def test_partition_dispatch() -> None:
    labels = np.repeat(np.arange(3), 10)
    iid = partition(labels, 4, method="iid", alpha=0.5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(iid, partition_iid(30, 4, seed=7)))
    dirichlet = partition(labels, 4, method="dirichlet", alpha=0.5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(dirichlet, partition_dirichlet(labels, 4, alpha=0.5, seed=7)))
