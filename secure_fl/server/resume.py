"""Resuming a run after the server process died: ``secure-fl-server --resume RUN_DIR``.

A round is released in this order (`secure_fl.server.engine`), each step durable before the
next begins:

1. the answers are aggregated, the plug-ins' state moved on, the new adapter evaluated, all in
   memory;
2. the round's checkpoint is written as ``checkpoints/round-NNNN.pending`` (temporary file,
   fsync, rename);
3. the ledger line is appended and fsynced: **this is the release**, and what it spends counts;
4. the pending checkpoint is renamed to ``round-NNNN.safetensors``;
5. ``reputation.json``, the ``adapter/`` directory and the metrics line follow; only then does
   anything derived from the round leave the server (the next round's task).

So whatever instant the process is killed at, `recover` finds one of these states and repairs it:

* no ledger line for the round (killed in 1-2, or before any round ended): nothing was released
  or spent; a pending checkpoint or half-written temporary file is deleted and the round is run
  again from the last released checkpoint, with a freshly drawn cohort (the cohort generator
  jumps to an independent stream on every resume) and fresh secure-aggregation keys (every
  party rejoins, which closes its old protocol session);
* a ledger line but a pending checkpoint (killed between 3 and 4): the release happened; the
  checkpoint is promoted and the run continues after it, so the round is neither run nor spent
  twice;
* a committed checkpoint but no metrics line (killed in 5): the metrics record stored in the
  checkpoint is appended, with the epsilon from the ledger line.

Everything else (the accountants, the per-client budgets) is rebuilt by replaying the ledger, so
a resumed run spends exactly what an uninterrupted run of the same rounds spends. A run
directory whose ledger and checkpoints disagree in a way no crash can produce (a checkpoint
without its ledger line, a release without a checkpoint) is refused, naming the round.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy.ledger import PrivacyLedger
from secure_fl.config import Config
from secure_fl.errors import RunError
from secure_fl.server.checkpoint import Checkpoint
from secure_fl.server.rundir import RunDirectory

#: ``run.json`` key listing every resume of the run.
RESUMES_KEY = "resumes"


@dataclass
class ResumePlan:
    """What `recover` found and repaired in a run directory, and where the run continues."""

    run_dir: Path
    run_id: str
    config: Config
    #: The first round the resumed server runs.
    next_round: int
    #: The last released checkpoint (``None``: nothing was released yet, start from the initial adapter).
    checkpoint: Checkpoint | None
    #: Metrics records of the rounds that ended before the crash (released, failed or skipped), in order
    #: (the recovered record included).
    earlier: list[dict[str, Any]] = field(default_factory=list)
    #: The metrics record of the last released round, when its line was never written.
    recovered_record: dict[str, Any] | None = None
    #: What was repaired, one sentence each (also written to ``run.json``).
    actions: list[str] = field(default_factory=list)
    #: How many times the run was resumed before this resume.
    previous_resumes: int = 0

    def describe(self) -> dict[str, Any]:
        """The ``run.json`` record of this resume."""
        return {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "from_checkpoint": self.checkpoint.round if self.checkpoint is not None else 0,
            "next_round": self.next_round,
            "actions": list(self.actions),
        }


def recover(run_dir: str | Path) -> ResumePlan:
    """Repair what a killed server left in ``run_dir`` and plan where the run continues.

    Raises `RunError` (naming the file and round) when the directory holds no run, the run has
    nothing left to run (complete, or stopped by a budget), or its ledger and checkpoints
    disagree in a way a crash cannot explain. The ledger is never changed here: only pending
    checkpoints, temporary files and a half-written last metrics line are.
    """
    rd = RunDirectory(run_dir)
    config_path = rd.path / "config.toml"
    if not config_path.exists() or not rd.run_info_path.exists():
        raise RunError(f"{rd.path} holds no run to resume (config.toml and run.json are missing); "
                       "start a new run with --config or --preset")
    config = Config.from_toml(config_path)
    info = rd.read_run_info()
    run_id = str(info.get("run_id", ""))
    if not run_id:
        raise RunError(f"{rd.run_info_path} names no run_id; it was not written by secure-fl-server")
    stopped = info.get("stopped")
    if isinstance(stopped, dict):
        raise RunError(f"run {run_id} in {rd.path} stopped at round {stopped.get('round')} "
                       f"({stopped.get('reason', 'a budget')}); there is nothing to resume")
    actions: list[str] = []
    for tmp in sorted(rd.checkpoints.glob("*.tmp")):
        tmp.unlink()
        actions.append(f"deleted {tmp.name}, a checkpoint the server was writing when it stopped (never released)")
    ledger = PrivacyLedger(rd.ledger_path).entries()  # checks the hash chain
    released = [int(entry["round"]) for entry in ledger]
    committed = set(rd.checkpoint_rounds())
    for number in rd.pending_checkpoints():
        if number in released and number not in committed:
            rd.commit_checkpoint(number, keep=config.run.keep_checkpoints)
            actions.append(f"promoted the pending checkpoint of round {number}: its ledger line was written, "
                           "so the round was released")
        else:
            rd.pending_path(number).unlink()
            actions.append(f"deleted the pending checkpoint of round {number}: it has no ledger line, so nothing "
                           "of the round was released or spent; the round runs again")
    checkpoints = rd.checkpoint_rounds()
    last_checkpoint = checkpoints[-1] if checkpoints else 0
    last_release = released[-1] if released else 0
    if last_release > last_checkpoint:
        raise RunError(f"{rd.ledger_path} records the release of round {last_release}, but {rd.checkpoints} holds "
                       f"no checkpoint of it (newest: {last_checkpoint or 'none'}); the checkpoint was deleted, "
                       "so the run cannot continue from what it released")
    if last_checkpoint > last_release:
        raise RunError(f"{rd.checkpoint_path(last_checkpoint)} has no line in {rd.ledger_path} (newest release: "
                       f"{last_release or 'none'}); the ledger was truncated or edited, so its spend cannot be "
                       "trusted: restore it from a backup")
    checkpoint = rd.load_checkpoint(last_checkpoint) if last_checkpoint else None
    if checkpoint is not None and checkpoint.run_id and checkpoint.run_id != run_id:
        raise RunError(f"{checkpoint.path} belongs to run {checkpoint.run_id}, not {run_id} (run.json)")
    if _repair_metrics_tail(rd):
        actions.append("dropped a half-written last line of metrics.jsonl")
    try:
        metrics = rd.read_metrics()
    except ValueError as exc:
        raise RunError(f"{rd.metrics_path} is not valid JSON lines ({exc}); it was edited") from None
    ended = {int(m["round"]): m for m in metrics if m.get("status") != "interrupted" and "round" in m}
    recovered: dict[str, Any] | None = None
    if checkpoint is not None and last_checkpoint not in ended:
        recovered = {**(checkpoint.record or {"round": last_checkpoint, "status": "ok"}),
                     "epsilon": ledger[-1].get("epsilon"), "seconds": None,
                     "recovered": "the server stopped before writing this line; restored from the round's checkpoint"}
        actions.append(f"wrote the metrics line of round {last_checkpoint} from its checkpoint")
        ended[last_checkpoint] = recovered
    last_ended = max(ended, default=0)
    next_round = max(last_ended, last_checkpoint) + 1
    if next_round > config.run.rounds:
        raise RunError(f"run {run_id} in {rd.path} is complete: all {config.run.rounds} rounds ended; there is "
                       f"nothing to resume (secure-fl audit {rd.path} writes its report again)")
    earlier = [ended[r] for r in sorted(ended)]
    return ResumePlan(
        run_dir=rd.path, run_id=run_id, config=config, next_round=next_round, checkpoint=checkpoint,
        earlier=earlier, recovered_record=recovered, actions=actions,
        previous_resumes=len(info.get(RESUMES_KEY, [])),
    )


def _repair_metrics_tail(rd: RunDirectory) -> bool:
    """End an unterminated last line of ``metrics.jsonl``; truncate it away if it is half-written.

    True if a half-written line was dropped (the server was killed while appending it).
    """
    if not rd.metrics_path.exists():
        return False
    lines = rd.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
    if not lines or lines[-1].endswith("\n"):
        return False
    try:
        json.loads(lines[-1])
    except ValueError:
        with rd.metrics_path.open("r+", encoding="utf-8") as handle:
            handle.truncate(len("".join(lines[:-1]).encode("utf-8")))
        return True
    with rd.metrics_path.open("a", encoding="utf-8") as handle:  # whole but unterminated: end it
        handle.write("\n")
    return False
