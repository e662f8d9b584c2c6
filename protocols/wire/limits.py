"""Limits every peer-supplied value must respect before the server stores, prints or logs it.

The server is a trust boundary: ids, run ids, metric names and metric values come from parties it
does not control. An id is printed in the console, written to ``metrics.jsonl`` and echoed in
errors, so ids are restricted to a safe character set at Join (no NUL, CR/LF or terminal escape
codes, at most `MAX_ID_LENGTH` characters), and any other peer string is shown only through
`shown`, which bounds and escapes it. Client-reported metrics are few, named safely, finite
and within the range their meaning allows; anything else is refused with an error naming the
metric.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from protocols.errors import MalformedMessage

__all__ = [
    "CLIENT_ID_PATTERN", "MAX_ID_LENGTH", "MAX_METRICS", "PROTOCOL_VERSION", "check_client_id",
    "check_metrics", "shown",
]  # fmt: skip

#: Version of the wire protocol a client states at Join; the server refuses another version.
PROTOCOL_VERSION: int = 1

#: Longest client id (and run id) the server accepts.
MAX_ID_LENGTH: int = 64

#: Characters a client id may use: letters, digits and ``. _ - : @``, starting with a letter or digit.
CLIENT_ID_PATTERN: re.Pattern[str] = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")

#: Most metrics one update may report.
MAX_METRICS: int = 32

_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")
# What each known metric may be: (low, high) inclusive. Unknown names get the generic bound.
_METRIC_RANGES: dict[str, tuple[float, float]] = {
    "eval_accuracy": (0.0, 1.0),
    "eval_examples": (0.0, 1e12),
    "train_loss": (0.0, 1e6),
    "eval_loss": (0.0, 1e6),
    "train_examples": (0.0, 1e12),
}
_GENERIC_RANGE = (-1e12, 1e12)


def shown(value: str, limit: int = 48) -> str:
    """``repr`` of a peer-supplied string, cut to ``limit`` characters, for errors and logs.

    ``repr`` escapes control characters (NUL, CR/LF, ESC), so the result is one safe line; a long
    value is cut and says how long it was, so a 1 MB id cannot flood a log.
    """
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def check_client_id(client_id: str, *, field: str = "client_id") -> str:
    """Return ``client_id`` if it is a safe id; raise `MalformedMessage` saying why not."""
    if not client_id:
        raise MalformedMessage(f"{field} is empty; use 1-{MAX_ID_LENGTH} characters")
    if len(client_id) > MAX_ID_LENGTH:
        raise MalformedMessage(f"{field} {shown(client_id)} is longer than {MAX_ID_LENGTH} characters")
    if not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise MalformedMessage(
            f"{field} {shown(client_id)} may only use letters, digits and '._-:@' "
            "and must start with a letter or digit"
        )
    return client_id


def check_metrics(metrics: Mapping[str, float], *, who: str) -> dict[str, float]:
    """Validate the metrics of one update; return them as a plain dict of floats.

    Refused (with the metric's name): more than `MAX_METRICS` entries, a name outside
    ``[A-Za-z_][A-Za-z0-9_.]*`` (64 characters at most), a non-finite value, a value outside the
    range its meaning allows (an accuracy in [0, 1], a loss in [0, 1e6], a count in [0, 1e12],
    any other value in [-1e12, 1e12]).
    """
    if len(metrics) > MAX_METRICS:
        raise MalformedMessage(f"{who}: {len(metrics)} metrics reported; at most {MAX_METRICS} are accepted")
    out: dict[str, float] = {}
    for name, raw in metrics.items():
        if not _METRIC_NAME.fullmatch(name):
            raise MalformedMessage(f"{who}: metric name {shown(name)} is not a valid metric name")
        value = float(raw)
        if not math.isfinite(value):
            raise MalformedMessage(f"{who}: metric {name!r} is {value}; metrics must be finite")
        low, high = _METRIC_RANGES.get(name, _GENERIC_RANGE)
        if not low <= value <= high:
            raise MalformedMessage(f"{who}: metric {name!r} = {value:g} is outside [{low:g}, {high:g}]")
        out[name] = value
    return out
