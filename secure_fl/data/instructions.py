"""Causal-LM datasets: prompt/response pairs (instruction tuning) and plain text, and their loaders.

An `InstructionDataset` holds one prompt and one response per example. Instruction tuning
computes the loss on the response tokens only (the prompt is context); a plain-text example
has an empty prompt, so the loss covers the whole text. Like the classification loaders, the
JSONL loader refuses malformed input with a `DataError` naming the file and the line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import _FILLER, _TOPICS, DataError

__all__ = ["InstructionDataset", "load_instruction_file", "make_synthetic_instructions"]

#: The single "label" of every causal-LM example: splits and partitions treat the set as one class.
LM_LABEL_NAMES = ("text",)


@dataclass(frozen=True)
class InstructionDataset:
    """An immutable collection of ``(prompt, response)`` pairs; ``prompt == ""`` is plain text.

    Parameters
    ----------
    prompts : tuple of str
        The context of each example, used verbatim (include any template or separator, such as
        ``"### Response:\\n"``, in the prompt itself). Masked out of the loss.
    responses : tuple of str
        What the model learns to produce after its prompt (the whole text for plain LM).
    """

    prompts: tuple[str, ...]
    responses: tuple[str, ...]

    def __post_init__(self) -> None:
        prompts, responses = tuple(self.prompts), tuple(self.responses)
        if len(prompts) != len(responses):
            raise DataError(f"got {len(prompts)} prompts but {len(responses)} responses; they must match one to one")
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "responses", responses)

    def __len__(self) -> int:
        return len(self.responses)

    @property
    def labels(self) -> np.ndarray:
        """All zeros: one class, so a stratified split is a random split and Dirichlet skews quantity only."""
        return np.zeros(len(self), dtype=np.int64)

    @property
    def label_names(self) -> tuple[str, ...]:
        """`LM_LABEL_NAMES` (causal-LM examples have no classes)."""
        return LM_LABEL_NAMES

    def subset(self, indices: np.ndarray | Sequence[int]) -> InstructionDataset:
        """Return the examples at ``indices`` (in that order)."""
        idx = np.asarray(indices)
        if idx.size == 0:
            return InstructionDataset((), ())
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise DataError(f"subset indices must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= len(self):
            raise DataError(f"subset indices must lie in [0, {len(self)}), found [{idx.min()}, {idx.max()}]")
        picked = idx.tolist()  # the cost is the subset's size, not the whole set's
        return InstructionDataset(tuple(self.prompts[i] for i in picked), tuple(self.responses[i] for i in picked))


def load_instruction_file(
    path: str | os.PathLike[str],
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
    text_column: str = "text",
) -> InstructionDataset:
    """Load a causal-LM JSON Lines file: one object per line, blank lines skipped.

    Each object holds either ``prompt_column`` and ``response_column`` (instruction tuning; the
    prompt may be empty, the response may not) or ``text_column`` (plain LM), as strings. Lines of
    both kinds may be mixed.

    Raises
    ------
    DataError
        Naming the file and the line: bad JSON, not an object, neither prompt/response nor text,
        a prompt without a response (or the reverse), or a value that is not a string.
    """
    file = Path(path)
    if file.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"{file}: unsupported extension {file.suffix!r}; causal-lm data is JSON Lines (.jsonl)")
    if not file.is_file():
        raise DataError(f"{file}: file not found (or not a regular file); check the [data] path setting")
    try:
        content = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not valid UTF-8 at byte {exc.start}; re-save the file as UTF-8") from exc
    prompts: list[str] = []
    responses: list[str] = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}: line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: bad JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        has_prompt, has_response = prompt_column in obj, response_column in obj
        if has_prompt or has_response:
            if not (has_prompt and has_response):
                missing = response_column if has_prompt else prompt_column
                raise DataError(f"{where}: has {prompt_column if has_prompt else response_column!r} but no "
                                f"{missing!r}; an instruction example needs both")
            prompt, response = obj[prompt_column], obj[response_column]
            if not isinstance(prompt, str):
                raise DataError(f"{where}: {prompt_column!r} must be a string, got {prompt!r}")
            if not isinstance(response, str) or not response.strip():
                raise DataError(f"{where}: {response_column!r} must be a non-empty string, got {response!r}")
        elif text_column in obj:
            prompt, response = "", obj[text_column]
            if not isinstance(response, str) or not response.strip():
                raise DataError(f"{where}: {text_column!r} must be a non-empty string, got {response!r}")
        else:
            raise DataError(
                f"{where}: expected {prompt_column!r} and {response_column!r} (instruction tuning) or {text_column!r} "
                f"(plain text); keys present: {sorted(obj)} (set data.prompt_column / data.response_column / "
                "data.text_column to your keys)"
            )
        prompts.append(prompt)
        responses.append(response)
    if not responses:
        raise DataError(f"{file}: empty file, no examples found (only blank lines)")
    return InstructionDataset(tuple(prompts), tuple(responses))


def make_synthetic_instructions(num_examples: int, *, num_topics: int = 4, seed: int = 0,
                                words_per_prompt: int = 12) -> InstructionDataset:
    """A deterministic, learnable instruction set for smoke tests: name the topic of some words.

    Each prompt is ``"which topic: w1 w2 ... answer:"`` where ``round(0.6 * words_per_prompt)``
    words come from one topic's list (the topics of `make_synthetic`) and the rest from filler
    words; the response is ``"the topic is <name>"``. Topics are balanced and shuffled;
    everything is drawn from ``np.random.default_rng(seed)``.
    """
    for name, value, low in (("num_examples", num_examples, 1), ("words_per_prompt", words_per_prompt, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise DataError(f"make_synthetic_instructions: {name} must be an int >= {low}, got {value!r}")
    if isinstance(num_topics, bool) or not isinstance(num_topics, (int, np.integer)) or not 2 <= num_topics <= len(_TOPICS):
        raise DataError(f"make_synthetic_instructions: num_topics must be an int in [2, {len(_TOPICS)}], got {num_topics!r}")
    rng = np.random.default_rng(seed)
    names = np.array(tuple(_TOPICS)[:num_topics])
    topic = np.array([_TOPICS[n] for n in names])
    filler = np.array(_FILLER)
    labels = rng.permutation(np.arange(num_examples, dtype=np.int64) % num_topics)
    shape = (num_examples, words_per_prompt)
    is_topic = np.argsort(rng.random(shape), axis=1) < max(1, round(0.6 * words_per_prompt))
    topic_words = topic[labels[:, None], rng.integers(0, topic.shape[1], shape)]
    words = np.where(is_topic, topic_words, filler[rng.integers(0, filler.size, shape)])
    prompts = tuple(f"which topic: {' '.join(row)} answer:" for row in words.tolist())
    responses = tuple(f"the topic is {name}" for name in names[labels].tolist())
    return InstructionDataset(prompts, responses)
