"""Crash points: where the crash-safety tests kill the real server process with SIGKILL.

A server process started with ``SECURE_FL_CRASH_AT=POINT:ROUND`` (for example
``after-ledger:2``) sends itself SIGKILL when it reaches ``POINT`` in round ``ROUND``: no
handler runs, no file is closed, exactly as under ``kill -9`` or a power cut. The points sit
between the steps whose order makes a release crash-safe (see `secure_fl.server.resume`):

``before-aggregation``
    every answer of the round is in; nothing is aggregated, recorded or released.
``checkpoint-write``
    the round's pending checkpoint is written to its temporary file but not yet renamed.
``before-ledger``
    the pending checkpoint is on disk; the ledger line is not.
``after-ledger``
    the ledger line is fsynced; the checkpoint is still pending.
``after-checkpoint``
    the checkpoint is promoted; the adapter directory and the metrics line are not written.

Without the variable (every real run) `crash_point` only reads the environment. The variable is
read on every call, so a test can start a fresh server process with it and the resumed process
without it.
"""

from __future__ import annotations

import os
import signal

#: The environment variable naming the crash point (``POINT:ROUND``).
CRASH_ENV = "SECURE_FL_CRASH_AT"
#: Every crash point, in the order a released round reaches them.
CRASH_POINTS = ("before-aggregation", "checkpoint-write", "before-ledger", "after-ledger", "after-checkpoint")


def crash_point(name: str, round_number: int) -> None:
    """SIGKILL this process if ``SECURE_FL_CRASH_AT`` names ``name`` in round ``round_number``."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    if name not in CRASH_POINTS:  # a typo in the code, not in the environment
        raise ValueError(f"unknown crash point {name!r}; known: {', '.join(CRASH_POINTS)}")
    if spec == f"{name}:{round_number}":
        os.kill(os.getpid(), signal.SIGKILL)
