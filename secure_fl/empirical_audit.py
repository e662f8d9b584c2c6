"""``secure-fl audit RUN_DIR --empirical``: the one-run empirical privacy audit with canary clients or examples.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
https://arxiv.org/abs/2305.08846), at the user level: the auditor re-runs RUN_DIR's config in
simulation, in ``RUN_DIR/empirical-audit`` (its own run directory, ledger and report), with ``m``
**canary clients** next to the honest ones. Each canary is inserted independently with
probability 1/2 (a coin from `secrets`); an inserted canary is a real `FederatedClient` running
the whole client path (clip, noise share, protocol, upload), whose "training" returns a fixed
secret random direction ``u_i``, scaled to the clip norm ``C`` (per tensor ``C / sqrt(k)`` with
``clip = "per-tensor"``; norm 1 without clipping), in every round it takes part in. The honest
parties train as usual.

The attack sees only what is released: the score of canary i is ``sum_t <Delta_t, u_i>`` over the
released rounds, ``Delta_t`` the change of the global adapter (the update tensors) in round t.
`privacy.audit.empirical.one_run_audit` turns the scores and the coins into the lower bound ``eps_lb``
at confidence ``1 - beta`` and at the run's delta; the theoretical epsilon is the audit run's own
ledger at the same delta (the smallest over its accountants: every one is a valid upper bound).
``RUN_DIR/empirical_audit.json`` holds both, the guesses, every canary's coin and score, and a
verdict; the run's privacy report (rebuilt here) shows them. A bound above the theoretical
epsilon is a bug (it happens by chance with probability at most beta), and is reported as one.

Cohorts: every party of the audit run is counted in ``run.num_clients``; with full participation
(``clients_per_round = num_clients``) so is the audit, otherwise the cohort grows in proportion,
keeping the sampling rate. Every mechanism of the `PrivacyMechanism` interface clips and noises
whole client updates, so canary clients test it.

Sample level (`SAMPLE_LEVEL_MODES`, ``privacy.mode = "dp-sgd"``): the guarantee is per training
example, so the canaries are **canary examples** (`CanaryExamples`, white-box gradient canaries):
each of the ``m`` canaries is inserted with probability 1/2 and hosted by one honest party drawn
at random (`secrets`-seeded). An inserted canary is one more example of its host whose per-example
gradient is the fixed secret direction ``-C u_i`` (C = ``max_grad_norm``, so it sits on the clip
bound; the minus sign makes a descent step move the adapter along ``+u_i``): every DP-SGD step of
the host includes it independently with the host's Poisson rate q, and adds it to the sum of
clipped gradients before the noise (`privacy.dpsgd.DPSGD.train`). The host's q, its steps and its
normalising ``q n`` stay those of its n real examples, so its accounted sample-level epsilon is
exactly the guarantee for each canary (one more example of a neighbouring data set); no party is
added. The score and the bound are as above; the theoretical epsilon is the largest sample-level
epsilon of the parties that host an inserted canary (the audit run's report, per accountant; the
smallest accountant is compared). AdamW's per-coordinate scaling comes after the noise
(post-processing): it can only weaken the attack, and the bound stays valid.

Combined DP (a client-level mode with ``privacy.dp_sgd = true``) is audited at the client level,
with canary clients (which do not train, so DP-SGD does not touch them), against the client-level
epsilon; a sample-level audit of a combined run is not offered.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from privacy.audit.empirical import ATTACK_CAVEAT, EMPIRICAL_FILE, EMPIRICAL_SCHEMA, PAPER, one_run_audit
from privacy.dpsgd import DPSGD
from privacy.errors import PrivacyError
from privacy.ledger import PrivacyLedger, epsilon_from_json, epsilon_to_json
from secure_fl.audit import AuditReport, audit
from secure_fl.callbacks import Callback
from secure_fl.client.trainer import LocalTrainer
from secure_fl.config import Config
from secure_fl.errors import ConfigError, RunError
from secure_fl.stages import settings_of

__all__ = [
    "AUDIT_DIR", "SAMPLE_LEVEL_MODES", "AUDIT_FILE", "SCHEMA", "CanaryClients", "CanaryExamples", "CanaryTrainer",
    "EmpiricalAudit", "audit_config", "audit_level", "check_auditable", "run_empirical_audit",
]  # fmt: skip

SCHEMA = EMPIRICAL_SCHEMA
#: The audit run's directory and the result file, inside RUN_DIR.
AUDIT_DIR = "empirical-audit"
AUDIT_FILE = EMPIRICAL_FILE
#: Privacy modes whose guarantee is per training example: audited with canary *examples* (`CanaryExamples`).
SAMPLE_LEVEL_MODES = ("dp-sgd",)
#: The canaries' norm when the mechanism does not clip (``privacy.mode = none``).
UNCLIPPED_NORM = 1.0


class CanaryTrainer(LocalTrainer):
    """A canary party's trainer: it trains nothing and returns its fixed message every round.

    Shares the honest template's workload, model, rule and update keys, so it presents the same
    model fingerprint at Join and its message has the shapes the server expects.
    """

    def __init__(self, template: LocalTrainer, message: Mapping[str, np.ndarray], *, num_examples: int) -> None:
        super().__init__(
            template.workload, template.adapted, template.data, update_keys=template.update_keys,
            num_examples=num_examples, rule=template.rule,
        )
        self.message = {k: np.asarray(v, dtype=np.float32) for k, v in message.items()}

    def train(self, global_state: Mapping[str, np.ndarray], plan: Mapping[str, float], *, seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The canary's direction, whatever the global adapter (no local training, no metrics)."""
        return {k: v.copy() for k, v in self.message.items()}, {}


class CanaryClients(Callback):
    """``m`` canaries: their secret coins and directions, the inserted ones' trainers, and their scores.

    Pass it to `secure_fl.simulation.simulate` as ``extra_parties`` (it builds the inserted
    canaries' trainers) and as a callback (after every released round it adds ``<Delta_t, u_i>`` to
    each canary's score, reading the released global adapter).

    Parameters
    ----------
    canaries:
        m, the number of canaries (inserted or not).
    norm:
        The L2 norm of each canary's update (the clip norm C).
    per_tensor:
        Give each of the k update tensors norm ``norm / sqrt(k)`` (per-tensor clipping) instead.
    inserted:
        The coins (testing only); by default each canary is inserted with probability 1/2 from `secrets`.
    """

    def __init__(self, canaries: int, *, norm: float, per_tensor: bool = False, inserted: Sequence[bool] | None = None) -> None:
        if isinstance(canaries, bool) or not isinstance(canaries, int) or canaries < 1:
            raise ValueError(f"canaries must be an integer >= 1, got {canaries!r}")
        if not (isinstance(norm, (int, float)) and 0 < norm < math.inf):
            raise ValueError(f"the canary norm must be a finite number > 0, got {norm!r}")
        bits = secrets.randbits(canaries)
        coins = [bool(bits >> i & 1) for i in range(canaries)] if inserted is None else [bool(b) for b in inserted]
        if len(coins) != canaries:
            raise ValueError(f"inserted has {len(coins)} coins for {canaries} canaries")
        self.inserted = np.array(coins, dtype=bool)
        self.count = int(self.inserted.sum())
        self.norm = float(norm)
        self.per_tensor = per_tensor
        self.scores = np.zeros(canaries)
        self.released_rounds = 0
        self._rng = np.random.default_rng(secrets.randbits(128))
        self._server: Any = None
        self._keys: list[str] = []
        self._directions = np.zeros((canaries, 0), dtype=np.float32)  # unit vectors u_i, one row per canary
        self._previous = np.zeros(0)

    def build(self, server: Any, honest: Sequence[LocalTrainer]) -> list[CanaryTrainer]:
        """Draw every canary's direction over the update tensors; return the inserted canaries' trainers."""
        if not honest:
            raise RunError("the empirical audit needs at least one honest party as a template")
        template = honest[0]
        state = server.global_state
        self._server, self._keys = server, list(template.update_keys)
        shapes = [np.shape(state[k]) for k in self._keys]
        sizes = np.array([int(np.prod(s)) for s in shapes])
        raw = self._rng.standard_normal((self.scores.size, int(sizes.sum())))
        if self.per_tensor:  # each tensor of each canary gets norm C / sqrt(k)
            starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
            segment = np.sqrt(np.add.reduceat(raw * raw, starts, axis=1))
            raw /= np.repeat(segment, sizes, axis=1) * math.sqrt(len(sizes))
        else:
            raw /= np.linalg.norm(raw, axis=1, keepdims=True)
        self._directions = raw.astype(np.float32)  # unit norm in both cases
        self._previous = self._flat(state)
        examples = max(1, int(round(float(np.mean([t.num_examples for t in honest])))))  # a typical party's count
        trainers = []
        for row in np.flatnonzero(self.inserted):
            pieces = np.split(self._directions[row].astype(np.float64) * self.norm, np.cumsum(sizes)[:-1])
            message = {k: p.reshape(s) for k, p, s in zip(self._keys, pieces, shapes)}
            trainers.append(CanaryTrainer(template, message, num_examples=examples))
        return trainers

    def _flat(self, state: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.concatenate([np.asarray(state[k], dtype=np.float64).reshape(-1) for k in self._keys])

    def on_round_end(self, record: dict[str, Any]) -> bool | None:
        """After a release: add ``<Delta_t, u_i>`` to every canary's score (a failed round released nothing)."""
        if record.get("status", "ok") != "ok" or self._server is None:
            return None
        current = self._flat(self._server.global_state)
        self.scores += self._directions.astype(np.float64) @ (current - self._previous)
        self._previous = current
        self.released_rounds += 1
        return None


class CanaryExamples(CanaryClients):
    """``m`` canary examples for a DP-SGD run: white-box gradient canaries inside honest parties' training.

    Pass it to `secure_fl.simulation.simulate` as ``extra_parties`` (it adds no party: `build`
    hands each honest trainer its inserted canaries' gradients, `LocalTrainer.canaries`) and as a
    callback (the scores, as for canary clients: ``sum_t <Delta_t, u_i>`` over the released
    update tensors). Canary i's per-example gradient is ``-norm * u_i``, ``u_i`` a secret unit
    direction over the update tensors (zero on trainable tensors that do not travel), so a descent
    step moves the released adapter along ``+u_i``.

    Parameters
    ----------
    canaries:
        m, the number of canaries (inserted or not).
    norm:
        The L2 norm of each canary's gradient: DP-SGD's ``max_grad_norm`` C (the per-example clip bound).
    inserted:
        The coins (testing only); by default each canary is inserted with probability 1/2 from `secrets`.
    """

    def __init__(self, canaries: int, *, norm: float, inserted: Sequence[bool] | None = None) -> None:
        super().__init__(canaries, norm=norm, inserted=inserted)
        #: No extra parties: the canaries live inside the honest parties.
        self.count = 0
        #: The honest party (its index, ``client-<i>``) that hosts each canary, inserted or not.
        self.hosts = np.zeros(canaries, dtype=np.int64)

    def build(self, server: Any, honest: Sequence[LocalTrainer]) -> list[CanaryTrainer]:
        """Draw every canary's direction and host; give each host its inserted canaries' gradients; no trainers.

        Raises `ConfigError` when a party does not train with DP-SGD, or when the rule's messages
        are not the model's trainable tensors (a canary gradient would have no released image).
        """
        if not honest:
            raise RunError("the sample-level empirical audit needs at least one party to host its canaries")
        template = honest[0]
        if any(t.dp_sgd is None for t in honest):
            raise ConfigError("canary examples need DP-SGD on every party", key="privacy.dp_sgd")
        names = [n for n, p in template.adapted.model.named_parameters() if p.requires_grad]
        sizes = np.array([int(p.numel()) for p in template.adapted.model.parameters() if p.requires_grad])
        state = server.global_state
        travel = set(template.update_keys)
        if not travel <= set(names) or any(np.size(state[k]) != sizes[names.index(k)] for k in travel):
            raise ConfigError(
                f"peft.rule = {template.rule.name!r} sends tensors other than the trained ones "
                f"({sorted(travel - set(names))[:3]}): canary examples need a rule whose messages are the trained "
                "tensors (fedit)", key="peft.rule",
            )
        self._server, self._keys = server, [n for n in names if n in travel]
        mask = np.repeat([n in travel for n in names], sizes)  # the trainable coordinates that are released
        raw = self._rng.standard_normal((self.scores.size, int(mask.sum())))
        raw /= np.linalg.norm(raw, axis=1, keepdims=True)
        self._directions = raw.astype(np.float32)  # unit u_i over the released tensors, in `_keys` order
        self._previous = self._flat(state)
        self.hosts = self._rng.integers(len(honest), size=self.scores.size)
        gradients = np.zeros((self.scores.size, int(sizes.sum())))
        gradients[:, mask] = -self.norm * raw
        for index, trainer in enumerate(honest):
            rows = gradients[self.inserted & (self.hosts == index)]
            trainer.canaries = rows if len(rows) else None
        return []

    def host_epsilon(self, report_json: Path | None) -> dict[str, float]:
        """Per accountant, the largest sample-level epsilon over the parties hosting an inserted canary.

        Read from the audit run's report (each client row's ``sample_level.epsilon``); a host
        without accounted steps is skipped, an unbounded epsilon (``noise_multiplier = 0``) is inf.
        """
        if report_json is None or not report_json.is_file():
            raise RunError("the audit run wrote no privacy report: its sample-level epsilon is unknown")
        report = json.loads(report_json.read_text(encoding="utf-8"))
        hosts = {f"client-{int(h)}" for h in self.hosts[self.inserted]}
        worst: dict[str, float] = {}
        for row in report.get("clients", []):
            if str(row.get("client_id")) not in hosts or not dict(row.get("sample_level") or {}).get("steps"):
                continue
            for name, value in dict(row["sample_level"].get("epsilon", {})).items():
                worst[name] = max(worst.get(name, -math.inf), epsilon_from_json(value))
        return worst


@dataclass(frozen=True)
class EmpiricalAudit:
    """The result of `run_empirical_audit`: the parsed ``empirical_audit.json`` and where it is."""

    data: dict[str, Any]
    path: Path
    #: The audited run's privacy report, rebuilt with the result.
    report: AuditReport

    @property
    def violation(self) -> bool:
        """Whether the lower bound exceeds the theoretical epsilon (a bug, or a 1 - confidence fluke)."""
        return bool(self.data["verdict"] == "violation")


def audit_config(config: Config, inserted: int) -> Config:
    """The audit run's config: ``inserted`` more parties, the cohort grown to keep the sampling rate, no nested audit."""
    run = config.run
    total = run.num_clients + inserted
    if run.clients_per_round >= run.num_clients:
        cohort = total
    else:
        cohort = min(total, math.ceil(run.clients_per_round * total / run.num_clients))
    privacy = replace(config.privacy, audit=False)
    # the canaries read the honest parties' trainers, which only the in-process backend keeps
    simulation = replace(config.simulation, backend="in-process")
    return config.replace(run=replace(run, num_clients=total, clients_per_round=cohort), privacy=privacy,
                          simulation=simulation)


def audit_level(config: Config) -> str:
    """``"sample"`` for the sample-level modes (canary examples), ``"client"`` for every other mode (canary clients)."""
    return "sample" if config.privacy.mode in SAMPLE_LEVEL_MODES else "client"


def check_auditable(config: Config) -> None:
    """Refuse a config the empirical audit cannot re-run (`ConfigError` naming the key).

    Every privacy mode is auditable: the client-level ones with canary clients, ``dp-sgd`` with
    canary examples; the checks that depend on the model (a rule whose messages are not the
    trained tensors) run when the audit run is built.
    """
    if audit_level(config) == "sample" and not config.privacy.dp_sgd:  # the resolved config always sets it
        raise ConfigError(f"privacy.mode = {config.privacy.mode!r} without DP-SGD", key="privacy.dp_sgd")


def run_empirical_audit(
    run_dir: str | Path, *, canaries: int | None = None, confidence: float = 0.95, progress: bool = True
) -> EmpiricalAudit:
    """Re-run ``run_dir``'s config with canaries and write ``run_dir/empirical_audit.json``.

    Canary clients for the client-level modes, canary examples in DP-SGD for ``privacy.mode =
    "dp-sgd"`` (`audit_level`); the JSON's ``level`` says which.

    Raises `RunError` when ``run_dir`` is not a run directory (no ``config.toml``) or already holds
    an audit run, and `ConfigError` when its config cannot be read or cannot be audited (too few
    canaries, a rule whose messages are not the trained tensors under DP-SGD). The run's privacy
    report is rebuilt with the result.
    """
    path = Path(run_dir)
    config_path = path / "config.toml"
    if not config_path.is_file():
        raise RunError(f"{path} is not a run directory: {config_path.name} is missing (pass the --out of a run)")
    try:
        config = Config.from_toml(config_path)
    except tomllib.TOMLDecodeError as exc:
        raise RunError(f"{config_path}: not valid TOML ({exc})") from None
    check_auditable(config)
    m = config.privacy.audit_canaries if canaries is None else canaries
    if isinstance(m, bool) or not isinstance(m, int) or m < 10:
        raise ConfigError(f"--canaries must be an integer >= 10, got {m!r}", key="privacy.audit_canaries")
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise ConfigError(f"--confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    out = path / AUDIT_DIR
    if (out / "metrics.jsonl").exists() or (out / "ledger.jsonl").exists():
        raise RunError(f"{out} already holds an audit run; move or delete it to audit {path} again")
    from secure_fl.simulation import simulate

    design: CanaryClients
    if audit_level(config) == "sample":
        norm = float(DPSGD(**dict(config.privacy.dp_sgd_params)).max_grad_norm)
        design = CanaryExamples(m, norm=norm)
        if progress:
            print(f"empirical audit of {path}: {m} canary examples ({int(design.inserted.sum())} inserted) in the "
                  f"DP-SGD of {config.run.num_clients} parties; audit run in {out}", flush=True)
        result = simulate(audit_config(config, 0), out, extra_parties=design, callbacks=[design], progress=progress)
    else:
        settings = settings_of(config, "privacy")
        clip_norm = settings.get("clip_norm")
        norm = float(clip_norm) if isinstance(clip_norm, (int, float)) and not isinstance(clip_norm, bool) else UNCLIPPED_NORM
        design = CanaryClients(m, norm=norm, per_tensor=settings.get("clip") == "per-tensor")
        if progress:
            print(f"empirical audit of {path}: {m} canary clients ({design.count} inserted) next to "
                  f"{config.run.num_clients} parties; audit run in {out}", flush=True)
        result = simulate(audit_config(config, design.count), out, extra_parties=design, callbacks=[design], progress=progress)
    if design.released_rounds == 0:
        raise RunError(f"the audit run in {out} released no round, so there is nothing to audit")
    stats = one_run_audit(design.scores, design.inserted, delta=config.privacy.delta, beta=1.0 - confidence)
    if isinstance(design, CanaryExamples):
        theory = design.host_epsilon(result.report_json)
    else:
        theory = result.epsilon
    data = _summary(stats, theory, config, design, path)
    target = path / AUDIT_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    report = audit(path)  # the run's report now shows the empirical audit
    return EmpiricalAudit(data, target, report)


def _summary(stats: Any, theory: Mapping[str, float], config: Config, design: CanaryClients, path: Path) -> dict[str, Any]:
    """The JSON record of one audit (see `run_empirical_audit`)."""
    eps_lb = stats.epsilon_lower_bound
    bound = min(theory.values()) if theory else math.inf
    level = "sample-level " if isinstance(design, CanaryExamples) else ""
    if eps_lb > bound + 1e-9:
        verdict = "violation"
        message = (
            f"BUG: the empirical lower bound {eps_lb:.4f} exceeds the theoretical {level}epsilon {bound:.4f} at delta = "
            f"{stats.delta:g}: the run leaks more than its accounting says (or, with probability at most "
            f"{stats.beta:g}, a fluke of the canaries' coins); do not trust this configuration's epsilon."
        )
    elif math.isinf(bound):
        verdict = "no-guarantee"
        message = (f"No {level}differential-privacy guarantee (theoretical epsilon unbounded); the canaries show at least "
                   f"epsilon {eps_lb:.4f}.")
    else:
        verdict = "consistent"
        message = f"The lower bound {eps_lb:.4f} is at most the theoretical {level}epsilon {bound:.4f}, as it must be."
    examples = isinstance(design, CanaryExamples)
    return {
        "schema": SCHEMA,
        "method": "one-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023) with "
                  + ("white-box gradient canary examples in DP-SGD" if examples else "canary clients"),
        "level": "sample" if examples else "client",
        "canary_kind": "gradient-example" if examples else "client",
        "paper": PAPER,
        "epsilon_lower_bound": eps_lb,
        "confidence": stats.confidence,
        "delta": stats.delta,
        "theoretical_epsilon": {k: epsilon_to_json(v) for k, v in theory.items()},
        "theoretical_epsilon_min": epsilon_to_json(bound),
        "run_epsilon": _run_epsilon(path),
        "verdict": verdict,
        "message": message,
        "caveat": ATTACK_CAVEAT,
        "canaries": stats.canaries,
        "inserted": stats.inserted,
        "guesses": stats.guesses,
        "correct": stats.correct,
        "guesses_in": stats.guesses_in,
        "guesses_out": stats.guesses_out,
        "guess_grid": [list(pair) for pair in stats.grid],
        "canary_norm": design.norm,
        "canary_clip": "per-example" if examples else "per-tensor" if design.per_tensor else "flat",
        "theoretical_epsilon_of": ("the largest sample-level epsilon over the parties hosting an inserted canary"
                                   if examples else "the audit run's client-level epsilon"),
        **({"canary_hosts": [f"client-{int(h)}" for h in design.hosts]} if isinstance(design, CanaryExamples) else {}),
        "released_rounds": design.released_rounds,
        "privacy_mode": config.privacy.mode,
        "audit_run_dir": AUDIT_DIR,
        "score": "sum over released rounds of <change of the global adapter, canary direction>",
        "canary_coins": [bool(b) for b in design.inserted],
        "canary_scores": [float(s) for s in design.scores],
    }


def _run_epsilon(path: Path) -> dict[str, float | None]:
    """The audited run's own final epsilon per accountant (its ledger), for context."""
    try:
        entries = PrivacyLedger(path / "ledger.jsonl").entries()
    except (PrivacyError, OSError, ValueError):  # `secure_fl.audit` checks the ledger; here it is context only
        return {}
    return {k: epsilon_to_json(epsilon_from_json(v)) for k, v in entries[-1]["epsilon"].items()} if entries else {}

