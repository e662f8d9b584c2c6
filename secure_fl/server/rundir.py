"""The run directory: resolved config, metrics, checkpoints and the released adapter.

Layout (``OUT/``): ``config.toml`` (resolved), ``run.json`` (run id, transport, every stage's
plug-in class and parameters), ``metrics.jsonl`` (one JSON line a round), ``ledger.jsonl`` (the
privacy ledger, one fsynced line per release, see `privacy.ledger`),
``checkpoints/round-NNNN.safetensors`` (global adapter state after each round with the plug-ins'
state and the cohort RNG state, the last few kept; ``round-NNNN.pending`` while the round's
ledger line is being written),
``adapter/`` (the latest global adapter, loadable with ``PeftModel.from_pretrained``) and
``report/`` (``privacy_report.json`` and ``privacy_report.html``). Every file is written atomically
(temporary file + rename) and metrics and ledger lines are fsynced, so a crash never leaves a
half-written file behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from secure_fl.config import Config
from secure_fl.errors import RunError
from secure_fl.server.checkpoint import Checkpoint, json_safe, read_checkpoint, write_checkpoint


class RunDirectory:
    """Writes everything a run produces under one directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(exist_ok=True)
        self.adapter = self.path / "adapter"
        self.metrics_path = self.path / "metrics.jsonl"
        self.ledger_path = self.path / "ledger.jsonl"
        self.run_info_path = self.path / "run.json"
        self.report_dir = self.path / "report"
        #: RFFL reputations (``[robustness] reputation``), rewritten atomically after every released round.
        self.reputation_path = self.path / "reputation.json"

    def holds_run(self) -> bool:
        """Whether an earlier run already wrote rounds or releases here."""
        return any(p.exists() and p.stat().st_size > 0 for p in (self.metrics_path, self.ledger_path))

    def write_run_info(self, info: Mapping[str, Any]) -> None:
        """Write ``run.json`` (what the audit report needs besides config, metrics and ledger)."""
        self._atomic_write(self.run_info_path, (json.dumps(json_safe(dict(info)), indent=2) + "\n").encode())

    def read_run_info(self) -> dict[str, Any]:
        """The parsed ``run.json``, or an empty dict if it is missing."""
        if not self.run_info_path.exists():
            return {}
        info = json.loads(self.run_info_path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}

    def write_config(self, config: Config) -> None:
        """Write the resolved config as ``config.toml``."""
        self._atomic_write(self.path / "config.toml", config.to_toml().encode())

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` and fsync it."""
        line = json.dumps(json_safe(dict(record)), sort_keys=False) + "\n"
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metrics lines written so far."""
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def stage_checkpoint(
        self,
        round_number: int,
        state: Mapping[str, np.ndarray],
        *,
        run_id: str,
        plugin_state: Mapping[str, Mapping[str, Any]] | None = None,
        rng_state: Mapping[str, Any] | None = None,
        base: Mapping[str, Any] | None = None,
        reputation: Mapping[str, Any] | None = None,
        record: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write round ``round_number``'s checkpoint as ``round-NNNN.pending`` (not yet a release).

        ``plugin_state`` (`Stages.state_dict`), ``rng_state`` (the cohort generator's
        ``bit_generator.state``), ``base`` (a merging rule's merged base), ``reputation`` and
        ``record`` (the round's metrics record) go into the same atomically written file (see
        `secure_fl.server.checkpoint`).

        The engine writes it before the round's ledger line and promotes it with
        `commit_checkpoint` after: a crash in between leaves a pending file that a resume
        promotes (the ledger line is there) or deletes (it is not).
        """
        target = self.pending_path(round_number)
        return write_checkpoint(target, round_number, state, run_id=run_id, plugin_state=plugin_state,
                                rng_state=rng_state, base=base, reputation=reputation, record=record)

    def commit_checkpoint(self, round_number: int, *, keep: int) -> Path:
        """Promote the pending checkpoint of ``round_number``; keep the newest ``keep`` checkpoints."""
        target = self.checkpoint_path(round_number)
        os.replace(self.pending_path(round_number), target)
        _fsync_dir(self.checkpoints)
        for old in sorted(self.checkpoints.glob("round-*.safetensors"))[:-keep]:
            old.unlink()
        return target

    def checkpoint_path(self, round_number: int) -> Path:
        """Where round ``round_number``'s released checkpoint lives."""
        return self.checkpoints / f"round-{round_number:04d}.safetensors"

    def pending_path(self, round_number: int) -> Path:
        """Where round ``round_number``'s checkpoint waits for its ledger line."""
        return self.checkpoints / f"round-{round_number:04d}.pending"

    def pending_checkpoints(self) -> list[int]:
        """Rounds with a pending checkpoint (a server stopped between staging and committing one)."""
        return sorted(int(p.stem.split("-")[-1]) for p in self.checkpoints.glob("round-*.pending"))

    def checkpoint_rounds(self) -> list[int]:
        """Rounds with a released (committed) checkpoint, oldest first."""
        return sorted(int(p.stem.split("-")[-1]) for p in self.checkpoints.glob("round-*.safetensors"))

    def latest_checkpoint(self) -> tuple[int, dict[str, np.ndarray]] | None:
        """The newest checkpoint as ``(round, adapter state)``, or ``None`` (see `load_checkpoint` for the rest)."""
        checkpoint = self.load_checkpoint()
        return None if checkpoint is None else (checkpoint.round, checkpoint.state)

    def load_checkpoint(self, round_number: int | None = None) -> Checkpoint | None:
        """The checkpoint of ``round_number`` (default: the newest) with plug-in and RNG state, or ``None``."""
        if round_number is not None:
            path = self.checkpoint_path(round_number)
            return read_checkpoint(path) if path.exists() else None
        files = sorted(self.checkpoints.glob("round-*.safetensors"))
        return read_checkpoint(files[-1]) if files else None

    def write_reputation(self, state: Mapping[str, Any]) -> None:
        """Write ``reputation.json`` atomically (a crash leaves the previous round's file whole)."""
        self._atomic_write(self.reputation_path, (json.dumps(json_safe(dict(state)), indent=2) + "\n").encode())

    def read_reputation(self) -> dict[str, Any] | None:
        """The parsed ``reputation.json``, or ``None`` if this run keeps none (a damaged file raises `RunError`)."""
        if not self.reputation_path.exists():
            return None
        try:
            state = json.loads(self.reputation_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"{self.reputation_path} cannot be read: {exc}") from None
        if not isinstance(state, dict):
            raise RunError(f"{self.reputation_path} does not hold a JSON object")
        return state

    def append_run_event(self, key: str, event: Mapping[str, Any]) -> None:
        """Append ``event`` to the list ``key`` of ``run.json`` (e.g. each resume), atomically."""
        info = self.read_run_info()
        info[key] = [*info.get(key, []), dict(event)]
        self.write_run_info(info)

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX: fsync the directory); a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
