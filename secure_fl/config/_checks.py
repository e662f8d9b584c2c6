"""Shared validators and the TOML value coercion used by every config section."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

from secure_fl.errors import ConfigError


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}", key=key)


def _positive_int(key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(key, f"must be an integer >= 1, got {value!r}")


def _non_negative_int(key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(key, f"must be an integer >= 0, got {value!r}")


def _positive_float(key: str, value: float) -> None:
    if not value > 0 or value != value or value == float("inf"):
        _fail(key, f"must be a finite number > 0, got {value!r}")


def _non_negative_float(key: str, value: float) -> None:
    if not value >= 0 or value == float("inf"):
        _fail(key, f"must be a finite number >= 0, got {value!r}")


def _fraction(key: str, value: float, *, open_low: bool = False, open_high: bool = False) -> None:
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        _fail(key, f"must lie in {interval}, got {value!r}")


def _choice(key: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        _fail(key, f"{value!r} is not one of: {', '.join(allowed)}")


_CUDA_INDEX = re.compile(r"cuda:[0-9]+")


def _device(key: str, value: object) -> None:
    """A torch device setting: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether it exists is checked when used)."""
    if not isinstance(value, str) or (value not in ("auto", "cpu", "cuda") and _CUDA_INDEX.fullmatch(value) is None):
        _fail(key, f"{value!r} is not one of: auto, cpu, cuda, cuda:N (N a CUDA device index)")


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check a TOML value against a field type; ints are accepted for floats, never bools."""
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}", key=key)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}", key=key)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}", key=key)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}", key=key)
        return value
    # tuple[str, ...]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a list of strings, got {value!r}", key=key)
    return tuple(value)


# Names users bring from other frameworks (peft, HF Trainer, Flower) that we spell differently.
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_rounds": "rounds",
    "steps": "local_steps",
    "local_epochs": "local_steps",
}


def _suggest(word: str, options: Iterable[str]) -> str:
    options = list(options)
    if _ALIASES.get(word) in options:
        return f" (did you mean {_ALIASES[word]!r}?)"
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""

