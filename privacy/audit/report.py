"""Build and write the privacy audit report of a run (``report/privacy_report.{json,html}``).

The report is computed from what the run directory holds, never from live server state, so
``secure-fl audit RUN_DIR`` gives the same report as the one written at the end of the run:

* ``run.json``: run id, transport, and every pipeline stage with its plug-in class and parameters;
* ``config.toml``: the resolved config (passed in as a dict);
* ``metrics.jsonl``: one line per round (accuracy, or loss and perplexity for a causal LM; dropped and
  excluded clients);
* ``ledger.jsonl``: one line per release (the Gaussian event, who took part, epsilon so far).

Two epsilons are reported. The run-level epsilon (``epsilon.final``) composes every release with
its sampling rate ``q``: the guarantee for any client against whoever does not know who was
selected (amplification by sampling needs that secrecy). The per-client epsilon is the
participation view, for an observer who knows who took part (the server does): it composes only
the releases the client's update was part of, each with ``q = 1`` (no amplification), so a client
that sat a round out spends nothing that round; a line of ``steps`` releases counts ``steps``
times. With full participation the two coincide. A run that released nothing reports epsilon 0
for every accountant and says "no release: nothing spent" (never next to "unbounded"). The
report's schema is ``secure-fl/privacy-report/v1``; `privacy.audit.html.render_html` turns it
into a self-contained page.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import Counter
from importlib import metadata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from privacy.accounting import Accountant, PrivacyEvent, available, create_accountant
from privacy.audit.sample_level import sample_level_report, sample_level_threat_row, sample_level_warnings
from privacy.errors import PrivacyError
from privacy.ledger import epsilon_to_json, event_of

SCHEMA = "secure-fl/privacy-report/v1"
#: What the report, the page and the CLI say for a run that released nothing.
NO_RELEASE = "no release: nothing spent"
DISTRIBUTION = "secure-fl"


def build_report(
    *,
    run: Mapping[str, Any],
    config: Mapping[str, Any],
    metrics: Sequence[Mapping[str, Any]],
    ledger: Sequence[Mapping[str, Any]],
    run_dir: str | Path = "",
    version: str | None = None,
    unconfirmed_rounds: Sequence[int] = (),
    empirical: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The audit report as a JSON-serialisable dict (see the module docstring for the inputs).

    ``version`` is the secure-fl version shown in the report; by default the installed
    distribution's (``privacy`` does not import ``secure_fl``, so it is read from package metadata).
    A round whose metrics record has ``"status": "interrupted"`` (cut short, e.g. by Ctrl-C; it has
    no ledger line) is never counted as released, and raises the ``run-interrupted`` warning, as
    does ``"interrupted": true`` in ``run.json``. ``unconfirmed_rounds`` are ledger rounds with no
    metrics record (from `privacy.ledger.PrivacyLedger.verify`): counted as spent, flagged high.
    ``empirical`` is the run's ``empirical_audit.json`` (`privacy.audit.empirical`), shown as the
    ``empirical_audit`` section; a lower bound above the theoretical epsilon raises the high
    ``empirical-above-theory`` warning (a bug).
    """
    stages: dict[str, dict[str, Any]] = {k: dict(v) for k, v in dict(run.get("stages", {})).items()}
    privacy_cfg = dict(config.get("privacy", {}))
    delta = float(privacy_cfg.get("delta", ledger[-1]["delta"] if ledger else 1e-5))
    accountant_names = [str(n) for n in privacy_cfg.get("accountants", ledger[-1]["epsilon"].keys() if ledger else [])]
    warnings: list[dict[str, str]] = []

    by_round = [{"round": int(e["round"]), "epsilon": dict(e["epsilon"])} for e in ledger]
    final = dict(ledger[-1]["epsilon"]) if ledger else {name: 0.0 for name in accountant_names}

    clients = _clients(run, metrics, ledger)
    unknown = [name for name in accountant_names if name not in available()]
    if unknown:
        warnings.append(_warn(
            "accountant-unavailable", "medium",
            f"accountant(s) {', '.join(unknown)} are not registered in the process that built this report, so "
            "their per-client epsilon is not computed (the run-level values come from the ledger); register them "
            "and call secure_fl.audit(run_dir) to fill it in",
        ))
    known = [name for name in accountant_names if name not in unknown]
    cache: dict[tuple[Any, ...], tuple[float | None, str | None]] = {}
    fallbacks: dict[str, set[str]] = {}
    for entry in ledger:
        for name, note in dict(entry.get("epsilon_notes") or {}).items():
            fallbacks.setdefault(str(name), set()).add(f"round {entry['round']}: {note}")
    for row in clients:
        row["epsilon"], notes = _client_epsilon(row.pop("_releases"), ledger, known, delta, cache)
        if notes:
            row["epsilon_notes"] = notes
            for name, note in notes.items():
                fallbacks.setdefault(name, set()).add(f"per-client view of {row['client_id']}: {note}")
    sample_level = sample_level_report(
        stages=stages, ledger=ledger, metrics=metrics, clients=clients, accountants=known, delta=delta,
    )
    for row in clients:
        for name, note in dict(row.get("sample_level", {}).get("epsilon_notes", {})).items():
            fallbacks.setdefault(name, set()).add(f"sample-level view of {row['client_id']}: {note}")
    if fallbacks:
        warnings.append(_warn(
            "accountant-fallback", "medium",
            "an accountant could not compute its own bound for a noisy history and reported another valid, "
            "looser bound instead: " + "; ".join(f"{name} ({len(v)} time(s), e.g. {min(v)})"
                                                 for name, v in sorted(fallbacks.items())),
        ))
    if unconfirmed_rounds:
        warnings.append(_warn(
            "ledger-without-metrics", "high",
            f"the ledger records round(s) {', '.join(map(str, unconfirmed_rounds))} but metrics.jsonl has no "
            "record of them (the server stopped between the two writes, or metrics.jsonl was cut): their spend "
            "is counted as released",
        ))

    mechanism_stage = stages.get("privacy", {}).get("params", {})
    last = ledger[-1] if ledger else {}
    mechanism = {
        "mode": privacy_cfg.get("mode", last.get("mechanism")),
        "guarantee": last.get("guarantee", mechanism_stage.get("guarantee", "none")),
        "noise_multiplier": last.get("noise_multiplier", mechanism_stage.get("noise_multiplier")),
        "clip_norm": last.get("clip_norm", mechanism_stage.get("clip_norm")),
        "sample_rate": last.get("sample_rate"),
        "delta": delta,
        "accountants": accountant_names,
        "releases": len(ledger),
    }
    clipping = _clipping(mechanism_stage, metrics, ledger)
    if clipping:
        mechanism.update({"adaptive_clip": True, **{k: mechanism_stage.get(k) for k in _ADAPTIVE_KEYS}})
    if sample_level is not None:
        mechanism["sample_level"] = (f"dp-sgd on every client: noise_multiplier {sample_level['noise_multiplier']}, "
                                     f"max_grad_norm {sample_level['max_grad_norm']} (see the sample-level section)")
    mechanism.update(_noise_facts(mechanism_stage))
    sampling = dict(run.get("sampling") or {})
    budget_info = dict(run.get("budget") or {})
    calibration = dict(budget_info.get("calibration") or {})
    if sampling:
        mechanism["sampling"] = sampling.get("mode")
        mechanism["amplified"] = bool(sampling.get("amplified"))
    if calibration:
        mechanism["noise_multiplier_source"] = calibration.get("noise_multiplier_source")
    budget = _budget(budget_info, run, final, delta, len(ledger))
    warnings.extend(_warnings(stages, mechanism, run, config, metrics))
    warnings.extend(_sampling_warnings(stages, mechanism, run, config, metrics, budget, final))
    if sample_level is not None:
        warnings.extend(sample_level_warnings(str(mechanism.get("mode")), sample_level))
    empirical_section = _empirical(empirical, delta, warnings) if empirical is not None else None
    if ledger and ledger[-1].get("epsilon_notes"):
        epsilon_notes = {"notes": dict(ledger[-1]["epsilon_notes"])}
    else:
        epsilon_notes = {}
    completed = [m for m in metrics if m.get("status", "ok") == "ok"]
    # a round cut short and then run again by a resumed server is not an interrupted round of the run
    ended_rounds = {m.get("round") for m in metrics if not _is_interrupted(m)}
    interrupted = [m for m in metrics if _is_interrupted(m) and m.get("round") not in ended_rounds]
    skipped = [m for m in metrics if m.get("status") == "skipped"]
    language_model = any("perplexity" in m for m in metrics)
    return {
        "schema": SCHEMA,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "generator": {"name": DISTRIBUTION, "version": version or installed_version()},
        "run": {
            "run_id": run.get("run_id"),
            "run_dir": str(run_dir),
            "transport": run.get("transport"),
            "rounds_planned": int(dict(config.get("run", {})).get("rounds", len(metrics))),
            "rounds_completed": len(completed),
            "rounds_failed": len([m for m in metrics if m.get("status") in ("failed", "aborted")]),
            "rounds_skipped": len(skipped),
            "rounds_interrupted": len(interrupted),
            "stopped": run.get("stopped"),
            # each time a server continued the run after its predecessor stopped (secure-fl-server --resume)
            "resumes": list(run.get("resumes", [])),
            "interrupted": bool(interrupted) or bool(run.get("interrupted", False)),
            "clients": [row["client_id"] for row in clients],
            "final_accuracy": next((m["accuracy"] for m in reversed(completed) if m.get("accuracy") is not None), None),
            # causal-LM runs: their records carry loss and perplexity instead of accuracy
            **({"final_perplexity": next((m["perplexity"] for m in reversed(completed)
                                          if m.get("perplexity") is not None), None)} if language_model else {}),
        },
        "stages": stages,
        "threat_model": _threat_model(stages, mechanism, run, sample_level),
        "mechanism": mechanism,
        "epsilon": {"final": final, "by_round": by_round, **epsilon_notes},
        "budget": budget,
        "sampling": sampling,
        **({"sample_level": sample_level} if sample_level is not None else {}),
        "clients": clients,
        "exclusions": [
            {"round": int(m["round"]), "client_id": str(c), "defense": str(dict(m.get("stages", {})).get("defense", ""))}
            for m in metrics for c in m.get("excluded", [])
        ] + [  # RFFL reputation: removed for the rest of the run (never selected again)
            {"round": int(m["round"]), "client_id": str(c), "defense": "reputation (removed for the rest of the run)"}
            for m in metrics for c in m.get("reputation_removed", []) or []
        ],
        "accuracy": [{"round": int(m["round"]), "accuracy": m.get("accuracy")} for m in metrics],
        **({"perplexity": [{"round": int(m["round"]), "perplexity": m.get("perplexity"), "loss": m.get("loss")}
                           for m in metrics]} if language_model else {}),
        **({"clipping": clipping} if clipping else {}),
        "warnings": warnings,
        **({"empirical_audit": empirical_section} if empirical_section is not None else {}),
    }


#: Keys of ``empirical_audit.json`` copied into the report's ``empirical_audit`` section.
EMPIRICAL_KEYS = (
    "epsilon_lower_bound", "confidence", "delta", "theoretical_epsilon", "theoretical_epsilon_min", "verdict",
    "message", "caveat", "canaries", "inserted", "guesses", "correct", "released_rounds", "privacy_mode",
    "audit_run_dir", "method", "paper", "level", "canary_kind", "theoretical_epsilon_of",
)  # fmt: skip


def _empirical(empirical: Mapping[str, Any], delta: float, warnings: list[dict[str, str]]) -> dict[str, Any]:
    """The report's ``empirical_audit`` section; adds the warnings it calls for to ``warnings``."""
    section = {key: empirical.get(key) for key in EMPIRICAL_KEYS}
    section["level"] = section["level"] or "client"  # audits written before the sample-level audit existed
    section["canary_kind"] = section["canary_kind"] or "client"
    bound, theory = section["epsilon_lower_bound"], section["theoretical_epsilon_min"]
    if not isinstance(bound, (int, float)) or isinstance(bound, bool):
        raise PrivacyError("empirical_audit.json has no numeric epsilon_lower_bound")
    limit = float(theory) if isinstance(theory, (int, float)) and not isinstance(theory, bool) else math.inf
    if section["verdict"] == "violation" or bound > limit + 1e-9:
        section["verdict"] = "violation"
        warnings.insert(0, _warn(
            "empirical-above-theory", "high",
            f"BUG: the empirical epsilon lower bound {float(bound):.4f} (confidence {section['confidence']}) exceeds "
            f"the theoretical {'sample-level ' if section['level'] == 'sample' else ''}epsilon {limit:.4f} of the "
            f"audit run at delta = {section['delta']}: the "
            "implementation leaks more than it accounts for (a chance result only with probability "
            "1 - confidence); do not rely on this configuration's epsilon until it is explained",
        ))
    audit_delta = section["delta"]
    if isinstance(audit_delta, (int, float)) and not math.isclose(float(audit_delta), delta, rel_tol=1e-9):
        warnings.append(_warn(
            "empirical-delta-mismatch", "medium",
            f"the empirical audit used delta = {audit_delta}, the report delta = {delta}: its lower bound and "
            "this report's epsilon are not comparable",
        ))
    return section


def write_report(report: Mapping[str, Any], report_dir: str | Path) -> tuple[Path, Path]:
    """Write ``privacy_report.json`` and ``privacy_report.html`` atomically; return their paths."""
    from privacy.audit.html import render_html

    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out / "privacy_report.json", out / "privacy_report.html"
    _atomic_write(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    _atomic_write(html_path, render_html(report))
    return json_path, html_path


def installed_version() -> str:
    """The installed secure-fl distribution's version, or ``"unknown"`` when it is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def _is_interrupted(record: Mapping[str, Any]) -> bool:
    """Whether a metrics record is a round cut short (status ``interrupted``): nothing was released."""
    return record.get("status") == "interrupted"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _warn(code: str, severity: str, message: str) -> dict[str, str]:
    return {"code": code, "severity": severity, "message": message}


def _clients(
    run: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]], ledger: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Per-client participation counts; ``_releases`` lists the rounds a client's update was released in."""
    rows: dict[str, dict[str, Any]] = {}

    def row(client: str) -> dict[str, Any]:
        return rows.setdefault(client, {
            "client_id": client, "rounds_selected": 0, "rounds_contributed": 0,
            "rounds_dropped": 0, "rounds_excluded": 0, "rounds_interrupted": 0, "_releases": [],
        })

    for client in run.get("clients", []):
        row(str(client))
    for entry in ledger:
        for client in entry.get("contributors", []):
            contributor = row(str(client))
            contributor["rounds_contributed"] += 1
            contributor["_releases"].append(int(entry["round"]))
    for m in metrics:
        for client in m.get("selected", []):
            row(str(client))["rounds_selected"] += 1
        if _is_interrupted(m):  # selected clients of a cut-short round did not drop out
            for client in m.get("selected", []):
                row(str(client))["rounds_interrupted"] += 1
            continue
        for client in m.get("dropped", []):
            row(str(client))["rounds_dropped"] += 1
        for client in m.get("excluded", []):
            row(str(client))["rounds_excluded"] += 1
    return [rows[k] for k in sorted(rows)]


def _client_epsilon(
    releases: Sequence[int],
    ledger: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    delta: float,
    cache: dict[tuple[Any, ...], tuple[float | None, str | None]],
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Epsilon per accountant over the client's releases at ``q = 1``, and the accountants'
    fallback notes; accountants not registered in this process are left out (the page shows
    "not computed"). A line counts its ``steps`` releases of its own event kind. Clients with the same (event, steps)
    profile share one computation through ``cache``."""
    rounds = set(releases)
    steps: Counter[PrivacyEvent] = Counter()
    for e in ledger:
        if int(e["round"]) in rounds:  # the line's own event (a distributed one is not a Gaussian), at q = 1
            steps[dataclasses.replace(event_of(e), sample_rate=1.0, steps=1)] += int(e["steps"])
    profile = tuple(sorted(steps.items(), key=lambda item: repr(item[0])))
    out: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    for name in names:
        key = (name, profile)
        if key not in cache:
            accountant: Accountant = create_accountant(name)
            for event, count in profile:  # participation is known to this observer: no amplification
                accountant.compose(event, count)
            try:
                spent = accountant.get_privacy_spent(delta)
            except PrivacyError:
                continue
            cache[key] = (epsilon_to_json(spent.epsilon), spent.note)
        out[name], note = cache[key]
        if note:
            notes[name] = note
    return out, notes


#: The adaptive-clipping settings the report's mechanism table shows (from the privacy stage's parameters).
_ADAPTIVE_KEYS = (
    "initial_clip_norm", "target_unclipped_quantile", "clip_learning_rate", "clip_count_stddev", "update_noise_multiplier",
)


def _clipping(
    mechanism_stage: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]], ledger: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Adaptive clipping's clip norm per released round (empty unless the privacy stage adapts C).

    The round's C comes from its ledger line (what its clients clipped to and its noise was scaled
    by); the noised unclipped fraction and the next round's C from its metrics line.
    """
    if not mechanism_stage.get("adaptive_clip"):
        return {}
    by_metrics = {int(m["round"]): m for m in metrics if "round" in m}
    rows = []
    for entry in ledger:
        number = int(entry["round"])
        line = by_metrics.get(number, {})
        rows.append({
            "round": number,
            "clip_norm": entry.get("clip_norm"),
            "unclipped_fraction": line.get("unclipped_fraction"),
            "next_clip_norm": line.get("next_clip_norm"),
        })
    return {
        "adaptive": True,
        "initial_clip_norm": mechanism_stage.get("initial_clip_norm", mechanism_stage.get("clip_norm")),
        "target_unclipped_quantile": mechanism_stage.get("target_unclipped_quantile"),
        "by_round": rows,
    }


def _secure_mode(stages: Mapping[str, Mapping[str, Any]]) -> tuple[str, dict[str, Any], bool]:
    """The secure stage's name, its parameters, and whether the server sees individual updates
    (assumed when the stage does not say otherwise)."""
    secure = dict(stages.get("secure", {}))
    params = dict(secure.get("params", {}))
    return str(secure.get("name", "unknown")), params, bool(params.get("server_sees_individual_updates", True))


def _noise_facts(stage: Mapping[str, Any]) -> dict[str, Any]:
    """Who adds the noise, its std on each sum the server learns (update units), what the server sees, the RNG."""
    out: dict[str, Any] = {}
    if stage.get("noise_added_by"):
        out["noise_added_by"] = stage["noise_added_by"]
    per_sum = stage.get("noise_std_on_each_sum_in_update_units", stage.get("noise_std_on_sum"))
    if isinstance(per_sum, (int, float)):
        where = "each bucket sum" if stage.get("noise_added_by") == "clients" else "the sum of the clipped updates"
        out["noise_std_per_sum"] = f"{per_sum:.6g} per coordinate on {where}"
    for key in ("server_sees", "randomness"):
        if stage.get(key):
            out[key] = stage[key]
    return out


#: Buckets below this many clients raise the ``small-buckets`` warning.
SMALL_BUCKET = 10


def _no_dp(mechanism: Mapping[str, Any]) -> bool:
    return mechanism.get("guarantee", "none") in (None, "none")


#: What every client sends unprotected with its update when the secure mode reveals updates.
CLEAR_METADATA = (
    "per-client metadata sent in the clear with every update: the client's example count (its "
    "aggregation weight, also sent when it joins) and its training loss and local evaluation metrics"
)
#: What is left in the clear when the secure mode hides updates.
HIDDEN_METADATA = (
    "per-client metadata: none of the update's content; clients send no loss, no evaluation metrics "
    "and no weight in the clear (the weight travels inside the masked or encrypted payload) and declare "
    "one example when they join; the server still sees who took part in each phase and the size of every message"
)


def _threat_model(
    stages: Mapping[str, Mapping[str, Any]], mechanism: Mapping[str, Any], run: Mapping[str, Any],
    sample_level: Mapping[str, Any] | None = None,
) -> list[dict[str, str]]:
    mode, params, reveals = _secure_mode(stages)
    dp_text = "nothing: no differential privacy" if _no_dp(mechanism) else (
        f"privacy.mode = {mechanism.get('mode')} ({mechanism.get('guarantee')})"
    )
    sends = stages.get("rule", {}).get("sends")
    message = f" of {sends}" if isinstance(sends, str) and sends else ""
    if reveals:
        server_sees = (f"each client's individual update: {sends}" if message
                       else "each client's individual update (every adapter tensor it sends)")
        server_protection = f"nothing: secure.mode = {mode} reveals individual updates"
    else:
        bucket = params.get("bucket_size")
        if bucket == "cohort":
            server_sees = f"only the sum{message} over the whole cohort"
        else:
            server_sees = f"only sums{message} over buckets of {bucket if bucket else 'several'} clients"
        server_protection = f"secure.mode = {mode}" + (f"; keys held by {params['key_custody']}" if params.get("key_custody") else "")
        sizes = [p for p in params.get("bucket_parameters") or [] if isinstance(p, Mapping)]
        if sizes:
            server_protection += "; " + ", ".join(f"k = {p.get('k')}, t = {p.get('t')} for buckets of {p.get('n')}" for p in sizes)
        if stages.get("privacy", {}).get("params", {}).get("noise_added_by") == "clients" and not _no_dp(mechanism):
            server_sees += ", each carrying the clients' distributed DP noise"
            server_protection += f"; privacy.mode = {mechanism.get('mode')} (the clients add the noise before masking)"
    rows = [
        {"party": "server", "sees": server_sees + "; who was selected, who dropped out", "protected_by": server_protection},
        {"party": "server", "sees": CLEAR_METADATA, "protected_by": "nothing: sent in the clear in this secure mode"}
        if reveals else {"party": "server", "sees": HIDDEN_METADATA, "protected_by": f"secure.mode = {mode}"},
        {"party": "other clients", "sees": "the global adapter of every round they take part in", "protected_by": dp_text},
        {"party": "anyone given the final adapter", "sees": "the released global adapter", "protected_by": dp_text},
    ]
    if not reveals and params.get("collusion"):
        tolerance = "; ".join(str(params[k]) for k in ("k_t_rule", "tolerates", "targets") if params.get(k))
        rows.insert(1, {"party": "server colluding with clients", "sees": str(params["collusion"]),
                        "protected_by": tolerance or f"secure.mode = {mode}"})
    if params.get("adversary_model"):
        rows.append({"party": "a server that deviates from the protocol",
                     "sees": str(params.get("deviating_server") or "not stated by the protocol"),
                     "protected_by": "nothing: " + str(params["adversary_model"])})
    if sample_level is not None:
        rows.insert(0, sample_level_threat_row(sample_level))
    if run.get("transport") == "grpc" and run.get("transport_security") in ("tls", "mtls"):
        rows.append({
            "party": "network observer",
            "sees": "who talks to the server, when, and how many bytes (message contents are under TLS)",
            "protected_by": "TLS" + (" with party certificates (mutual TLS: the round uses the certificate's identity)"
                                     if run.get("transport_security") == "mtls" else " (parties not authenticated)"),
        })
    elif run.get("transport") == "grpc":
        rows.append({
            "party": "network observer",
            "sees": "everything the server receives and sends (the gRPC channel has no TLS configured)",
            "protected_by": "nothing on the wire; " + ("updates travel in the clear" if reveals else "updates are encrypted or masked"),
        })
    return rows


def _warnings(
    stages: Mapping[str, Mapping[str, Any]], mechanism: Mapping[str, Any], run: Mapping[str, Any],
    config: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]],
) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    mode, _, reveals = _secure_mode(stages)
    if _no_dp(mechanism) and not mechanism.get("releases"):
        out.append(_warn("dp-off", "high", f"privacy.mode = {mechanism.get('mode')}: no differential-privacy guarantee; "
                         f"{NO_RELEASE} (no round released an adapter), but a release under this configuration "
                         "could reveal clients' training data"))
    elif _no_dp(mechanism):
        out.append(_warn("dp-off", "high", f"privacy.mode = {mechanism.get('mode')}: no differential-privacy guarantee; "
                         "epsilon is unbounded and the released adapter may reveal clients' training data"))
    if reveals:
        out.append(_warn("server-sees-updates", "high", f"secure.mode = {mode}: the server sees every client's individual update"))
    secure_params = _secure_mode(stages)[1]
    added_by = dict(dict(stages.get("privacy", {})).get("params", {})).get("noise_added_by")
    if added_by == "server" and not _no_dp(mechanism):
        out.append(_warn("central-noise-server", "medium", f"privacy.mode = {mechanism.get('mode')}: the server adds the "
                         "DP noise, so it sees every clipped update and the noise-free sum; epsilon protects the clients "
                         "from whoever receives the released adapter, not from the server"))
    small = sorted({int(p["n"]) for p in secure_params.get("bucket_parameters") or []
                    if isinstance(p, Mapping) and isinstance(p.get("n"), int) and p["n"] < SMALL_BUCKET})
    if not reveals and small:
        protected = ("each bucket sum carries the full distributed noise, so epsilon holds per bucket, but the "
                     "mean of several noised buckets is noisier than one noised sum"
                     if added_by == "clients" else
                     "without distributed DP noise a sum of so few updates can reveal much about each member")
        out.append(_warn("small-buckets", "medium", f"secure.mode = {mode}: the server learns the sum of every bucket of "
                         f"{', '.join(map(str, small))} clients (fewer than {SMALL_BUCKET}); {protected}"))
    if not reveals and str(secure_params.get("adversary_model", "")).startswith("honest-but-curious"):
        out.append(_warn("honest-but-curious", "medium", f"secure.mode = {mode} protects against a server that follows "
                         f"the protocol only: {secure_params['adversary_model']}"))
    security = run.get("transport_security")
    if run.get("transport") == "grpc" and security not in ("tls", "mtls"):
        how = ("the server ran with --insecure" if security == "insecure"
               else "the run did not record TLS (written before secure-fl had it)")
        out.append(_warn("no-tls", "high", f"the gRPC transport was plaintext ({how}): anyone on the network path sees "
                         "what the server sees, and any party could claim any client id"))
    elif run.get("transport") == "grpc" and security == "tls":
        out.append(_warn("no-client-auth", "medium", "TLS without party certificates (--no-client-auth): the wire is "
                         "encrypted, but parties are identified by the client id they declare"))
    if dict(stages.get("defense", {})).get("name") == "none":
        out.append(_warn("no-defense", "info", "robustness.defense = none: a poisoned update enters the aggregate unchecked"))
    attack = dict(config.get("attack", {}))
    if attack.get("kind", "none") != "none":
        out.append(_warn("simulated-attack", "info", f"simulated attackers: attack.kind = {attack['kind']}, "
                         f"fraction = {attack.get('fraction')}"))
    cut = [m for m in metrics if _is_interrupted(m)]
    if cut or run.get("interrupted"):
        rounds = ", ".join(str(m.get("round", "?")) for m in cut)
        reasons = sorted({str(m["reason"]) for m in cut if m.get("reason")})
        out.insert(0, _warn(  # first: it qualifies every other number in the report
            "run-interrupted", "high",
            "run interrupted" + (f" in round {rounds}" if rounds else "") + (f" ({'; '.join(reasons)})" if reasons else "")
            + ": the run stopped before its planned rounds; a cut-short round released nothing and is not counted "
            "as released, and the report covers only the rounds before it",
        ))
    failed = [int(m["round"]) for m in metrics if m.get("status", "ok") not in ("ok", "interrupted", "skipped")]
    if failed:
        out.append(_warn("failed-rounds", "info", f"round(s) {', '.join(map(str, failed))} failed and released nothing"))
    return out


def _budget(
    info: Mapping[str, Any], run: Mapping[str, Any], final: Mapping[str, Any], delta: float, releases: int
) -> dict[str, Any]:
    """The budget line: target, spent (budget accountant), remaining, where and why the run stopped."""
    accountant = info.get("accountant") or next(iter(final), None)
    spent_json = final.get(accountant) if accountant is not None else None
    spent = None if releases and spent_json is None else float(spent_json or 0.0)
    target = info.get("target_epsilon")
    stopped = dict(run.get("stopped") or {})
    return {
        "accountant": accountant,
        "delta": delta,
        "target_epsilon": target,
        "spent": spent,
        "remaining": (float(target) - spent) if target is not None and spent is not None else None,
        "client_target_epsilon": info.get("client_target_epsilon"),
        "noise_multiplier": dict(info.get("calibration") or {}).get("noise_multiplier"),
        "calibrated": bool(dict(info.get("calibration") or {}).get("calibrated", False)),
        "noise_multiplier_source": dict(info.get("calibration") or {}).get("noise_multiplier_source"),
        "stopped_at_round": stopped.get("round"),
        "stop_reason": stopped.get("reason"),
    }


def _sampling_warnings(
    stages: Mapping[str, Mapping[str, Any]], mechanism: Mapping[str, Any], run: Mapping[str, Any],
    config: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]], budget: Mapping[str, Any],
    final: Mapping[str, Any],
) -> list[dict[str, str]]:
    """Warnings about randomness, sampling and budgets (insecure seed, q = 1 view, skipped rounds, stop)."""
    out: list[dict[str, str]] = []
    seed = dict(stages.get("privacy", {}).get("params", {})).get("insecure_seed")
    if seed is None:
        seed = dict(dict(config.get("privacy", {})).get("params", {})).get("insecure_seed")
    if seed is not None:
        out.append(_warn("insecure-seed", "high", f"privacy.params.insecure_seed = {seed}: the DP noise came from a "
                         "seeded generator, so anyone who knows the seed can remove it; this run has NO privacy "
                         "guarantee whatever epsilon says (testing only; refused outside simulation)"))
    sampling = dict(run.get("sampling") or {})
    if not _no_dp(mechanism) and sampling.get("mode", "fixed") == "fixed":
        out.append(_warn("q1-view", "medium", "q = 1 view: cohorts are drawn with a fixed size from a seeded "
                         "generator (run.sampling = 'fixed'), which is neither Poisson nor secret, so the run-level "
                         "epsilon claims no amplification by sampling (sample_rate = 1 for every release); set "
                         "run.sampling = 'poisson' for secret Poisson sampling"))
    skipped = [int(m["round"]) for m in metrics if m.get("status") == "skipped"]
    p = float(sampling.get("skip_probability") or 0.0)
    if sampling.get("mode") == "poisson" and p > 0 and not _no_dp(mechanism):
        rounds = int(dict(config.get("run", {})).get("rounds", len(metrics)))
        name = budget.get("accountant")
        eps = final.get(str(name)) if name else None
        extra = rounds * p * (1 + math.exp(min(float(eps), 700.0))) if eps is not None else math.inf
        severity = "high" if extra > float(budget.get("delta") or 0) else "info"
        out.append(_warn("poisson-skips", severity, f"a Poisson cohort too small to run (round skipped, nothing "
                         f"released) has probability {p:.3g} per round; whether a round is skipped depends on the "
                         f"secret cohort size, so the guarantee including skips is (epsilon, delta + T p (1 + e^epsilon)) "
                         f"= delta + {extra:.3g} over T = {rounds} rounds"
                         + (f"; skipped: round(s) {', '.join(map(str, skipped))}" if skipped else "")))
    elif skipped:
        out.append(_warn("skipped-rounds", "info", f"round(s) {', '.join(map(str, skipped))} were skipped (cohort too small)"))
    if budget.get("stop_reason"):
        out.append(_warn("budget-stop", "medium", str(budget["stop_reason"])))
    return out
