"""The sample-level (DP-SGD) part of the privacy audit report.

Each ledger line of a run with DP-SGD holds ``sample_level``: client id -> ``{noise_multiplier,
sample_rate, steps}``, one event per client whose DP-SGD output the server saw in that round. A
round that released nothing (failed, interrupted) but in which the server still saw DP-SGD outputs
(their uploads in a mode that reveals updates, or bucket sums it unmasked) carries the same field in
its ``metrics.jsonl`` record; those count too, since DP-SGD protects the examples against the
server. A client's sample-level epsilon composes its own events in round order with every
configured accountant (each step a Poisson-subsampled Gaussian with the client's own q): the
guarantee for any one of its training examples, against everyone. The report shows it per client
and its maximum over clients.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from privacy.accounting import Accountant, GaussianEvent, create_accountant
from privacy.errors import PrivacyError
from privacy.ledger import epsilon_to_json, sample_level_events

#: What DP-SGD protects and what it does not, as the report says it.
PROTECTS = (
    "each single training example of a client: adding or removing one example changes the distribution of "
    "everything the client sends, and all that is computed from it (the server's view, the released adapters), "
    "by at most the client's sample-level epsilon; against everyone, the server included"
)
DOES_NOT_PROTECT = (
    "a client's data as a whole or many of its examples together (a group of k examples costs about k times "
    "more); the client's sampling rate, which it declares at Join and which tells its example count; metrics "
    "it sends in the clear (held-out evaluation with client.eval_fraction > 0)"
)


def sample_level_report(
    *,
    stages: Mapping[str, Mapping[str, Any]],
    ledger: Sequence[Mapping[str, Any]],
    metrics: Sequence[Mapping[str, Any]],
    clients: Sequence[MutableMapping[str, Any]],
    accountants: Sequence[str],
    delta: float,
) -> dict[str, Any] | None:
    """The report's ``sample_level`` section (``None`` for a run without DP-SGD); fills each client
    row's ``sample_level`` (steps, sampling rates and epsilon per accountant)."""
    settings = dict(dict(stages.get("sample_level", {})).get("params", {}))
    released = [(int(e["round"]), sample_level_events(e)) for e in ledger]
    unreleased = [(int(m["round"]), sample_level_events(m)) for m in metrics
                  if m.get("status", "ok") != "ok" and m.get("sample_level")]
    if not settings and not any(events for _, events in released + unreleased):
        return None
    history: dict[str, list[GaussianEvent]] = {}
    for _, round_events in sorted(released + unreleased, key=lambda item: item[0]):
        for client, event in round_events.items():
            history.setdefault(client, []).append(event)
    cache: dict[tuple[Any, ...], tuple[float | None, str | None]] = {}
    maximum: dict[str, float | None] = {}
    for row in clients:
        events = history.get(str(row["client_id"]), [])
        epsilon: dict[str, float | None] = {}
        notes: dict[str, str] = {}
        for name in accountants if events else ():
            try:
                epsilon[name], note = _epsilon(name, events, delta, cache)
            except PrivacyError:  # this accountant cannot bound it; the others still report
                continue
            if note:
                notes[name] = note
        row["sample_level"] = {
            "steps": sum(e.steps for e in events),
            "rounds": len(events),
            "sample_rates": sorted({e.sample_rate for e in events}),
            "epsilon": epsilon,
            **({"epsilon_notes": notes} if notes else {}),
        }
        for name, value in epsilon.items():
            maximum[name] = value if name not in maximum else _larger(maximum[name], value)
    return {
        "mechanism": "dp-sgd",
        "guarantee": settings.get("guarantee", "sample-level (epsilon, delta)-DP"),
        "noise_multiplier": settings.get("noise_multiplier"),
        "max_grad_norm": settings.get("max_grad_norm"),
        "local_steps": settings.get("local_steps"),
        "batch_size": settings.get("batch_size"),
        "sampling": settings.get("sampling"),
        "delta": delta,
        "max_epsilon": maximum,
        "clients_accounted": len(history),
        "unreleased_rounds": sorted({r for r, events in unreleased if events}),
        "protects": PROTECTS,
        "does_not_protect": DOES_NOT_PROTECT,
    }


def _larger(a: float | None, b: float | None) -> float | None:
    """The larger of two epsilons, ``None`` (unbounded) above every number."""
    return None if a is None or b is None else max(a, b)


def _epsilon(name: str, events: Sequence[GaussianEvent], delta: float,
             cache: dict[tuple[Any, ...], tuple[float | None, str | None]]) -> tuple[float | None, str | None]:
    """Epsilon of ``events`` with accountant ``name`` (``None``: unbounded) and its fallback note
    (PRV -> RDP), if any; clients with the same history share one computation through ``cache``."""
    key = (name, tuple((e.noise_multiplier, e.sample_rate, e.steps) for e in events))
    if key not in cache:
        accountant: Accountant = create_accountant(name)
        for event in events:
            accountant.compose(event)
        spent = accountant.get_privacy_spent(delta)
        cache[key] = (epsilon_to_json(spent.epsilon), spent.note)
    return cache[key]


def sample_level_threat_row(section: Mapping[str, Any]) -> dict[str, str]:
    """The threat-model row of DP-SGD: who it protects the examples from, and what it leaves out."""
    worst = ", ".join(f"{name} {'unbounded' if v is None else f'{float(v):.4f}'}"
                      for name, v in dict(section.get("max_epsilon", {})).items())
    return {
        "party": "everyone, the server included",
        "sees": "anything computed from one client's training examples (its updates, sums, released adapters); "
                "each client's DP-SGD sampling rate, declared at Join (it tells the client's example count)",
        "protected_by": f"DP-SGD on the client: sample-level (epsilon, delta)-DP of each training example "
                        f"(largest per-client epsilon: {worst or 'none accounted'}); not a client's data as a whole",
    }


def sample_level_warnings(mode: str, section: Mapping[str, Any]) -> list[dict[str, str]]:
    """What a privacy officer must know about a run with DP-SGD (``mode``: the run's ``privacy.mode``)."""
    out: list[dict[str, str]] = []
    if mode == "dp-sgd":
        out.append(_warn(
            "no-client-level-dp", "medium",
            "privacy.mode = dp-sgd: every single training example is protected (sample-level DP), but a client's "
            "data as a whole is not: the client-level epsilon is unbounded; combine a client-level mode with "
            "privacy.dp_sgd = true for both guarantees",
        ))
    if not section.get("noise_multiplier"):
        out.append(_warn("dp-sgd-no-noise", "high", "privacy.dp_sgd_params.noise_multiplier = 0: DP-SGD adds no "
                         "noise, so the sample-level epsilon is unbounded"))
    if section.get("unreleased_rounds"):
        rounds = ", ".join(map(str, section["unreleased_rounds"]))
        out.append(_warn(
            "sample-level-unreleased", "info",
            f"round(s) {rounds} released nothing, but the server saw DP-SGD outputs in them; their steps are counted "
            "in the sample-level epsilon (read from metrics.jsonl, which is not hash-chained like the ledger)",
        ))
    return out


def _warn(code: str, severity: str, message: str) -> dict[str, str]:
    return {"code": code, "severity": severity, "message": message}
