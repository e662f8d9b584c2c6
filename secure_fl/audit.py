"""``secure-fl audit RUN_DIR``: build the privacy audit report from a run directory.

Reads ``config.toml``, ``run.json``, ``metrics.jsonl``, ``ledger.jsonl`` and, when the empirical
audit ran (`secure_fl.empirical_audit`), ``empirical_audit.json`` (nothing else, so the report can
be rebuilt at any time, by anyone holding the directory) and writes
``report/privacy_report.json`` and ``report/privacy_report.html``. The server calls it at the end
of every run; what each section and warning means is described in ``docs/privacy-report.md``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privacy.audit import build_report, write_report
from privacy.audit.empirical import read_empirical_audit
from privacy.errors import PrivacyError
from privacy.ledger import PrivacyLedger
from secure_fl.errors import RunError
from secure_fl.server.rundir import RunDirectory


@dataclass(frozen=True)
class AuditReport:
    """The report of one run: the parsed JSON and where both files were written."""

    data: dict[str, Any]
    json_path: Path
    html_path: Path


def audit(run_dir: str | Path) -> AuditReport:
    """Build and write the privacy audit report of the run in ``run_dir``.

    Raises `RunError` naming the file when the directory is not a run
    directory or one of its files is unreadable (a damaged ledger is never papered over): that
    includes a ledger whose hash chain is broken or missing, a line whose delta is not the run's,
    and a round released according to ``metrics.jsonl`` without its ledger line (or the reverse);
    the message names the line or round.
    """
    path = Path(run_dir)
    config_path = path / "config.toml"
    if not config_path.is_file():
        raise RunError(f"{path} is not a run directory: {config_path.name} is missing (pass the --out of a run)")
    rundir = RunDirectory(path)
    try:
        config = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise RunError(f"{config_path}: not valid TOML ({exc})") from None
    try:
        run_info = rundir.read_run_info()
        metrics = rundir.read_metrics()
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: run.json or metrics.jsonl is not valid JSON ({exc})") from None
    try:
        books = PrivacyLedger(rundir.ledger_path)
        ledger = books.entries()
        delta = dict(config.get("privacy", {})).get("delta", ledger[0]["delta"] if ledger else 1e-5)
        unconfirmed = books.verify(metrics=metrics, delta=float(delta))
        report = build_report(run=run_info, config=config, metrics=metrics, ledger=ledger, run_dir=path,
                              unconfirmed_rounds=unconfirmed, empirical=read_empirical_audit(path))
        json_path, html_path = write_report(report, rundir.report_dir)
    except PrivacyError as exc:
        raise RunError(f"audit of {path}: {exc}") from None
    return AuditReport(report, json_path, html_path)
