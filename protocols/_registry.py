"""A name -> class registry for plug-ins (one copy per top-level package, by design).

``protocols``, ``privacy`` and ``robustness`` may not import each other, so each keeps this tiny
class; ``secure_fl`` reuses the one in ``protocols``.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps config names to plug-in classes, each of which carries its own ``name`` attribute.

    Parameters
    ----------
    kind:
        What is registered, used in error messages (e.g. ``"secure-aggregation mode"``).
    config_key:
        The config field that selects an entry (e.g. ``"secure.mode"``), used in error messages.
    entries:
        The built-in entries.
    """

    def __init__(self, kind: str, config_key: str, entries: dict[str, type[T]]) -> None:
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, type[T]] = {}
        for name, cls in entries.items():
            self.register(name, cls)

    def register(self, name: str, cls: type[T], *, force: bool = False) -> None:
        """Register ``cls`` under ``name``; refuse a duplicate (unless ``force``) or a name mismatch."""
        declared = getattr(cls, "name", None)
        if declared != name:
            raise ValueError(f"{self.kind} registry key {name!r} differs from {cls.__name__}.name={declared!r}")
        if name in self._entries and not force:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass force=True to replace it)")
        self._entries[name] = cls

    def get(self, name: str) -> type[T]:
        """Return the class registered under ``name`` or raise naming the allowed values."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r} for {self.config_key}; allowed: {', '.join(self.names())}"
            ) from None

    def create(self, name: str, **kwargs: Any) -> T:
        """Instantiate the class registered under ``name`` with keyword arguments."""
        return self.get(name)(**kwargs)

    def names(self) -> tuple[str, ...]:
        """The registered names, sorted."""
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        return name in self._entries
