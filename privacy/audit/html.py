"""Render a privacy audit report (schema ``secure-fl/privacy-report/v1``) as one HTML page.

The page is self-contained so it can be archived with a run or sent to a reviewer: no external
links, scripts, fonts or images; plots are embedded PNG data URIs, styling is inline CSS. Client
ids come from the network and plug-in names from user configuration, so every string from the
report is HTML-escaped. Missing optional sections are skipped, not treated as errors. The charts
come from `privacy.audit.plots` (matplotlib without pyplot, imported lazily). The layout fits a
1280 px window: long values wrap inside their cells (``scripts/screenshot_report.py`` checks it in
a real browser).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from privacy.audit.empirical import ATTACK_CAVEAT
from privacy.audit.plots import clients_plot, line_plot
from privacy.audit.report import NO_RELEASE

__all__ = ["render_html"]

_MAX_PLOTTED_CLIENTS = 60
_UNBOUNDED = "∞ (no guarantee)"
_MISSING = "—"
_NOT_RELEASED = "— (not released)"
_SEVERITIES = ("high", "medium", "info")

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; overflow-wrap: break-word; }
h2 { border-bottom: 1px solid #ccc; } .meta, .caption { color: #555; } img { max-width: 100%; }
table { border-collapse: collapse; margin: .5em 0 1em; max-width: 100%; } th { background: #f2f2f2; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { white-space: nowrap; } .wrap { overflow-wrap: anywhere; }
.banner { border: 2px solid #c62828; background: #fdecea; color: #c62828; font-weight: bold; padding: .5em 1em; }
.high-box { border: 2px solid #c62828; background: #fdecea; padding: .3em 1em; margin: .5em 0; }
.severity { font-weight: bold; text-transform: uppercase; margin-right: .5em; }
.sev-high .severity, .unbounded { color: #c62828; font-weight: bold; } .sev-medium .severity { color: #e65100; }
.sev-info .severity, .sev-other .severity { color: #1565c0; }
"""


def render_html(report: Mapping[str, Any]) -> str:
    """Render a privacy audit report dict as a self-contained HTML page.

    Parameters
    ----------
    report : Mapping[str, Any]
        A report as produced by ``privacy.audit.report.build_report`` (schema
        ``secure-fl/privacy-report/v1``). Missing or empty optional sections are skipped.

    Returns
    -------
    str
        The page, starting with ``<!DOCTYPE html>``. It references nothing outside itself
        (plots are ``data:image/png;base64`` URIs, no JavaScript) and every string taken from
        the report is escaped with `html.escape`, because client ids come from the network.
    """
    run = _mapping(report.get("run"))
    accountants = _accountants(report)
    sections = [
        _header_section(report, run, accountants),
        _warnings_section(_seq(report.get("warnings"))),
        _threat_section(_seq(report.get("threat_model"))),
        _mechanism_section(_mapping(report.get("mechanism"))),
        _budget_section(_mapping(report.get("budget")), _mapping(report.get("sampling"))),
        _stages_section(_mapping(report.get("stages"))),
        _epsilon_section(_mapping(report.get("epsilon")), accountants, sample_level=bool(report.get("sample_level"))),
        _clipping_section(_mapping(report.get("clipping"))),
        _sample_level_section(_mapping(report.get("sample_level")), _seq(report.get("clients")), accountants),
        _empirical_section(_mapping(report.get("empirical_audit"))),
        _clients_section(_seq(report.get("clients")), accountants, sample_level=bool(report.get("sample_level"))),
        _exclusions_section(_seq(report.get("exclusions"))),
        _accuracy_section(_seq(report.get("accuracy"))),
        _perplexity_section(_seq(report.get("perplexity"))),
    ]
    title = "Privacy audit report"
    if run.get("run_id") is not None:
        title += f" — {run['run_id']}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(s for s in sections if s)
        + f'\n<p class="meta">Schema: {_esc(report.get("schema", _MISSING))}</p>\n</body>\n</html>\n'
    )


def _esc(value: object) -> str:
    """Escape any value's ``str`` for HTML text and attribute contexts."""
    return html.escape(str(value), quote=True)


def _mapping(value: object) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else an empty one (tolerates missing/malformed sections)."""
    return value if isinstance(value, Mapping) else {}


def _seq(value: object) -> list[Any]:
    """``value`` as a list if it is a list or tuple, else an empty list."""
    return list(value) if isinstance(value, (list, tuple)) else []


def _num(value: object) -> float | None:
    """A finite float, or ``None`` for ``None``, non-numbers, booleans, NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt_eps(value: object) -> str:
    """An epsilon for display: 4 decimals, or the unbounded marker when there is no guarantee."""
    number = _num(value)
    return _UNBOUNDED if number is None else f"{number:.4f}"


def _fmt(value: object) -> str:
    """A generic value for display: ``None`` as a dash, lists joined, mappings as compact JSON."""
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return _json(value)
    return str(value)


def _json(value: object) -> str:
    """Compact, key-sorted JSON; non-JSON values fall back to ``str``."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str, ensure_ascii=False)


def _xy(pairs: Iterable[tuple[object, object]]) -> tuple[list[float], list[float]]:
    """The finite (x, y) points among ``pairs`` as x and y lists; ``None`` and non-numbers are skipped."""
    points = [(_num(x), _num(y)) for x, y in pairs]
    finite = [(x, y) for x, y in points if x is not None and y is not None]
    return [x for x, _ in finite], [y for _, y in finite]


def _cells(entry: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    """The displayed values of ``keys`` in ``entry`` (missing ones as a dash), for a table row."""
    return [_fmt(entry.get(k)) for k in keys]


def _eps_cells(entry: Mapping[str, Any], accountants: Sequence[str]) -> list[str]:
    """The displayed epsilon of each accountant in ``entry["epsilon"]``, for a table row.

    A missing key means the accountant was not available to the report builder: say so, rather
    than showing it as unbounded.
    """
    epsilon = _mapping(entry.get("epsilon"))
    return [_fmt_eps(epsilon[n]) if n in epsilon else "not computed" for n in accountants]


def _accountants(report: Mapping[str, Any]) -> list[str]:
    """Accountant names, first-seen order, from the mechanism and every epsilon mapping in the report."""
    epsilon = _mapping(report.get("epsilon"))
    names: list[str] = [str(n) for n in _seq(_mapping(report.get("mechanism")).get("accountants"))]
    sources = [_mapping(epsilon.get("final"))]
    sources += [_mapping(_mapping(r).get("epsilon")) for r in _seq(epsilon.get("by_round"))]
    sources += [_mapping(_mapping(c).get("epsilon")) for c in _seq(report.get("clients"))]
    for source in sources:
        names += [str(k) for k in source]
    return list(dict.fromkeys(names))


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], code_cols: Sequence[int] = (),
    html_cols: Sequence[int] = (),
) -> str:
    """An HTML table; every cell is escaped here, cells in ``code_cols`` are wrapped in ``<code>``.

    Cells in ``html_cols`` are inserted as they are: the caller must have escaped them.
    """
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="wrap">{c}</td>' if i in html_cols
            else f"<td{_wrap(c)}><code>{_esc(c)}</code></td>" if i in code_cols else f"<td{_wrap(c)}>{_esc(c)}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _wrap(cell: object, longest: int = 24) -> str:
    """`` class="wrap"`` (break anywhere) for a cell holding a word longer than ``longest``
    characters, which would otherwise widen its table past the page; short words never break."""
    return ' class="wrap"' if any(len(word) > longest for word in str(cell).split()) else ""


def _section(title: str, body: str) -> str:
    """A ``<section>`` with an escaped ``<h2>`` heading and already-rendered body HTML."""
    return f"<section>\n<h2>{_esc(title)}</h2>\n{body}\n</section>"


def _img(png_b64: str, alt: str) -> str:
    """An ``<img>`` showing base64 PNG data inline, with escaped alt text."""
    return f'<img src="data:image/png;base64,{png_b64}" alt="{_esc(alt)}">'


def _header_section(report: Mapping[str, Any], run: Mapping[str, Any], accountants: Sequence[str]) -> str:
    """Title, run metadata and the one-line summary (rounds, clients, accuracy, final epsilon)."""
    run_id, run_dir = (_esc(_fmt(run.get(k))) for k in ("run_id", "run_dir"))
    generated = _esc(_fmt(report.get("generated_at")))
    generator = _mapping(report.get("generator"))
    version = f' by {_esc(generator.get("name", "secure-fl"))} {_esc(_fmt(generator.get("version")))}' if generator else ""
    meta = (
        f'<p class="meta">Run <code>{run_id}</code> · generated {generated}{version} · '
        f'run dir <code>{run_dir}</code></p>'
    )
    n_clients = len(_seq(run.get("clients")) or _seq(report.get("clients")))
    rounds = f"{_fmt(run.get('rounds_completed'))}/{_fmt(run.get('rounds_planned'))}"
    if _num(run.get("rounds_failed")):
        rounds += f" ({_fmt(run.get('rounds_failed'))} failed)"
    banner = ""
    stopped = _mapping(run.get("stopped"))
    if stopped:
        rounds += f" (stopped at round {_fmt(stopped.get('round'))}: {_fmt(stopped.get('cause'))})"
    resumes = _seq(run.get("resumes"))
    if resumes:  # the server was stopped or killed and a new one continued the run
        rounds += f" (resumed {len(resumes)} time{'s' if len(resumes) != 1 else ''} after the server stopped)"
    if run.get("interrupted") is True:
        rounds += " (run interrupted)"
        banner = (
            '\n<p class="banner">Run interrupted: it stopped before its planned rounds. '
            "Only the rounds before the interruption released anything; see the warnings.</p>"
        )
    accuracy = _num(run.get("final_accuracy"))
    perplexity = _num(run.get("final_perplexity"))
    final = _mapping(_mapping(report.get("epsilon")).get("final"))
    delta = _mapping(report.get("mechanism")).get("delta")
    eps = ", ".join(f"{name} {_fmt_eps(final.get(name))}" for name in accountants if name in final)
    if _mapping(report.get("mechanism")).get("releases") == 0:
        eps = NO_RELEASE  # not "0.0000" next to a warning about unbounded releases
    sample_level = _mapping(report.get("sample_level"))
    level = "client-level " if sample_level else ""
    parts = [
        f"Rounds completed: {rounds}",
        f"Clients: {n_clients}",
        f"Final accuracy: {_MISSING if accuracy is None else f'{accuracy:.4f}'}" if "final_perplexity" not in run
        else f"Final perplexity: {_MISSING if perplexity is None else f'{perplexity:.4g}'}",
        f"Final {level}ε at δ = {_fmt(delta)}: {eps or _MISSING}",
    ]
    if sample_level:
        worst = _mapping(sample_level.get("max_epsilon"))
        shown = ", ".join(f"{name} {_fmt_eps(worst[name])}" for name in accountants if name in worst)
        parts.append(f"Sample-level ε (DP-SGD, largest over clients): {shown or _MISSING}")
    empirical = _mapping(report.get("empirical_audit"))
    if _num(empirical.get("epsilon_lower_bound")) is not None:
        level = "Empirical sample-level ε" if empirical.get("level") == "sample" else "Empirical ε"
        parts.append(f"{level} ≥ {_num(empirical['epsilon_lower_bound']):.4f} ({_confidence(empirical)} confidence)")
    summary = " · ".join(_esc(p) for p in parts)
    return f'<h1>Privacy audit report</h1>\n{meta}{banner}\n<p class="summary">{summary}</p>'


def _warnings_section(warnings: Sequence[Any]) -> str:
    """Warnings with visible severity; high-severity ones in a red box above the others."""
    if not warnings:
        return _section("Warnings", "<p>No warnings.</p>")
    items: dict[bool, list[str]] = {True: [], False: []}
    for warning in map(_mapping, warnings):
        severity = str(warning.get("severity", "info"))
        css = severity if severity in _SEVERITIES else "other"
        item = (
            f'<li class="warning sev-{css}"><span class="severity">{_esc(severity)}</span>'
            f'<code>{_esc(warning.get("code", ""))}</code> {_esc(warning.get("message", ""))}</li>'
        )
        items[css == "high"].append(item)
    high, other = ("\n".join(items[k]) for k in (True, False))
    box = f'<div class="high-box">\n<ul class="warnings">\n{high}\n</ul>\n</div>\n' if high else ""
    return _section("Warnings", box + (f'<ul class="warnings">\n{other}\n</ul>' if other else ""))


def _threat_section(threats: Sequence[Any]) -> str:
    """Who sees what, and what protects it."""
    if not threats:
        return ""
    rows = [_cells(t, ("party", "sees", "protected_by")) for t in map(_mapping, threats)]
    return _section("Threat model", _table(["party", "can see", "protected by"], rows))


def _mechanism_section(mechanism: Mapping[str, Any]) -> str:
    """Every key of the DP mechanism description with its value."""
    if not mechanism:
        return ""
    rows = [[key, _fmt(value)] for key, value in mechanism.items()]
    return _section("Mechanism and parameters", _table(["parameter", "value"], rows))


def _budget_section(budget: Mapping[str, Any], sampling: Mapping[str, Any]) -> str:
    """The budget line (target, spent, remaining, where and why the run stopped) and the sampling."""
    if not budget and not sampling:
        return ""
    target = budget.get("target_epsilon")
    spent = budget.get("spent")
    line = (
        f"Budget: target ε {_fmt_eps(target) if target is not None else 'none'}, spent "
        f"{_fmt_eps(spent) if 'spent' in budget else _MISSING}, remaining "
        f"{_fmt_eps(budget.get('remaining')) if target is not None else _MISSING} "
        f"({_fmt(budget.get('accountant'))} at δ = {_fmt(budget.get('delta'))})"
    )
    if budget.get("noise_multiplier") is not None:
        line += f"; z = {_fmt(budget['noise_multiplier'])} ({'calibrated' if budget.get('calibrated') else 'from the config'})"
    if budget.get("stop_reason"):
        line += f"; {budget['stop_reason']}"
    elif target is not None:
        line += "; every planned round ran within the budget" if budget.get("stopped_at_round") is None else ""
    rows = [
        ["target ε (run level)", _fmt(target)],
        ["spent ε", _fmt_eps(spent)],
        ["remaining ε", _fmt_eps(budget.get("remaining")) if budget.get("remaining") is not None else _MISSING],
        ["per-client target ε", _fmt(budget.get("client_target_epsilon"))],
        ["noise multiplier z", _fmt(budget.get("noise_multiplier"))
         + (" (calibrated)" if budget.get("calibrated") else "")],
        ["z from", _fmt(budget.get("noise_multiplier_source"))],
        ["stopped at round", _fmt(budget.get("stopped_at_round"))],
        ["sampling", _fmt(sampling.get("mode"))],
        ["q (run-level sample rate)", _fmt(sampling.get("sample_rate") if sampling.get("amplified") else 1.0)],
        ["amplified by sampling", _fmt(bool(sampling.get("amplified")))],
        ["expected cohort", _fmt(sampling.get("expected_cohort"))],
        ["skip probability per round", _fmt(sampling.get("skip_probability"))],
    ]
    return _section("Budget and sampling", f'<p class="budget">{_esc(line)}</p>\n' + _table(["item", "value"], rows))


def _stages_section(stages: Mapping[str, Any]) -> str:
    """The pipeline stages: plug-in, whether it is built in, and its parameters."""
    if not stages:
        return ""
    rows = []
    for stage, info in stages.items():
        entry = _mapping(info)
        builtin = entry.get("builtin")
        kind = _MISSING if builtin is None else ("built-in" if builtin else "user plug-in")
        rows.append([stage, *_cells(entry, ("name", "plugin")), kind, _params_html(entry.get("params"))])
    headers = ["stage", "name", "plug-in class", "origin", "params"]
    return _section("Pipeline stages", _table(headers, rows, code_cols=(2,), html_cols=(4,)))


def _params_html(params: object) -> str:
    """A stage's parameters, one escaped ``key = value`` per line (values as compact JSON), so the
    column wraps between parameters instead of stretching the table past the window."""
    entries = _mapping(params)
    if not entries:
        return _esc(_MISSING) if params is None or isinstance(params, Mapping) else f"<code>{_esc(_fmt(params))}</code>"
    return "".join(f"<div><code>{_esc(key)} = {_esc(_json(value))}</code></div>" for key, value in sorted(entries.items()))


def _epsilon_section(epsilon: Mapping[str, Any], accountants: Sequence[str], *, sample_level: bool = False) -> str:
    """Epsilon per round: a plot of the finite values (or the unbounded notice) and a table.

    With DP-SGD in the run these are the client-level values, and the headings say so.
    """
    by_round = [_mapping(r) for r in _seq(epsilon.get("by_round"))]
    if not by_round:
        return ""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for name in accountants:
        xs, ys = _xy((r.get("round"), _mapping(r.get("epsilon")).get(name)) for r in by_round)
        if xs:
            series[name] = (xs, ys)
    level = "client-level " if sample_level else ""
    if series:
        body = _img(line_plot(series, "epsilon"), f"{level.capitalize()}epsilon per round for each accountant")
    elif sample_level:
        body = ('<p class="unbounded">No client-level guarantee: the client-level epsilon is unbounded in every round '
                "(each training example is protected by DP-SGD: see the sample-level section).</p>")
    else:
        body = '<p class="unbounded">No differential-privacy guarantee: epsilon is unbounded in every round.</p>'
    rows = [[_fmt(r.get("round")), *_eps_cells(r, accountants)] for r in by_round]
    table = _table(["round", *[f"{level}ε ({n})" for n in accountants]], rows)
    return _section(f"{level.capitalize()}epsilon over rounds" if level else "Epsilon over rounds", body + "\n" + table)


def _clipping_section(clipping: Mapping[str, Any]) -> str:
    """Adaptive clipping: the clip norm C of every released round, plotted, and a table with the
    noised unclipped fraction that moved it; empty when C is fixed."""
    rows = [_mapping(r) for r in _seq(clipping.get("by_round"))]
    if not rows:
        return ""
    xs, ys = _xy((r.get("round"), r.get("clip_norm")) for r in rows)
    body = _img(line_plot({"clip norm C": (xs, ys)}, "clip norm C"), "Clip norm C per round") if xs else ""
    note = (
        '<p class="caption">Adaptive clipping (Andrew et al. 2021): every client clipped its update to the round\'s C '
        "and reported whether it was clipped; the server moved C towards the "
        f"{_esc(_fmt(clipping.get('target_unclipped_quantile')))} quantile of the update norms using the noised "
        f"fraction of unclipped clients (it carries the count noise, so it may fall outside [0, 1]). "
        f"Initial C: {_esc(_fmt(clipping.get('initial_clip_norm')))}.</p>"
    )
    table = _table(
        ["round", "clip norm C", "noised unclipped fraction", "next C"],
        [[_fmt(r.get("round")), *(_short(r.get(k)) for k in ("clip_norm", "unclipped_fraction", "next_clip_norm"))]
         for r in rows],
    )
    return _section("Clip norm over rounds", note + "\n" + body + "\n" + table)


def _short(value: object) -> str:
    """A number to 4 significant digits (a dash when missing or not finite)."""
    number = _num(value)
    return _MISSING if number is None else f"{number:.4g}"


def _sample_level_section(section: Mapping[str, Any], clients: Sequence[Any], accountants: Sequence[str]) -> str:
    """DP-SGD: its settings, what it protects, the largest per-client sample-level ε and a per-client table."""
    if not section:
        return ""
    worst = _mapping(section.get("max_epsilon"))
    keys = ("guarantee", "noise_multiplier", "max_grad_norm", "local_steps", "batch_size", "sampling", "delta",
            "clients_accounted", "unreleased_rounds", "protects", "does_not_protect")
    rows = [[key, _fmt(section.get(key)) if section.get(key) != [] else "none"] for key in keys if key in section]
    rows += [[f"largest sample-level ε ({name})", _fmt_eps(worst[name])] for name in accountants if name in worst]
    client_rows = []
    for client in map(_mapping, clients):
        level = _mapping(client.get("sample_level"))
        if not level.get("rounds"):
            eps = [_NOT_RELEASED for _ in accountants]
        else:
            eps = _eps_cells(level, accountants)
        rates = ", ".join(f"{q:.4g}" for q in map(_num, _seq(level.get("sample_rates"))) if q is not None)
        client_rows.append([_fmt(client.get("client_id")), rates or _MISSING, _fmt(level.get("rounds")),
                            _fmt(level.get("steps")), *eps])
    headers = ["client", "sampling rate q", "rounds seen", "DP-SGD steps", *[f"sample-level ε ({n})" for n in accountants]]
    note = (
        '<p class="caption">Sample-level ε composes every DP-SGD step of the rounds in which the server saw the '
        "client's output (each step a Poisson-subsampled Gaussian with the client's own q): the guarantee for any "
        "one of its training examples, against everyone including the server.</p>"
    )
    body = _table(["parameter", "value"], rows) + "\n" + note + "\n" + _table(headers, client_rows)
    return _section("Sample-level DP (DP-SGD)", body)


def _clients_section(clients: Sequence[Any], accountants: Sequence[str], *, sample_level: bool = False) -> str:
    """Per-client participation and epsilon, with a stacked bar plot of the first clients.

    With DP-SGD in the run the epsilon columns are the client-level ones, and say so.
    """
    entries = [_mapping(c) for c in clients]
    if not entries:
        return _section("Clients", "<p>No client took part.</p>")
    keys = ["rounds_selected", "rounds_contributed", "rounds_dropped", "rounds_excluded"]
    headers = ["client", "selected", "contributed", "dropped", "excluded"]
    if any(_num(c.get("rounds_interrupted")) for c in entries):  # selected in a round cut short
        keys.append("rounds_interrupted")
        headers.append("interrupted")
    rows = [[*_cells(c, ("client_id", *keys)), *_client_eps_cells(c, accountants)] for c in entries]
    headers += [f"{'client-level ' if sample_level else ''}ε ({n})" for n in accountants]
    shown = entries[:_MAX_PLOTTED_CLIENTS]
    caption = "Rounds per client: aggregated, excluded by the defense, dropped"
    if len(entries) > len(shown):
        caption += f" (plot shows the first {len(shown)} of {len(entries)} clients; the table lists all)"
    img = _img(clients_plot(shown), caption)
    figure = f'<figure>\n{img}\n<figcaption class="caption">{_esc(caption)}.</figcaption>\n</figure>'
    note = (
        '<p class="caption">Per-client ε composes only the releases the client\'s update was part of, each '
        "without amplification by sampling, because the server knows who took part. The run-level ε "
        "composes every release at its sampling rate and holds against observers who do not know the "
        "selection.</p>"
    )
    return _section("Clients", note + "\n" + _table(headers, rows) + "\n" + figure)


def _client_eps_cells(client: Mapping[str, Any], accountants: Sequence[str]) -> list[str]:
    """A client's epsilon cells; a client none of whose updates was released shows "not released"
    (not a number next to the run's "no guarantee", nor unbounded: nothing of it left the server)."""
    if client.get("rounds_contributed") == 0:
        return [_NOT_RELEASED for _ in accountants]
    return _eps_cells(client, accountants)


def _exclusions_section(exclusions: Sequence[Any]) -> str:
    """Which defense excluded which client in which round."""
    if not exclusions:
        return _section("Exclusions", "<p>No client was excluded by a defense.</p>")
    rows = [_cells(e, ("round", "client_id", "defense")) for e in map(_mapping, exclusions)]
    return _section("Exclusions", _table(["round", "client", "defense"], rows))


def _accuracy_section(accuracy: Sequence[Any]) -> str:
    """A plot of global-model accuracy per round (missing points skipped); empty if none."""
    xs, ys = _xy((_mapping(a).get("round"), _mapping(a).get("accuracy")) for a in accuracy)
    if not xs:
        return ""
    png = line_plot({"accuracy": (xs, ys)}, "accuracy")
    return _section("Accuracy over rounds", _img(png, "Global model accuracy per round"))


def _perplexity_section(perplexity: Sequence[Any]) -> str:
    """A plot of the global causal LM's held-out perplexity per round; empty if none."""
    xs, ys = _xy((_mapping(p).get("round"), _mapping(p).get("perplexity")) for p in perplexity)
    if not xs:
        return ""
    png = line_plot({"perplexity": (xs, ys)}, "perplexity")
    return _section("Perplexity over rounds", _img(png, "Global model held-out perplexity per round"))


def _confidence(empirical: Mapping[str, Any]) -> str:
    """The audit's confidence as a percentage (``95 %``), or a dash."""
    confidence = _num(empirical.get("confidence"))
    return _MISSING if confidence is None else f"{100 * confidence:g} %"


def _empirical_section(empirical: Mapping[str, Any]) -> str:
    """The one-run empirical audit: the lower bound with its confidence next to the theoretical epsilon.

    A bound above the theoretical epsilon (verdict ``violation``) is shown in a red box: it is a bug.
    """
    if not empirical:
        return ""
    bound = _num(empirical.get("epsilon_lower_bound"))
    theory = _mapping(empirical.get("theoretical_epsilon"))
    sample = empirical.get("level") == "sample"
    label = "theoretical sample-level ε of the canaries' host clients (largest" if sample else "theoretical ε of the audit run ("
    kind = "canary examples (white-box DP-SGD gradients)" if sample else "canary clients"
    rows = [
        ["level", "sample (each training example, DP-SGD)" if sample else "client (each client's data as a whole)"],
        ["empirical ε lower bound", _MISSING if bound is None else f"{bound:.4f}"],
        ["confidence", _confidence(empirical)],
        ["δ", _fmt(empirical.get("delta"))],
        *[[f"{label}, {name})" if sample else f"{label}{name})", _fmt_eps(value)] for name, value in theory.items()],
        [f"{kind} (inserted)", f"{_fmt(empirical.get('canaries'))} ({_fmt(empirical.get('inserted'))})"],
        ["guesses (correct)", f"{_fmt(empirical.get('guesses'))} ({_fmt(empirical.get('correct'))})"],
        ["released rounds", _fmt(empirical.get("released_rounds"))],
        ["audit run", _fmt(empirical.get("audit_run_dir"))],
        ["verdict", _fmt(empirical.get("verdict"))],
    ]
    message = _esc(empirical.get("message", ""))
    if empirical.get("verdict") == "violation":
        verdict = f'<p class="banner">Empirical ε above the theoretical ε: this is a bug. {message}</p>'
    else:
        verdict = f"<p>{message}</p>"
    if sample:
        how = ("with canary examples: each inserted with probability ½ into the DP-SGD of one client drawn at random, "
               "as one more example whose clipped per-example gradient is a secret random direction, sampled at the "
               "client's own rate; it")
    else:
        how = "with canary clients, each inserted with probability ½, and"
    intro = (
        "<p>The one-run audit of Steinke, Nasr and Jagielski (NeurIPS 2023, "
        f"<code>{_esc(empirical.get('paper', ''))}</code>) re-ran this configuration {how} scored the canaries from "
        "the released adapters alone; the lower bound holds at the stated confidence.</p>"
    )
    caveat = f'<p class="caption">{_esc(ATTACK_CAVEAT)}</p>'
    return _section("Empirical audit", intro + "\n" + verdict + "\n" + _table(["quantity", "value"], rows) + "\n" + caveat)
