"""The round engine: select a cohort -> send the global adapter -> collect updates until all
arrived or the deadline passed -> aggregate -> privacy ledger line -> checkpoint and adapter
(the release) -> evaluate -> metrics line; at the end, the privacy audit report.

`FederatedServer` builds everything a run needs from a `Config`
(model, stages, coordinator, run directory) and runs the rounds; a transport (gRPC or in-process)
delivers the clients' messages to its `FederatedServer.coordinator`. Stragglers are dropped
from a round when its deadline passes, never waited for forever.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from privacy.accounting import create_accountant
from privacy.ledger import PrivacyLedger, ReleaseAccounting, epsilon_from_json
from protocols.wire import serde
from secure_fl.config import Config
from secure_fl.data import TextDataset
from secure_fl.data import load_text_file
from secure_fl.data.sources import load_splits
from secure_fl.errors import ConfigError, RunError
from secure_fl.models import load_trainable_state, model_fingerprint, model_info, trainable_state
from secure_fl.server.checkpoint import Checkpoint, restore
from secure_fl.server.coordinator import Coordinator, RoundState
from secure_fl.server.pipeline import AggregationOutcome, ServerPipeline, Stages
from secure_fl.server.rundir import RunDirectory
from secure_fl.tensors import Layout
from secure_fl.workload import TextClassification, Workload

log = logging.getLogger(__name__)


class RoundObserver(Protocol):
    """Hooks the engine calls as a round progresses (progress bars, user callbacks)."""

    def on_round_start(self, round_number: int, cohort: Sequence[str]) -> None: ...

    def on_update(self, client_id: str, round_number: int) -> None: ...

    def on_round_end(self, record: dict[str, Any]) -> bool | None: ...


class SilentObserver:
    """An observer that does nothing."""

    def on_round_start(self, round_number: int, cohort: Sequence[str]) -> None:
        """Do nothing."""

    def on_update(self, client_id: str, round_number: int) -> None:
        """Do nothing."""

    def on_round_end(self, record: dict[str, Any]) -> bool | None:
        """Do nothing."""
        return None


@dataclass
class RunResult:
    """What a finished run produced."""

    run_id: str
    run_dir: Path
    metrics: list[dict[str, Any]]
    adapter_dir: Path
    global_state: dict[str, np.ndarray] = field(repr=False)
    report_json: Path | None = None
    report_html: Path | None = None
    #: ``True`` when a callback's ``on_round_end`` returned ``True`` before ``run.rounds`` rounds ran.
    stopped_early: bool = False
    #: Why the run ended before ``run.rounds`` (e.g. "stopped early by a callback after round 2 of 5"), else ``None``.
    stop_reason: str | None = None

    @property
    def ledger_path(self) -> Path:
        """The run's privacy ledger (``ledger.jsonl``)."""
        return self.run_dir / "ledger.jsonl"

    @property
    def ledger(self) -> list[dict[str, Any]]:
        """Every privacy-ledger line: one per released round (epsilon ``None`` means unbounded)."""
        return PrivacyLedger(self.ledger_path).entries()

    @property
    def report(self) -> dict[str, Any] | None:
        """The privacy audit report as a dict, or ``None`` if it was not written."""
        if self.report_json is None or not self.report_json.exists():
            return None
        data: dict[str, Any] = json.loads(self.report_json.read_text(encoding="utf-8"))
        return data

    @property
    def epsilon(self) -> dict[str, float]:
        """Final epsilon per accountant at the configured delta (``math.inf``: no guarantee)."""
        entries = self.ledger
        return {k: epsilon_from_json(v) for k, v in entries[-1]["epsilon"].items()} if entries else {}

    @property
    def final_accuracy(self) -> float | None:
        """Accuracy after the last successful round, if evaluated."""
        for record in reversed(self.metrics):
            if record.get("accuracy") is not None:
                return float(record["accuracy"])
        return None


def new_run_id() -> str:
    """A fresh run id: UTC time plus random hex, unique across servers."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def load_eval_set(config: Config) -> tuple[tuple[str, ...], TextDataset | None]:
    """Label names and the server's held-out evaluation set (``None`` if the server has no data).

    With ``data.dataset = 'file'``, a configured ``data.test_path`` must exist: a mistyped one
    would otherwise silently turn evaluation off. Without it, the server evaluates on a split of
    ``data.path``; a server that does not hold that file (the parties keep their data) runs
    without evaluation when ``data.label_names`` is set, with a warning naming the path, and is
    refused with the missing path named when it is not.
    """
    data = config.data
    if data.dataset == "file":
        if data.test_path:
            if not Path(data.test_path).is_file():
                raise ConfigError(
                    f"data.test_path: the server's test file {data.test_path!r} does not exist (relative paths are "
                    f"read from {Path.cwd()}); fix the path, or remove data.test_path", key="data.test_path",
                )
            test = load_text_file(
                data.test_path, text_column=data.text_column, label_column=data.label_column,
                label_names=data.label_names or None,
            )
            return (data.label_names or test.label_names), test
        if not Path(data.path).is_file():
            if not data.label_names:
                raise ConfigError(
                    f"data.path: file {data.path!r} does not exist (relative paths are read from {Path.cwd()}); "
                    "a server that holds no data file needs data.label_names instead", key="data.path",
                )
            log.warning(
                "data.path %r does not exist here: the server has no evaluation data and reports accuracy null "
                "(set data.test_path to evaluate)", data.path,
            )
            return data.label_names, None
    _, test = load_splits(config)
    return test.label_names, test


class FederatedServer:
    """Owns the global adapter and runs the rounds of one federated run."""

    def __init__(
        self,
        config: Config,
        out_dir: str | Path,
        *,
        run_id: str | None = None,
        observer: RoundObserver | None = None,
        workload: Workload | None = None,
        eval_dataset: Any | None = None,
        transport: str = "grpc",
    ) -> None:
        self.config = config
        self.run_id = run_id or new_run_id()
        self.observer: RoundObserver = observer or SilentObserver()
        self.run_dir = RunDirectory(out_dir)
        if self.run_dir.holds_run():
            raise RunError(
                f"{self.run_dir.path} already holds a run (metrics.jsonl / ledger.jsonl); choose a new output "
                "directory: two runs never share one privacy ledger"
            )
        self.stages = Stages.from_config(config)
        #: Draws each round's cohort; saved with every checkpoint so a resumed run draws the same cohorts.
        self.rng = np.random.default_rng(config.run.seed)
        self.run_dir.write_config(config)
        self.run_dir.write_run_info({
            "schema": "secure-fl/run/v1",
            "run_id": self.run_id,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "transport": transport,
            "stages": self.stages.describe(),
        })
        self.accounting = ReleaseAccounting(
            PrivacyLedger(self.run_dir.ledger_path),
            {name: create_accountant(name) for name in config.privacy.accountants},
            delta=config.privacy.delta,
        )
        if workload is None:
            label_names, eval_set = load_eval_set(config)
            workload = TextClassification(config.model, config.peft, label_names)
            eval_dataset = eval_set if eval_dataset is None else eval_dataset
        self.workload = workload
        self.adapted = workload.build(seed=config.run.seed)
        self.eval_data = workload.prepare(self.adapted, eval_dataset) if eval_dataset is not None else None
        self.global_state = trainable_state(self.adapted.model)
        update_keys = self.stages.rule.update_keys(self.adapted.trainable_names)
        self.pipeline = ServerPipeline(self.stages, Layout.of({k: self.global_state[k] for k in update_keys}))
        self.coordinator = Coordinator(
            run_id=self.run_id,
            model_fingerprint=model_fingerprint(self.adapted.model),
            payload_spec=self.pipeline.payload_spec(),
            stages=self.stages.names(),
            max_update_bytes=config.transport.max_update_bytes,
            chunk_size=config.transport.chunk_size,
            poll_interval=config.transport.poll_interval,
            on_update=self.observer.on_update,
            max_clients=config.run.num_clients,
            max_weight=config.run.max_weight,
            liveness_timeout=config.transport.liveness_timeout,
            model_info=model_info(self.adapted.model),
            stage_fingerprints=self.stages.fingerprint(),
        )

    def plan(self) -> dict[str, float]:
        """The training plan every client receives with its task."""
        c = self.config.client
        return {
            "local_steps": c.local_steps,
            "batch_size": c.batch_size,
            "lr": c.lr,
            "weight_decay": c.weight_decay,
            "max_grad_norm": c.max_grad_norm,
        }

    def evaluate(self, state: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics of the global adapter ``state`` on the server's held-out set."""
        if self.eval_data is None:
            return {}
        load_trainable_state(self.adapted.model, state)
        return self.workload.evaluate(self.adapted.model, self.eval_data, batch_size=self.config.client.eval_batch_size)

    def run(self) -> RunResult:
        """Run every round, tell the clients the run is finished, and write the audit report.

        The report is written even when the run fails, so whatever was released is on record.
        """
        try:
            records = self._run_rounds()
        except BaseException as exc:
            self.coordinator.finish(f"server stopped: {exc}")
            self._write_report_after_failure()
            raise
        stopped = len(records) < self.config.run.rounds
        stop_reason = f"stopped early by a callback after round {len(records)} of {self.config.run.rounds}" if stopped else None
        self.coordinator.finish(f"run {'stopped early by a callback' if stopped else 'complete'} after {len(records)} rounds")
        from secure_fl.audit import audit

        report = audit(self.run_dir.path)
        return RunResult(
            self.run_id, self.run_dir.path, records, self.run_dir.adapter, self.global_state,
            report_json=report.json_path, report_html=report.html_path, stopped_early=stopped, stop_reason=stop_reason,
        )

    def _write_report_after_failure(self) -> None:
        from secure_fl.audit import audit

        try:
            audit(self.run_dir.path)
        except Exception:  # the run's own error is the one to raise; this one is only logged
            logging.getLogger(__name__).exception("could not write the audit report of the failed run")

    def _run_rounds(self) -> list[dict[str, Any]]:
        run = self.config.run
        rng = self.rng
        joined = self.coordinator.wait_for_clients(run.clients_per_round, run.join_timeout)
        if len(joined) < run.min_updates:
            raise RunError(
                f"only {len(joined)} client(s) joined within run.join_timeout={run.join_timeout}s; "
                f"a round needs at least run.min_updates={run.min_updates}"
            )
        if len(joined) < run.clients_per_round:
            shortfall = (
                f"only {len(joined)} of run.clients_per_round={run.clients_per_round} clients joined within "
                f"run.join_timeout={run.join_timeout:g}s"
            )
            if run.require_full_cohort:
                raise RunError(f"{shortfall}; run.require_full_cohort = true, so the run does not start")
            log.warning("%s; running with smaller cohorts (set run.require_full_cohort = true to refuse)", shortfall)
        self._save_adapter()
        records: list[dict[str, Any]] = []
        for number in range(1, run.rounds + 1):
            record, stop = self._round(number, rng)
            records.append(record)
            if stop:
                break
        return records

    def _round(self, number: int, rng: np.random.Generator) -> tuple[dict[str, Any], bool]:
        run = self.config.run
        if self.coordinator.finished:
            self._mark_interrupted()
            raise RunInterrupted(f"run stopped before round {number}")
        available, unresponsive = self.coordinator.selectable_clients()
        if len(available) < run.min_updates:
            self.coordinator.wait_for_clients(run.min_updates, run.join_timeout)
            available, unresponsive = self.coordinator.selectable_clients()
            if len(available) < run.min_updates:
                raise RunError(
                    f"round {number}: only {len(available)} responsive client(s) connected "
                    f"({len(unresponsive)} silent); need run.min_updates={run.min_updates}"
                )
        size = min(run.clients_per_round, len(available))
        cohort = sorted(str(c) for c in rng.choice(available, size=size, replace=False))
        manifest, payload = serde.pack_tensors(self.global_state)
        started = time.perf_counter()
        self.observer.on_round_start(number, cohort)
        self.coordinator.open_round(number, cohort, manifest, payload, self.plan(), run.round_timeout)
        state = self.coordinator.wait_round()
        if state.interrupted is not None:
            self._record_interrupted(number, cohort, state, started)
            raise RunInterrupted(f"round {number} was interrupted ({state.interrupted}); nothing of it was released")
        received = [state.received[c] for c in sorted(state.received)]
        dropped = sorted(set(cohort) - set(state.received))
        record: dict[str, Any] = {
            "round": number,
            "status": "ok",
            "clients": len(received),
            "cohort": len(cohort),
            "cohort_target": run.clients_per_round,
            "selected": cohort,
            "dropped": dropped,
            "unresponsive": unresponsive,
            "accuracy": None,
            "loss": None,
            "train_loss": _weighted_mean(
                [(m.get("train_loss"), state.received[c].weight) for c, m in state.client_metrics.items()]
            ),
            "bytes_up": state.bytes_up,
            "bytes_down": state.bytes_down,
            "stages": self.stages.names(),
            **_federated_evaluation(state.client_metrics),
        }
        outcome: AggregationOutcome | None = None
        if len(received) < run.min_updates:
            record["status"] = "failed"
            record["reason"] = f"{len(received)} update(s) before the deadline; run.min_updates={run.min_updates}"
        else:
            outcome = self.pipeline.aggregate(self.global_state, received)
            problem = _non_finite(outcome.state)
            if problem is not None:
                record["status"] = "failed"
                record["reason"] = f"the aggregated global adapter is not finite ({problem}); nothing was released"
                log.error("round %d: %s", number, record["reason"])
                outcome = None
        if outcome is not None:
            event = self.stages.privacy.privacy_event(
                cohort_size=len(cohort), population=len(available), contributions=len(received)
            )
            # The ledger line is fsynced before anything derived from the new state leaves the
            # server (checkpoint, adapter directory, next round's task).
            entry = self.accounting.record(
                round=number,
                event=event,
                mechanism=self.stages.privacy.describe(),
                details={
                    "run_id": self.run_id,
                    "cohort": cohort,
                    "contributors": sorted(state.received),
                    "dropouts": dropped,
                    "excluded": list(outcome.excluded),
                },
            )
            self.global_state = outcome.state
            record["excluded"] = list(outcome.excluded)
            record["epsilon"] = entry["epsilon"]
            record.update(outcome.info)
            self.run_dir.save_checkpoint(
                number, self.global_state, run_id=self.run_id, keep=run.keep_checkpoints,
                plugin_state=self.stages.state_dict(), rng_state=rng.bit_generator.state,
            )
            self._save_adapter()
            record.update(self.evaluate(self.global_state))
        record["seconds"] = round(time.perf_counter() - started, 3)
        self.run_dir.append_metrics(record)
        stop = self.observer.on_round_end(record) is True
        return record, stop

    def _record_interrupted(self, number: int, cohort: Sequence[str], state: RoundState, started: float) -> None:
        """Write the metrics line of a round cut short; nothing derived from it is released."""
        record: dict[str, Any] = {
            "round": number,
            "status": "interrupted",
            "reason": f"run stopped while the round was open: {state.interrupted}",
            "clients": 0,
            "cohort": len(cohort),
            "selected": list(cohort),
            "updates_discarded": len(state.received),
            "dropped": [],
            "accuracy": None,
            "loss": None,
            "bytes_up": state.bytes_up,
            "bytes_down": state.bytes_down,
            "stages": self.stages.names(),
            "seconds": round(time.perf_counter() - started, 3),
        }
        self.run_dir.append_metrics(record)
        self._mark_interrupted()

    def _mark_interrupted(self) -> None:
        """Say in ``run.json`` that the run was stopped before it completed (the report reads it)."""
        info = self.run_dir.read_run_info()
        info["interrupted"] = True
        self.run_dir.write_run_info(info)

    def _save_adapter(self) -> None:
        load_trainable_state(self.adapted.model, self.global_state)
        self.workload.save(self.adapted, self.run_dir.adapter, seed=self.config.run.seed)

    def restore_from_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``: global adapter, the stages' state and the cohort RNG.

        Only the in-memory state; resuming a run from its directory (ledger, metrics, rounds
        left) is the job of the hardening work.
        """
        self.global_state = {k: np.array(v, copy=True) for k, v in checkpoint.state.items()}
        rng = restore(self.stages, checkpoint)
        if rng is not None:
            self.rng = rng


class RunInterrupted(RunError):
    """The run was stopped while a round was open; that round released nothing."""


class BackgroundRun:
    """`FederatedServer.run` in a daemon thread, started at construction.

    `result` hands the outcome to the caller's thread: the `RunResult`, or the run's
    own exception re-raised, so a failed run is never mistaken for a finished one.
    """

    def __init__(self, server: FederatedServer, *, name: str = "secure-fl-rounds") -> None:
        self._server = server
        self._result: RunResult | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._server.run()
        except BaseException as exc:  # handed to result()
            self._error = exc

    def is_alive(self) -> bool:
        """Whether the rounds are still running."""
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the rounds to end (at most ``timeout`` seconds)."""
        self._thread.join(timeout)

    def result(self) -> RunResult:
        """The run's result; re-raises the run's exception. Call after the thread ended."""
        if self._thread.is_alive():
            raise RunError("the run is still going; join() it first")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def _federated_evaluation(client_metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """Example-weighted means of the cohort's ``eval_*`` metrics, as ``fed_eval_*`` keys.

    Clients evaluate the global adapter they received at the start of the round (the previous
    round's result) on their held-out local data, before training on it.
    """
    reports = [m for m in client_metrics.values() if m.get("eval_examples", 0) > 0]
    if not reports:
        return {}
    total = sum(m["eval_examples"] for m in reports)
    keys = sorted({k for m in reports for k in m if k.startswith("eval_") and k != "eval_examples"})
    out = {f"fed_{k}": sum(m[k] * m["eval_examples"] for m in reports if k in m) / total for k in keys}
    out["fed_eval_examples"] = float(total)
    return out


def _non_finite(state: dict[str, np.ndarray]) -> str | None:
    """The first tensor of ``state`` holding NaN or infinity, described; ``None`` if all are finite."""
    for name, value in state.items():
        array = np.asarray(value)
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            return f"tensor {name!r} holds {int((~np.isfinite(array)).sum())} NaN/infinite value(s)"
    return None


def _weighted_mean(pairs: Sequence[tuple[float | None, float]]) -> float | None:
    kept = [(v, w) for v, w in pairs if v is not None]
    if not kept:
        return None
    total = sum(w for _, w in kept)
    return float(sum(v * w for v, w in kept) / total) if total > 0 else None
