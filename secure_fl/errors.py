"""Exceptions raised to users of secure-fl.

Every message says what is wrong and what to do about it. Errors from the lower packages keep
their own trees (`protocols.errors`, `privacy.errors`, `robustness.errors`).
"""

from __future__ import annotations


class SecureFLError(Exception):
    """Base class of every secure-fl error."""


class ConfigError(SecureFLError, ValueError):
    """A config file, preset, ``--set`` override or config object is invalid.

    Attributes
    ----------
    key:
        The offending key as ``section.key`` (or the section name), when known.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ModelError(SecureFLError):
    """A model, tokenizer or adapter cannot be built or loaded."""


class RunError(SecureFLError):
    """A federated run cannot continue (no clients, every round failed, server unreachable...)."""


class TransportError(SecureFLError):
    """A call to the server failed; ``code`` is the gRPC status name (e.g. ``"FAILED_PRECONDITION"``)."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.details = message
