"""Server-side wiring of `robustness`: the defense's row precondition and the RFFL reputations.

`check_defense_rows` refuses, before any round, a defense that could never run on the rows a
round reveals (Krum with ``f`` needs ``2f + 3`` rows; under buckets the rows are bucket means,
so ``f`` counts poisoned buckets). `build_reputation` and `restore_reputation` make the
per-client reputation of ``[robustness] reputation`` and reload it from a run directory.
"""

from __future__ import annotations

import numpy as np

from robustness.reputation import ReputationTracker
from secure_fl.config import Config
from secure_fl.errors import ConfigError, RunError
from secure_fl.server.pipeline import ServerPipeline, Stages
from secure_fl.server.rundir import RunDirectory

__all__ = ["build_reputation", "check_defense_rows", "planned_rows", "restore_reputation"]


def planned_rows(stages: Stages, pipeline: ServerPipeline, cohort_size: int) -> int:
    """The rows a defense sees in a full round of ``cohort_size`` clients (clients or bucket means)."""
    # Only the number of buckets matters here; the protocols draw the real split with `secrets`.
    buckets = stages.secure.assign_buckets([f"c{i}" for i in range(cohort_size)], np.random.default_rng(0))
    return pipeline.rows_for(len(buckets))


def check_defense_rows(stages: Stages, pipeline: ServerPipeline, config: Config, cohort_size: int) -> None:
    """Refuse a defense whose precondition no full round could meet (``ConfigError`` naming the keys)."""
    need = int(getattr(stages.defense, "min_rows", lambda: 1)())
    rows = planned_rows(stages, pipeline, cohort_size)
    if rows >= need:
        return
    what = f"{cohort_size} client(s) per round"
    if rows != cohort_size:
        what += f" in buckets of {config.secure.bucket_size or cohort_size}, i.e. {rows} bucket mean(s)"
    settings = ", ".join(f"{k}={v}" for k, v in sorted(dict(config.robustness.params).items())) or "its defaults"
    raise ConfigError(
        f"robustness.defense={config.robustness.defense!r} ({settings}) needs at least {need} rows per round, "
        f"but {what} give {rows}; lower robustness.params.f, select more clients (run.clients_per_round) "
        "or use smaller buckets (secure.bucket_size)",
        key="robustness.defense",
    )


def build_reputation(config: Config) -> ReputationTracker | None:
    """The run's reputation tracker, or ``None`` without ``[robustness] reputation``."""
    r = config.robustness
    if not r.reputation:
        return None
    return ReputationTracker(alpha=r.reputation_alpha, threshold=r.reputation_threshold, warmup=r.reputation_warmup)


def restore_reputation(tracker: ReputationTracker, run_dir: RunDirectory, round_number: int) -> None:
    """Load ``run_dir/reputation.json`` into ``tracker``; it must be of round ``round_number``."""
    state = run_dir.read_reputation()
    if state is None:
        raise RunError(f"{run_dir.reputation_path} is missing: the run kept no reputations to restore")
    if state.get("round") != round_number:
        raise RunError(
            f"{run_dir.reputation_path} holds the reputations after round {state.get('round')!r}, but the "
            f"checkpoint is of round {round_number}; restore the matching checkpoint"
        )
    try:
        tracker.load_state_dict(state)
    except ValueError as exc:
        raise RunError(f"{run_dir.reputation_path}: {exc}") from None

