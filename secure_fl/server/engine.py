"""The round engine: select a cohort -> send the global adapter -> collect updates until all
arrived or the deadline passed -> aggregate -> privacy ledger line -> checkpoint and adapter
(the release) -> evaluate -> metrics line; at the end, the privacy audit report.

`FederatedServer` builds everything a run needs from a `Config`
(model, stages, coordinator, run directory) and runs the rounds; a transport (gRPC or in-process)
delivers the clients' messages to its `FederatedServer.coordinator`. Stragglers are dropped
from a round when its deadline passes, never waited for forever.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from privacy.accounting import create_accountant
from privacy.ledger import PrivacyLedger, ReleaseAccounting
from protocols.wire import serde
from protocols.wire.serde import TensorSpec
from secure_fl.budget import BudgetGuard, SamplingPlan, confirm_calibration, poisson_cohort, skip_probability
from secure_fl.config import Config
from secure_fl.client.trainer import check_dp_sgd
from secure_fl.data.sources import load_eval_set
from secure_fl.device import on_device, resolve_device
from secure_fl.errors import ConfigError, RunError
from secure_fl.models import load_trainable_state, model_info, trainable_state
from secure_fl.peft_agg.hooks import (
    MERGES_PLAN_KEY, build_for_rule, merged_base_state, own_shapes, restore_merged_base, rule_fingerprint, sync_base,
)
from protocols.errors import ProtocolAbort
from robustness.errors import RobustnessError
from protocols.secagg import BucketSum, Phase, PhaseResult, RoundContext
from secure_fl.server.checkpoint import Checkpoint, restore
from secure_fl.server.coordinator import Coordinator
from secure_fl.server.faults import crash_point
from secure_fl.server.resume import RESUMES_KEY, ResumePlan
from secure_fl.server.rounds import RoundState
from secure_fl.server.pipeline import AggregationOutcome, ServerPipeline, Stages
from secure_fl.server.results import (
    BackgroundRun, RoundObserver, RunInterrupted, RunResult, SilentObserver, new_run_id,
)
from secure_fl.server.robust import build_reputation, check_defense_rows, restore_reputation
from secure_fl.server.rundir import RunDirectory
from secure_fl.tensors import Layout
from secure_fl.workload import Workload, config_workload

log = logging.getLogger(__name__)

__all__ = [
    "BackgroundRun", "FederatedServer", "RoundObserver", "RunInterrupted", "RunResult", "SilentObserver",
    "load_eval_set", "new_run_id",
]  # fmt: skip


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
        resume: ResumePlan | None = None,
    ) -> None:
        self.config = config
        #: What `secure_fl.server.resume.recover` found when this server continues a killed run, else ``None``.
        self.resume = resume
        if resume is not None:
            run_id = resume.run_id
            if config.to_toml() != resume.config.to_toml():
                raise ConfigError(f"a resumed run continues with its own {Path(out_dir) / 'config.toml'}; "
                                  "the config given differs from it (resume without --config, --preset or --set)")
        self.run_id = run_id or new_run_id()
        self.observer: RoundObserver = observer or SilentObserver()
        # Stages first: a configuration no round could run under is refused before anything is written.
        if transport not in SIMULATED_TRANSPORTS and config.privacy.params.get("insecure_seed") is not None:
            raise ConfigError(
                "privacy.params.insecure_seed is accepted only in simulation (secure-fl simulate or "
                "secure_fl.simulate): a seeded noise generator lets anyone who knows the seed remove the noise, "
                f"so a {transport} server refuses it; remove privacy.params.insecure_seed",
                key="privacy.params.insecure_seed",
            )
        if transport not in SIMULATED_TRANSPORTS and config.attack.kind != "none":
            raise ConfigError(
                f"attack.kind={config.attack.kind!r}: simulated attacks run only in simulation (secure-fl simulate or "
                f"secure_fl.simulate); a {transport} server never builds one; set attack.kind = 'none'",
                key="attack.kind",
            )
        self.stages = Stages.from_config(config)
        #: Where `evaluate` runs (``run.device``); a CUDA setting without a visible GPU is refused here.
        self.device = resolve_device(config.run.device)
        self.sampling = SamplingPlan.from_config(config)
        expected = min(config.run.clients_per_round, config.run.num_clients)
        if self.sampling.mode == "poisson":
            expected = max(1, round(self.sampling.expected_cohort))
        try:
            self.stages.secure.check_cohort(expected)
        except ValueError as exc:
            what = (f"the expected Poisson cohort {expected} (q = {self.sampling.sample_rate:g})"
                    if self.sampling.mode == "poisson" else f"run.clients_per_round={config.run.clients_per_round}")
            raise ConfigError(f"[secure] with {what}: {exc}", key="secure.params") from None
        #: Per-round chance that a Poisson cohort is too small to run (skipped rounds; see `secure_fl.budget`).
        self.skip_probability = 0.0
        self._expected_cohort = expected
        self.run_dir = RunDirectory(out_dir)
        if resume is None and self.run_dir.holds_run():
            raise RunError(
                f"{self.run_dir.path} already holds a run (metrics.jsonl / ledger.jsonl); choose a new output "
                "directory: two runs never share one privacy ledger"
            )
        #: Draws each round's cohort; saved with every checkpoint so a resumed run draws the same cohorts.
        self.rng = np.random.default_rng(config.run.seed)
        #: The first round `run` runs (later than 1 for a resumed run).
        self.first_round = 1
        if resume is None:
            self.run_dir.write_config(config)
            info: dict[str, Any] = {
                "schema": "secure-fl/run/v1",
                "run_id": self.run_id,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "transport": transport,
            }
        else:  # keep what the first start wrote (start time, transport security so far)
            info = {**self.run_dir.read_run_info(), "interrupted": False}
        self.run_dir.write_run_info({
            **info,
            "stages": self.stages.describe(),
            "sampling": {**self.sampling.describe(), "min_cohort": run_min_cohort(config)},
            "budget": self._budget_info(),
        })
        self.accounting = ReleaseAccounting(
            PrivacyLedger(self.run_dir.ledger_path),
            {name: create_accountant(name) for name in config.privacy.accountants},
            delta=config.privacy.delta,
        )
        self.budget = BudgetGuard(
            config.privacy.accountants[0], delta=config.privacy.delta,
            target_epsilon=config.privacy.target_epsilon, client_target_epsilon=config.privacy.client_target_epsilon,
        )
        self.budget.replay(self.accounting.ledger.entries())
        #: Why the run ended before ``run.rounds`` (a budget), once it did.
        self.stop_reason: str | None = None
        calibration = self.stages.calibration
        planned = calibration.planned_epsilon if calibration is not None else None
        if calibration is not None and planned is not None and planned > calibration.target_epsilon:
            log.warning(
                "privacy.params.noise_multiplier = %g: the %d planned round(s) would spend epsilon %.4g > "
                "privacy.target_epsilon = %g (%s); the run stops before the round that would pass it "
                "(leave noise_multiplier unset to calibrate it to the target)",
                calibration.noise_multiplier, calibration.rounds, calibration.planned_epsilon,
                calibration.target_epsilon, calibration.accountant,
            )
        if workload is None:
            label_names, eval_set = load_eval_set(config)
            workload = config_workload(config, label_names)
            eval_dataset = eval_set if eval_dataset is None else eval_dataset
        self.workload = workload
        self.adapted = build_for_rule(workload, self.stages.rule, seed=config.run.seed)
        self.eval_data = workload.prepare(self.adapted, eval_dataset) if eval_dataset is not None else None
        #: The raw held-out set (a simulated attack derives its trigger set from it).
        self.eval_dataset = eval_dataset
        #: Simulation only: metric name -> prepared held-out data whose accuracy `evaluate` also reports
        #: (``backdoor_accuracy`` on a backdoor's trigger set); a deployed server has none.
        self.attack_evaluations: dict[str, Any] = {}
        if self.stages.sample_level is not None:  # refuse a model opacus cannot wrap before any round
            check_dp_sgd(self.stages.sample_level, workload, self.adapted, self.eval_data)
        self.global_state = trainable_state(self.adapted.model)
        update_keys = self.stages.rule.update_keys(self.adapted.trainable_names)
        # Client-level DP releases sum / m for the planned cohort m (public), not sum / n.
        planned = min(config.run.clients_per_round, config.run.num_clients)
        if self.sampling.mode == "poisson":  # q N: the expected cohort, fixed before any draw
            planned = self.sampling.expected_cohort
        #: RFFL reputations (``[robustness] reputation``), saved to ``reputation.json`` every released round.
        self.reputation = build_reputation(config)
        self.pipeline = ServerPipeline(
            self.stages, Layout.of({k: self.global_state[k] for k in update_keys}),
            expected_contributions=float(planned) if self.stages.privacy.uniform_weights else None,
            bucket_size=config.secure.bucket_size, reputation=self.reputation,
        )
        check_defense_rows(self.stages, self.pipeline, config, self._expected_cohort)
        if getattr(self.stages.privacy, "client_noise", False):  # distributed DP: noise and headroom depend on d
            self.stages.bind_update(num_values=self.pipeline.layout.size, cohort_size=self._expected_cohort)
            self.stages.calibration = confirm_calibration(self.stages.calibration, self.stages.privacy)
        if self.stages.rule.integer_message and not self.stages.secure.reveals_individual_updates:
            try:  # exact integer sums (votes): refuse buckets whose integer plan needs more than 32-bit words
                self._check_secure(self._expected_cohort)
            except ValueError as exc:
                raise ConfigError(f"[secure] with peft.rule={config.peft.rule!r}: {exc}", key="secure.bucket_size") from None
        if self.sampling.mode == "poisson":
            self.skip_probability = skip_probability(config.run.num_clients, self.sampling.sample_rate, self._runnable)
            self._check_secure(self._expected_cohort)  # the scan above re-planned the buckets; plan the expected cohort
        info = self.run_dir.read_run_info()
        self.run_dir.write_run_info({**info, "stages": self.stages.describe(), "budget": self._budget_info(),
                                     "sampling": {**info["sampling"], "skip_probability": self.skip_probability}})
        self.coordinator = Coordinator(
            run_id=self.run_id,
            model_fingerprint=rule_fingerprint(self.adapted.model, self.stages.rule),
            stages=self.stages.names(),
            max_update_bytes=config.transport.max_update_bytes,
            chunk_size=config.transport.chunk_size,
            poll_interval=config.transport.poll_interval,
            on_update=self.observer.on_update,
            weights_in_clear=self.stages.secure.reveals_individual_updates,
            max_clients=config.run.num_clients,
            max_weight=config.run.max_weight,
            liveness_timeout=config.transport.liveness_timeout,
            max_chunks=config.transport.max_chunks,
            max_inflight_bytes=config.transport.max_inflight_bytes,
            max_silent_parties=config.transport.max_silent_parties,
            model_info=model_info(self.adapted.model),
            spec_for=self._client_payload_spec if own_shapes(self.stages.rule) else None,
            # plaintext uploads are checked by the rule as they arrive (rank votes: permutations)
            validate_update=self.stages.rule.validate_update if self.stages.secure.reveals_individual_updates else None,
            stage_fingerprints=self.stages.fingerprint(),
            sample_level=self.stages.sample_level is not None,
        )
        #: Global adapters released so far (the ones a merging rule folds into the base).
        self.releases = 0
        if self.stages.rule.accepts_client_shapes and not self.stages.secure.reveals_individual_updates:
            raise ConfigError(
                f"peft.rule={config.peft.rule!r} accepts per-client shapes and pads each upload on the server, "
                f"but secure.mode={config.secure.mode!r} only reveals sums; use secure.mode='plain'",
                key="peft.rule",
            )
        #: Metrics records of rounds that ended before a resume (empty for a new run).
        self._earlier: list[dict[str, Any]] = []
        if resume is not None:
            self._continue(resume)

    def _continue(self, plan: ResumePlan) -> None:
        """Load a killed run's last release and plan (see `secure_fl.server.resume`)."""
        if plan.checkpoint is not None:
            self.restore_from_checkpoint(plan.checkpoint, run_dir=self.run_dir.path)
            if not self.stages.rule.merges_into_base:
                self.releases = self.accounting.releases
        # An independent stream on every resume: the re-run round draws a new cohort and new buckets.
        bits = np.random.PCG64()  # default_rng's generator (the checkpoint saved its state)
        bits.state = self.rng.bit_generator.state  # type: ignore[assignment]
        self.rng = np.random.Generator(bits.jumped(plan.previous_resumes + 1))
        if plan.recovered_record is not None:
            self.run_dir.append_metrics(plan.recovered_record)
        unconfirmed = self.accounting.ledger.verify(metrics=self.run_dir.read_metrics(), delta=self.config.privacy.delta)
        if unconfirmed:
            raise RunError(f"{self.run_dir.ledger_path}: round(s) {unconfirmed} have ledger lines but no metrics record "
                           "after recovery; the run directory was edited")
        self.first_round = plan.next_round
        self._earlier = list(plan.earlier)
        self.run_dir.append_run_event(RESUMES_KEY, plan.describe())
        for action in plan.actions:
            log.warning("resume: %s", action)
        log.warning("resuming run %s at round %d of %d (last release: round %s)", self.run_id, plan.next_round,
                    self.config.run.rounds, plan.checkpoint.round if plan.checkpoint is not None else "none")

    def _client_payload_spec(self, client_id: str, info: Mapping[str, str]) -> dict[str, TensorSpec] | None:
        """The upload specs of one client, from what it declared at Join (rules with per-client shapes).

        ``None`` (the global specs) for a rule whose clients pad their own uploads; `client_spec`
        may still refuse the client.
        """
        spec = self.stages.rule.client_spec(info, self.pipeline.layout.specs())
        if self.stages.rule.aligns_on_client:
            return None
        return self.pipeline.payload_spec() if spec is None else self.stages.secure.payload_spec(spec)

    def start_state(self) -> dict[str, np.ndarray]:
        """What this round's updates apply to: the global adapter, after a merging rule folded it into the base."""
        return sync_base(self.stages.rule, self.adapted, self.global_state, merges=self.releases)

    def plan(self) -> dict[str, float]:
        """The training plan every client receives with its task."""
        c = self.config.client
        plan = {
            "local_steps": c.local_steps,
            "batch_size": c.batch_size,
            "lr": c.lr,
            "weight_decay": c.weight_decay,
            "max_grad_norm": c.max_grad_norm,
        }
        if self.stages.rule.merges_into_base:  # clients fold the same releases into their base
            plan[MERGES_PLAN_KEY] = float(self.releases)
        plan.update(self.stages.privacy.round_plan())  # adaptive clipping: this round's clip norm
        return plan

    def _unevaluated(self) -> dict[str, None]:
        """The workload's metrics, all ``null``: a round record lists them before (or without) evaluation."""
        return dict.fromkeys(self.workload.metric_names)

    def evaluate(self, state: dict[str, np.ndarray]) -> dict[str, float]:
        """Metrics of the global adapter ``state`` on the server's held-out set, computed on ``run.device``."""
        if self.eval_data is None:
            return {}
        load_trainable_state(self.adapted.model, state)
        size = self.config.client.eval_batch_size
        with on_device(self.adapted.model, self.device) as model:
            metrics = self.workload.evaluate(model, self.eval_data, batch_size=size)
            for key, data in self.attack_evaluations.items():
                metrics[key] = self.workload.evaluate(model, data, batch_size=size)["accuracy"]
        return metrics

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
        stop_reason = self.stop_reason or (
            f"stopped early by a callback after round {len(records)} of {self.config.run.rounds}" if stopped else None
        )
        if self.stop_reason:
            self.coordinator.finish(f"run stopped after {len(records)} rounds: {self.stop_reason}")
        else:
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
        records: list[dict[str, Any]] = list(self._earlier)
        for number in range(self.first_round, run.rounds + 1):
            try:
                record, stop = self._round(number, rng)
            except _BudgetStop as exc:
                self._record_stop(number, str(exc), exc.cause)
                break
            records.append(record)
            if stop:
                break
        return records

    def _budget_info(self) -> dict[str, Any]:
        """The budget settings for ``run.json`` (the report's budget line reads them)."""
        privacy = self.config.privacy
        calibration = self.stages.calibration
        return {
            "accountant": privacy.accountants[0],
            "target_epsilon": privacy.target_epsilon or None,
            "client_target_epsilon": privacy.client_target_epsilon or None,
            "delta": privacy.delta,
            "calibration": calibration.describe() if calibration is not None else None,
        }

    def _record_stop(self, number: int, reason: str, cause: str) -> None:
        """Say in ``run.json`` why the run stopped before round ``number`` (nothing of it ran)."""
        log.warning("%s", reason)
        self.stop_reason = reason
        info = self.run_dir.read_run_info()
        info["stopped"] = {"round": number, "cause": cause, "reason": reason}
        self.run_dir.write_run_info(info)

    def _runnable(self, size: int) -> bool:
        """Whether a cohort of ``size`` may run: at least the smallest cohort and accepted by the secure mode."""
        if size < run_min_cohort(self.config):
            return False
        try:
            self._check_secure(size)
        except ValueError:
            return False
        return True

    def _check_secure(self, size: int) -> None:
        """The secure mode's `check_cohort` for a cohort of ``size`` (with the update size when clients add noise)."""
        integer = self.stages.rule.integer_message and not self.stages.secure.reveals_individual_updates
        if getattr(self.stages.privacy, "client_noise", False) or integer:
            self.stages.secure.check_cohort(size, num_values=self.pipeline.layout.size)  # type: ignore[call-arg]
        else:
            self.stages.secure.check_cohort(size)

    def _next_event(self, population: int) -> Any:
        """The run-level event the next release would cost (before its cohort is drawn)."""
        expected = max(1, round(self.sampling.expected_cohort))
        return privacy_event(self.stages.privacy, cohort_size=expected, population=max(population, 1),
                             contributions=expected, sample_rate=self.sampling.sample_rate)

    def _select(self, number: int, available: Sequence[str], rng: np.random.Generator) -> tuple[list[str], str | None]:
        """The round's cohort, and why it cannot run (a Poisson cohort too small), else ``None``.

        Raises `_BudgetStop` when the next release would pass ``privacy.target_epsilon``, or
        fewer than ``run.min_updates`` clients are within ``privacy.client_target_epsilon``.
        """
        run = self.config.run
        event = self._next_event(len(available))
        reason = self.budget.run_stop(self.accounting.accountants[self.budget.accountant], event, number)
        if reason is not None:
            raise _BudgetStop(reason, "target_epsilon")
        eligible = self.budget.eligible(list(available), event)
        if len(eligible) < run.min_updates:
            raise _BudgetStop(
                f"stopped at round {number}: only {len(eligible)} of {len(available)} connected client(s) are within "
                f"privacy.client_target_epsilon = {self.config.privacy.client_target_epsilon:g} after one more release; "
                f"a round needs run.min_updates = {run.min_updates}; round {number} was not run", "client_target_epsilon",
            )
        if self.sampling.mode == "poisson":
            cohort = poisson_cohort(eligible, self.sampling.sample_rate)
            if not self._runnable(len(cohort)):
                return cohort, (f"the Poisson cohort has {len(cohort)} client(s), fewer than a round needs "
                                f"({run_min_cohort(self.config)}, or the secure mode's buckets refuse it)")
            self._check_secure(len(cohort))  # plan this round's buckets
            return cohort, None
        if self.reputation is not None:
            eligible = [c for c in eligible if not self.reputation.is_removed(c)]
            if len(eligible) < run.min_updates:
                raise RunError(
                    f"round {number}: only {len(eligible)} connected client(s) are left after the reputation "
                    f"removed {len(self.reputation.removed)}; need run.min_updates={run.min_updates}"
                )
        size = min(run.clients_per_round, len(eligible))
        return sorted(str(c) for c in rng.choice(eligible, size=size, replace=False)), None

    def _record_skipped(self, number: int, cohort: Sequence[str], reason: str, unresponsive: Sequence[str]) -> dict[str, Any]:
        """Write the metrics line of a round whose Poisson cohort was too small; nothing ran or was released."""
        record: dict[str, Any] = {
            "round": number, "status": "skipped", "reason": reason, "clients": 0, "cohort": len(cohort),
            "selected": list(cohort), "dropped": [], "unresponsive": list(unresponsive),
            **self._unevaluated(), "bytes_up": 0, "bytes_down": 0, "stages": self.stages.names(), "seconds": 0.0,
        }
        log.warning("round %d skipped: %s", number, reason)
        self.run_dir.append_metrics(record)
        return record

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
        cohort, skip = self._select(number, available, rng)
        if skip is not None:
            skipped = self._record_skipped(number, cohort, skip, unresponsive)
            return skipped, self.observer.on_round_end(skipped) is True
        rates = self.coordinator.sample_rates(cohort) if self.stages.sample_level is not None else {}
        start = self.start_state()
        manifest, payload = serde.pack_tensors(self.global_state)
        started = time.perf_counter()
        self.observer.on_round_start(number, cohort)
        state, buckets, abort, refused = self._run_phases(number, cohort, manifest, payload, rng)
        if state.interrupted is not None:
            self._record_interrupted(number, cohort, state, started, self._sample_level(rates, [], state))
            raise RunInterrupted(f"round {number} was interrupted ({state.interrupted}); nothing of it was released")
        contributors = sorted({member for bucket in buckets for member in bucket.members})
        dropped = sorted(set(cohort) - set(contributors))
        sample_level = self._sample_level(rates, contributors, state)
        uploads, client_metrics = state.received, state.client_metrics
        record: dict[str, Any] = {
            "round": number,
            "status": "ok",
            "clients": len(contributors),
            "cohort": len(cohort),
            "cohort_target": run.clients_per_round if self.sampling.mode == "fixed" else None,  # Poisson: no target size
            "selected": cohort,
            "dropped": dropped,
            "unresponsive": unresponsive,
            **self._unevaluated(),
            "train_loss": _weighted_mean([(m.get("train_loss"), uploads[c].weight) for c, m in client_metrics.items()]),
            "bytes_up": state.bytes_up,
            "bytes_down": state.bytes_down,
            "phases": [phase.summary() for phase in state.phases],
            "stages": self.stages.names(),
            **_federated_evaluation(client_metrics),
        }
        if state.drop_reasons:  # parties whose host saw them die (a Ray runner lost): a dropout, with why
            record["dropout_reasons"] = dict(sorted(state.drop_reasons.items()))
            for client, reason in sorted(state.drop_reasons.items()):
                log.warning("round %d: party %s dropped: %s", number, client, reason)
        if refused:  # answers the protocol refused (a corrupt or foreign ciphertext): named, left out of the sums
            record["refused"] = dict(sorted(refused.items()))
            for client, reason in sorted(refused.items()):
                log.warning("round %d: %s refused client %s: %s", number, self.stages.secure.name, client, reason)
        outcome: AggregationOutcome | None = None
        if abort is not None:
            record["status"] = "aborted"
            record["reason"] = f"the {self.stages.secure.name} protocol aborted the round: {abort}"
            log.warning("round %d: %s", number, record["reason"])
        elif len(contributors) < run.min_updates:
            record["status"] = "failed"
            record["reason"] = f"{len(contributors)} update(s) before the deadline; run.min_updates={run.min_updates}"
        else:
            crash_point("before-aggregation", number)
            try:
                outcome = self.pipeline.aggregate_buckets(start, buckets, num_contributions=len(contributors))
            except RobustnessError as exc:  # e.g. dropouts left fewer rows than the defense's f needs
                record["status"] = "failed"
                record["reason"] = f"robustness.defense={self.config.robustness.defense!r} refused the round: {exc}"
                log.error("round %d: %s", number, record["reason"])
                outcome = None
            problem = None if outcome is None else _non_finite(outcome.state)
            if problem is not None:
                record["status"] = "failed"
                record["reason"] = f"the aggregated global adapter is not finite ({problem}); nothing was released"
                log.error("round %d: %s", number, record["reason"])
                outcome = None
        if outcome is None:  # nothing released: publish no client losses or evaluation metrics either
            record["train_loss"] = None
            for key in [k for k in record if k.startswith("fed_eval_")]:
                del record[key]
            if sample_level:  # the server saw these DP-SGD outputs although it released nothing
                record["sample_level"] = sample_level
        else:
            event = privacy_event(
                self.stages.privacy, cohort_size=len(cohort), population=len(available),
                contributions=len(contributors), sample_rate=self.sampling.sample_rate,
            )
            details = {
                "run_id": self.run_id,
                "cohort": cohort,
                "contributors": contributors,
                "dropouts": dropped,
                "excluded": list(outcome.excluded),
                "sampling": self.sampling.mode,
                **({"noise_multiplier_calibrated": self.stages.calibration.calibrated}
                   if self.stages.calibration is not None else {}),
                **self.stages.privacy.ledger_details(),
                **({"sample_level": sample_level} if sample_level else {}),
            }
            mechanism = self.stages.privacy.describe()  # this round's parameters (C), before end_round moves them
            # Everything the release changes is computed here, in memory: the mechanism's next state
            # (adaptive clipping moves C by the noised unclipped count), the reputations and the
            # evaluation. None of it leaves the server before the ledger line is on disk.
            record.update(self.stages.privacy.end_round(
                [client_metrics.get(c, {}) for c in contributors], num_contributions=len(contributors),
                denominator=self.pipeline.expected_contributions,
            ))
            self.releases += 1
            record["excluded"] = list(outcome.excluded)
            record.update(outcome.info)
            if self.reputation is not None and outcome.scored is not None:
                record.update(self.reputation.update(*outcome.scored))
            record.update(self.evaluate(outcome.state))
            # Crash-safe release (see secure_fl.server.resume): pending checkpoint -> ledger line (the
            # release) -> committed checkpoint -> reputation, adapter, metrics. A kill before the ledger
            # line leaves a pending file a resume deletes; after it, one a resume promotes.
            self.run_dir.stage_checkpoint(
                number, outcome.state, run_id=self.run_id, plugin_state=self.stages.state_dict(),
                rng_state=rng.bit_generator.state,
                base=merged_base_state(self.adapted, self.releases) if self.stages.rule.merges_into_base else None,
                reputation=self.reputation.state_dict() if self.reputation is not None else None,
                record=record,
            )
            crash_point("before-ledger", number)
            entry = self.accounting.record(
                round=number, event=event, mechanism=mechanism, details=details,
            )
            crash_point("after-ledger", number)
            self.budget.record_release(event, contributors)
            self.global_state = outcome.state
            record["epsilon"] = entry["epsilon"]
            self.run_dir.commit_checkpoint(number, keep=run.keep_checkpoints)
            crash_point("after-checkpoint", number)
            if self.reputation is not None:
                self.run_dir.write_reputation({**self.reputation.state_dict(), "round": number, "run_id": self.run_id})
            self._save_adapter()
        record["seconds"] = round(time.perf_counter() - started, 3)
        self.run_dir.append_metrics(record)
        stop = self.observer.on_round_end(record) is True
        return record, stop

    def _run_phases(
        self, number: int, cohort: Sequence[str], manifest: Any, payload: bytes, rng: np.random.Generator
    ) -> tuple[RoundState, list[BucketSum], str | None, dict[str, str]]:
        """Run the round's phases as the protocol's server half declares them.

        Returns the round state, the bucket sums (empty if the round was aborted or interrupted),
        the protocol's abort reason, if any, and the clients whose answers it refused. The buckets
        are fixed here, when the round opens.
        """
        run = self.config.run
        secure = self.stages.secure
        context = RoundContext(
            run_id=self.run_id, round=number, cohort=tuple(cohort), buckets=secure.assign_buckets(cohort, rng),
            update_spec=self.pipeline.layout.specs(), timeout=run.round_timeout,
        )
        server_round = secure.server_round(context)
        plan = {**self.plan(), "cohort_size": float(len(cohort)), "bucket_size": float(max(len(b) for b in context.buckets))}
        state = self.coordinator.begin_round(number, cohort, manifest, payload, plan)
        abort: str | None = None
        try:
            phase: Phase | None = server_round.first_phase()
            while phase is not None and state.interrupted is None:
                self.coordinator.open_phase(phase, run.round_timeout)
                done = self.coordinator.wait_phase()
                if state.interrupted is not None:
                    break
                phase = server_round.next_phase(PhaseResult(done.phase, dict(done.received)))
        except ProtocolAbort as exc:
            abort = str(exc)
        self.coordinator.end_round()
        if abort is not None or state.interrupted is not None:
            return state, [], abort, server_round.refused
        return state, server_round.result(), None, server_round.refused

    def _sample_level(
        self, rates: Mapping[str, float], contributors: Sequence[str], state: RoundState
    ) -> dict[str, dict[str, float | int]]:
        """Client -> its DP-SGD steps of this round ``{noise_multiplier, sample_rate, steps}``, for every
        client whose DP-SGD output the server saw: the members of the sums it learned, and under a
        secure mode that reveals individual updates every upload that arrived. Empty without DP-SGD.
        """
        dp_sgd = self.stages.sample_level
        if dp_sgd is None:
            return {}
        seen = set(contributors)
        if self.stages.secure.reveals_individual_updates:
            seen |= set(state.received)
        unknown = sorted(seen - set(rates))
        if unknown:
            raise RunError(f"client(s) {', '.join(unknown)} trained with DP-SGD but declared no sampling rate at Join")
        steps = self.config.client.local_steps
        return {c: {"noise_multiplier": dp_sgd.noise_multiplier, "sample_rate": rates[c], "steps": steps} for c in sorted(seen)}

    def _record_interrupted(
        self, number: int, cohort: Sequence[str], state: RoundState, started: float,
        sample_level: Mapping[str, Any] | None = None,
    ) -> None:
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
            **self._unevaluated(),
            "bytes_up": state.bytes_up,
            "bytes_down": state.bytes_down,
            "stages": self.stages.names(),
            "seconds": round(time.perf_counter() - started, 3),
            **({"sample_level": dict(sample_level)} if sample_level else {}),
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

    def restore_from_checkpoint(self, checkpoint: Checkpoint, *, run_dir: str | Path | None = None) -> None:
        """Continue from ``checkpoint``: global adapter, the stages' state, the cohort RNG and a merged base.

        With ``run_dir`` (the directory the checkpoint came from) and ``[robustness] reputation``,
        the reputations are reloaded from its ``reputation.json``, which must be of the same
        round as the checkpoint (a checkpoint that holds the reputations itself is used first). Only
        the in-memory state: `secure_fl.server.resume` resumes a whole run (ledger, metrics, rounds left).
        """
        self.global_state = {k: np.array(v, copy=True) for k, v in checkpoint.state.items()}
        if self.stages.rule.merges_into_base:  # flora: the base holds every earlier release
            if checkpoint.base is None:
                raise RunError(f"checkpoint {checkpoint.path} holds no merged base, which peft.rule="
                               f"{self.stages.rule.name!r} needs to continue (written by another rule or version)")
            self.releases = restore_merged_base(self.adapted, checkpoint.base)
        rng = restore(self.stages, checkpoint)
        if rng is not None:
            self.rng = rng
        if self.reputation is not None and checkpoint.reputation is not None:  # saved with the checkpoint
            self.reputation.load_state_dict(checkpoint.reputation)
            if run_dir is not None:  # reputation.json may be of a round the crash cut short
                RunDirectory(run_dir).write_reputation(
                    {**self.reputation.state_dict(), "round": checkpoint.round, "run_id": self.run_id})
        elif self.reputation is not None and run_dir is not None:
            restore_reputation(self.reputation, RunDirectory(run_dir), checkpoint.round)


#: Transports of a simulation, whose server may run simulated attacks and seeded noise.
SIMULATED_TRANSPORTS = ("in-process", "ray")


class _BudgetStop(Exception):
    """The next round must not run: a budget would be passed (``cause`` names the setting)."""

    def __init__(self, reason: str, cause: str) -> None:
        super().__init__(reason)
        self.cause = cause


def run_min_cohort(config: Config) -> int:
    """The fewest selected clients a round may run with (``run.min_updates``)."""
    return config.run.min_updates


def privacy_event(mechanism: Any, *, cohort_size: int, population: int, contributions: int, sample_rate: float) -> Any:
    """``mechanism.privacy_event`` with the run-level ``sample_rate`` when it accepts one.

    A mechanism written before sampling rates were passed keeps its own (conservative) rate.
    """
    kwargs: dict[str, Any] = {"cohort_size": cohort_size, "population": population, "contributions": contributions}
    if "sample_rate" in inspect.signature(mechanism.privacy_event).parameters:
        kwargs["sample_rate"] = sample_rate
    return mechanism.privacy_event(**kwargs)


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
    if "fed_eval_perplexity" in out and "fed_eval_loss" in out:  # exp of the mean loss, not a mean of exps
        out["fed_eval_perplexity"] = math.exp(min(out["fed_eval_loss"], 700.0))
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
