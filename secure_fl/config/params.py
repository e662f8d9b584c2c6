"""Plug-in settings: the ``[section.params]`` tables and what a plug-in class accepts.

A plug-in's settings are the keyword arguments of its ``__init__``, with their type hints and
defaults (style habit 3). `plugin_settings` reads them from the class, `check_params` validates a
config table against them (unknown keys refused with a did-you-mean, values type-checked and
coerced, ints accepted for floats), and `Params` is the immutable mapping a frozen config keeps.
Help texts come from the class docstring's numpy ``Parameters`` section, or from a
``settings_help`` dict on the class.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Union

from secure_fl.config._checks import _coerce, _suggest
from secure_fl.errors import ConfigError

#: Marks a setting without a default (the config must give it).
REQUIRED: Any = inspect.Parameter.empty


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return Params(value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, Params):
        return value.to_dict()
    return value


class Params(Mapping[str, Any]):
    """An immutable, hashable ``{setting: value}`` table (lists are kept as tuples).

    Equal to any mapping with the same items, so ``config.robustness.params == {"factor": 3.0}``.
    """

    __slots__ = ("_items", "_dict")

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        frozen = {str(k): _freeze(v) for k, v in dict(items).items()}
        self._items = tuple(sorted(frozen.items()))
        self._dict = dict(self._items)

    def __getitem__(self, key: str) -> Any:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Params):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._dict == {k: _freeze(v) for k, v in other.items()}
        return NotImplemented

    def __repr__(self) -> str:
        return f"Params({self.to_dict()!r})"

    def __deepcopy__(self, memo: dict[int, Any]) -> Params:
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples become lists), as written to TOML and JSON."""
        return {k: _thaw(v) for k, v in self._items}


@dataclass(frozen=True)
class PluginSetting:
    """One keyword argument of a plug-in's ``__init__``: name, type hint, default and help."""

    name: str
    hint: Any
    default: Any
    help: str = ""

    @property
    def required(self) -> bool:
        """Whether the config must give a value (the argument has no default)."""
        return self.default is REQUIRED

    @property
    def type_name(self) -> str:
        """The type as a short readable string (``float``, ``tuple[str, ...]``, ``any``)."""
        if self.hint is None:
            return "any"
        if isinstance(self.hint, type):
            return self.hint.__name__
        return str(self.hint).replace("typing.", "")


def plugin_settings(cls: type) -> dict[str, PluginSetting]:
    """The settings ``cls`` accepts: its keyword arguments with defaults and type hints, in order."""
    init = getattr(cls, "__init__", object.__init__)
    if init is object.__init__:
        return {}
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # a user class with unresolvable annotations: fall back to the defaults' types
        hints = {}
    helps = {**_docstring_params(cls.__doc__ or ""), **dict(getattr(cls, "settings_help", {}) or {})}
    out: dict[str, PluginSetting] = {}
    for parameter in inspect.signature(cls).parameters.values():
        if parameter.kind not in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            continue
        hint = hints.get(parameter.name)
        if hint is None and parameter.default is not REQUIRED and parameter.default is not None:
            hint = type(parameter.default)
        out[parameter.name] = PluginSetting(parameter.name, hint, parameter.default, str(helps.get(parameter.name, "")))
    return out


def accepts_any_setting(cls: type) -> bool:
    """Whether ``cls.__init__`` takes ``**kwargs`` (then unknown keys cannot be refused)."""
    init = getattr(cls, "__init__", object.__init__)
    if init is object.__init__:
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())


def check_params(key: str, cls: type, params: Mapping[str, Any], *, what: str) -> Params:
    """Validate the table ``key`` (e.g. ``robustness.params``) against the settings of ``cls``.

    ``what`` names the plug-in in messages (``"defense 'norm-filter'"``). Returns the coerced
    values (ints become floats where the hint says float). Raises `ConfigError` naming the key.
    """
    if not isinstance(params, Mapping):
        raise ConfigError(f"{key}: must be a table of setting = value pairs, got {params!r}", key=key)
    settings = plugin_settings(cls)
    open_ended = accepts_any_setting(cls)
    out: dict[str, Any] = {}
    for name, value in params.items():
        full = f"{key}.{name}"
        setting = settings.get(name)
        if setting is None:
            if open_ended:
                out[name] = value
                continue
            takes = f"takes: {', '.join(settings)}" if settings else "takes no settings"
            raise ConfigError(f"unknown key {full!r}{_suggest(name, settings)}; {what} {takes}", key=full)
        out[name] = _coerce_setting(full, setting.hint, _thaw(value) if isinstance(value, (tuple, Params)) else value)
    missing = [s.name for s in settings.values() if s.required and s.name not in out]
    if missing:
        full = f"{key}.{missing[0]}"
        raise ConfigError(f"{full}: {what} needs a value for {', '.join(missing)} (no default)", key=full)
    return Params(out)


def _plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """A section's values as plain data: tuples become lists, `Params` plain dicts."""
    return {k: _thaw(v) for k, v in values.items()}


def resolved_settings(cls: type, params: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting's effective value (defaults filled in), as plain JSON-able data."""
    values = {name: s.default for name, s in plugin_settings(cls).items() if not s.required}
    values.update(Params(params).to_dict())
    return {k: _thaw(_freeze(v)) for k, v in values.items()}


def _coerce_setting(key: str, hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        hint = options[0] if len(options) == 1 else None
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (bool, int, float, str):
        return _coerce(key, hint, value)
    if origin in (tuple, list) and args:
        element = args[0]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce_setting(f"{key}[{i}]", element, v) for i, v in enumerate(value))
    if isinstance(value, (dict, Mapping)):
        return Params(value)
    return _freeze(value)  # no usable hint: any TOML value


_ENTRY = re.compile(r"^(\w+)\s*(?::.*)?$")


def _docstring_params(doc: str) -> dict[str, str]:
    """``{name: first sentence}`` from a numpy-style ``Parameters`` section."""
    lines = inspect.cleandoc(doc).splitlines()
    out: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines[:-1]) if line.strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"})
    except StopIteration:
        return out
    current = ""
    rest = lines[start + 2 :]
    for i, line in enumerate(rest):
        if not line.strip():
            continue
        if not line.startswith((" ", "\t")):
            match = _ENTRY.match(line.strip())
            if match is None or (i + 1 < len(rest) and set(rest[i + 1].strip()) == {"-"}):
                break
            current = match.group(1)
            out[current] = ""
        elif current:
            out[current] = (out[current] + " " + line.strip()).strip()
    return out


#: The packages that ship with secure-fl: a plug-in class defined in one of them is built in.
BUILTIN_PACKAGES = frozenset({"secure_fl", "privacy", "robustness", "protocols"})


def is_builtin_plugin(cls: type) -> bool:
    """Whether ``cls`` ships with secure-fl (rather than being registered by a user)."""
    return cls.__module__.split(".")[0] in BUILTIN_PACKAGES
