"""The one place that builds a run's stage plug-ins from the config, server and client alike.

Each stage is looked up by name in its registry and instantiated with the settings of its config
table (``[secure.params]``, ``[privacy.params]``, ``[robustness.params]``, ``[peft.rule_params]``,
``[attack.params]``); the config already checked those against the plug-in's keyword arguments,
and a plug-in's own refusal (a ``ValueError`` from its ``__init__``) becomes a `ConfigError`
naming the key. `Stages.fingerprint` hashes name plus effective settings of the stages both
halves must agree on; the client sends it at Join and the server refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from privacy.dpsgd import DPSGD
from privacy.mechanisms import PrivacyMechanism, create_privacy_mechanism
from privacy.mechanisms.registry import plugin_class as mechanism_class
from protocols.secagg import SecureAggregation, create_secure_aggregation
from protocols.secagg.registry import plugin_class as protocol_class
from robustness.attacks import Attack, create_attack
from robustness.attacks.registry import plugin_class as attack_class
from robustness.defenses import Defense, create_defense
from robustness.defenses.registry import plugin_class as defense_class
from secure_fl.config import Config, Params, resolved_settings
from secure_fl.config.params import is_builtin_plugin
from secure_fl.errors import ConfigError
from secure_fl.peft_agg import AggregationRule, create_rule
from secure_fl.peft_agg.registry import plugin_class as rule_class

#: Stages whose name and settings server and client must share (compared at Join).
FINGERPRINTED = ("secure", "privacy", "rule")
#: Stages that may keep state across rounds (saved with each checkpoint; privacy: adaptive clipping's C).
STATEFUL = ("secure", "defense", "rule", "privacy")
#: The ``JoinRequest.info`` key that carries a stage's fingerprint (``stage.privacy``, ...).
INFO_PREFIX = "stage."

# stage -> (config section, attribute with the name, attribute with the settings, settings table)
_SOURCES: dict[str, tuple[str, str, str, str]] = {
    "secure": ("secure", "mode", "params", "secure.params"),
    "defense": ("robustness", "defense", "params", "robustness.params"),
    "rule": ("peft", "rule", "rule_params", "peft.rule_params"),
    "privacy": ("privacy", "mode", "params", "privacy.params"),
    "attack": ("attack", "kind", "params", "attack.params"),
}
_CREATE: dict[str, Callable[..., Any]] = {
    "secure": create_secure_aggregation,
    "defense": create_defense,
    "rule": create_rule,
    "privacy": create_privacy_mechanism,
    "attack": create_attack,
}
_CLASS: dict[str, Callable[[str], type]] = {
    "secure": protocol_class,
    "defense": defense_class,
    "rule": rule_class,
    "privacy": mechanism_class,
    "attack": attack_class,
}
#: What a user changes to make a stage agree (used in the Join refusal).
CONFIG_TABLES = {
    "secure": "[secure] and [secure.params]",
    "privacy": "[privacy] and [privacy.params]",
    "rule": "[peft] rule and [peft.rule_params]",
}
#: The ``JoinRequest.info`` key holding a DP-SGD client's Poisson sampling rate (a decimal string):
#: ``client.batch_size / its training examples``, capped at 1. The server records it in the ledger;
#: it tells the server the client's example count (``batch_size / rate``).
SAMPLE_RATE_INFO_KEY = "dp_sgd.sample_rate"
#: What else must agree under DP-SGD (its settings are part of the privacy fingerprint).
DP_SGD_TABLES = "[privacy.dp_sgd_params], client.local_steps and client.batch_size"


def build_sample_level(config: Config) -> DPSGD | None:
    """The DP-SGD settings of ``config`` (``None`` without sample-level DP), as ``[privacy.dp_sgd_params]`` says."""
    if not config.privacy.dp_sgd:
        return None
    try:
        return DPSGD(**dict(config.privacy.dp_sgd_params))
    except ValueError as exc:
        raise ConfigError(f"privacy.dp_sgd_params: {exc}", key="privacy.dp_sgd_params") from exc


def sample_level_settings(config: Config, dp_sgd: DPSGD) -> dict[str, Any]:
    """What server and client must agree on for DP-SGD: its settings and the steps and batch size
    that fix each client's sampling rate and step count (part of the privacy fingerprint)."""
    return {
        "noise_multiplier": dp_sgd.noise_multiplier,
        "max_grad_norm": dp_sgd.max_grad_norm,
        "local_steps": config.client.local_steps,
        "batch_size": config.client.batch_size,
    }


def stage_choice(config: Config, kind: str) -> tuple[str, Params, str]:
    """``(plug-in name, its settings, the settings table's key)`` of stage ``kind`` in ``config``."""
    section, name_attr, params_attr, table = _SOURCES[kind]
    values = getattr(config, section)
    return str(getattr(values, name_attr)), Params(getattr(values, params_attr)), table


def build_stage(config: Config, kind: str) -> Any:
    """Instantiate stage ``kind`` (``secure``, ``defense``, ``rule``, ``privacy``, ``attack``) from ``config``."""
    name, params, table = stage_choice(config, kind)
    try:
        return _CREATE[kind](name, **dict(params))
    except (ValueError, TypeError) as exc:
        mentioned = sorted((key for key in params if key in str(exc)), key=len, reverse=True)  # clip_norm over clip
        key = f"{table}.{mentioned[0]}" if mentioned else table
        raise ConfigError(f"{key}: {kind} {name!r} refused its settings: {exc}", key=key) from exc


def settings_of(config: Config, kind: str) -> dict[str, Any]:
    """The effective settings of stage ``kind`` (its defaults, then the config's table)."""
    name, params, _ = stage_choice(config, kind)
    return resolved_settings(_CLASS[kind](name), params)


def settings_fingerprint(name: str, settings: Mapping[str, Any]) -> str:
    """A short SHA-256 of the canonical JSON ``{name, params}``: equal iff name and settings are equal."""
    text = json.dumps({"name": name, "params": dict(settings)}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Stages:
    """The plug-ins of one run, built from the config (shared by server and client halves).

    ``settings`` holds every stage's effective settings (defaults filled in), as configured.
    """

    secure: SecureAggregation
    defense: Defense
    rule: AggregationRule
    privacy: PrivacyMechanism
    attack: Attack
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The noise multiplier calibrated for ``[privacy] target_epsilon`` (`secure_fl.budget`), if any.
    calibration: Any = None
    #: Sample-level DP-SGD on every client (``privacy.dp_sgd``, implied by ``mode = "dp-sgd"``), or ``None``.
    sample_level: DPSGD | None = None

    @classmethod
    def from_config(cls, config: Config) -> Stages:
        """Instantiate every stage with its configured settings; refuse combinations that break a promise."""
        stages = cls(
            secure=build_stage(config, "secure"),
            defense=build_stage(config, "defense"),
            rule=build_stage(config, "rule"),
            privacy=build_stage(config, "privacy"),
            attack=build_stage(config, "attack"),
            settings={kind: settings_of(config, kind) for kind in _SOURCES},
            sample_level=build_sample_level(config),
        )
        if stages.sample_level is not None:
            stages.settings["sample_level"] = sample_level_settings(config, stages.sample_level)
        stages.rule.check_config(config)
        if stages.rule.integer_message and not stages.secure.reveals_individual_updates:
            _wire_integer_inputs(config, stages)
        if stages.rule.needs_individual_updates and not stages.secure.reveals_individual_updates:
            raise ConfigError(
                f"peft.rule={config.peft.rule!r} needs every client's adapter, but secure.mode="
                f"{config.secure.mode!r} only reveals sums; use secure.mode='plain' or a linear rule",
                key="peft.rule",
            )
        if getattr(stages.privacy, "sends_client_reports", False) and not stages.secure.reveals_individual_updates:
            adaptive = bool(stages.settings.get("privacy", {}).get("adaptive_clip"))
            raise ConfigError(
                f"privacy.mode={config.privacy.mode!r} has every client send values with its metrics in the clear"
                + (" (privacy.params.adaptive_clip = true: whether its update was clipped)" if adaptive else "")
                + f", but secure.mode={config.secure.mode!r} sends no per-client metrics in the clear; use "
                "secure.mode='plain'" + (" or turn adaptive_clip off" if adaptive else ""),
                key="privacy.params.adaptive_clip" if adaptive else "privacy.mode",
            )
        if getattr(stages.privacy, "server_noise", False):
            _check_server_noise(config, stages)
        from secure_fl.budget import SamplingPlan, prepare_privacy

        stages.calibration = prepare_privacy(config, stages.privacy)  # the same z on the server and every client
        if stages.calibration is not None and stages.calibration.calibrated:
            stages.settings["privacy"] = {**stages.settings["privacy"], "noise_multiplier": stages.calibration.noise_multiplier}
        check_cohort = getattr(stages.privacy, "check_cohort", None)
        if callable(check_cohort):  # a plug-in written before the hook has none
            expected = min(config.run.clients_per_round, config.run.num_clients)
            if config.run.sampling == "poisson":  # the expected Poisson cohort
                expected = max(1, round(SamplingPlan.from_config(config).expected_cohort))
            try:
                check_cohort(expected)
            except ValueError as exc:
                table = stage_choice(config, "privacy")[2]
                settings = stages.settings.get("privacy", {})
                mentioned = sorted((key for key in settings if key in str(exc)), key=len, reverse=True)
                key = f"{table}.{mentioned[0]}" if mentioned else table
                raise ConfigError(
                    f"{key}: privacy {config.privacy.mode!r} with run.clients_per_round={config.run.clients_per_round}: {exc}",
                    key=key,
                ) from None
        if getattr(stages.privacy, "client_noise", False):
            _wire_client_noise(config, stages)
        return stages

    def bind_update(self, *, num_values: int, cohort_size: int) -> None:
        """Tell the stages the update's size once the server built the model (distributed DP needs it).

        The protocol re-checks the planned cohort with the noise headroom for ``num_values``
        values (a `ConfigError` naming the settings to change when a bucket needs more than
        32-bit words), and the mechanism learns what it accounts each release with. No-op unless
        the clients add noise.
        """
        if not getattr(self.privacy, "client_noise", False):
            return
        try:
            self.secure.check_cohort(cohort_size, num_values=num_values)  # type: ignore[call-arg]
        except ValueError as exc:
            raise ConfigError(f"[secure] with privacy.mode={self.privacy.name!r}: {exc}",
                              key="secure.params.precision") from None
        self.privacy.bind(  # type: ignore[attr-defined]
            step=self.secure.quantisation_step, buckets=self.secure.noise_buckets,  # type: ignore[attr-defined]
            num_values=num_values, cohort_size=cohort_size,
        )

    def describe(self) -> dict[str, dict[str, Any]]:
        """Every stage's name, plug-in class and settings, for ``run.json`` and the audit report."""
        out = {kind: describe_stage(getattr(self, kind), self.settings.get(kind)) for kind in _SOURCES}
        if self.sample_level is not None:
            out["sample_level"] = describe_stage(self.sample_level, self.settings.get("sample_level"))
        return out

    def names(self) -> dict[str, str]:
        """Stage names as sent to clients in every task."""
        return {
            "secure": self.secure.name,
            "defense": self.defense.name,
            "rule": self.rule.name,
            "privacy": self.privacy.name,
        }

    def fingerprint(self) -> dict[str, str]:
        """Per stage in `FINGERPRINTED`: a hash of its name and effective settings."""
        out = {}
        for kind in FINGERPRINTED:
            stage = getattr(self, kind)
            settings = self.settings.get(kind)
            if settings is None:
                settings = resolved_settings(type(stage), {})
            if kind == "privacy" and "sample_level" in self.settings:  # unchanged without DP-SGD
                settings = {**settings, "dp_sgd": self.settings["sample_level"]}
            out[kind] = settings_fingerprint(str(stage.name), settings)
        return out

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """The state every stateful stage keeps across rounds (``{}`` for a stateless one)."""
        return {kind: dict(getattr(self, kind).state_dict()) for kind in STATEFUL}

    def load_state_dict(self, states: Mapping[str, Mapping[str, Any]]) -> None:
        """Put back what `state_dict` returned (for example from a checkpoint)."""
        unknown = set(states) - set(STATEFUL)
        if unknown:
            raise ValueError(f"no stateful stage named {sorted(unknown)}; stages with state: {', '.join(STATEFUL)}")
        for kind, state in states.items():
            getattr(self, kind).load_state_dict(dict(state))




def _check_server_noise(config: Config, stages: Stages) -> None:
    """Refuse what breaks central DP: a sum-only secure mode, or a defense that drops or re-weights rows."""
    mode = config.privacy.mode
    uniform = getattr(stages.secure, "enable_uniform_weights", None)
    if not stages.secure.reveals_individual_updates and callable(uniform):
        # Homomorphic sums: the clients clip and encrypt with weight 1, the server adds the noise
        # to the decrypted sum, which it (trusted under central DP) sees, as in plain mode.
        uniform()
    elif not stages.secure.reveals_individual_updates:
        raise ConfigError(
            f"privacy.mode={mode!r} has the server add the noise, so with secure.mode={config.secure.mode!r} "
            "the server would still see the noise-free sum (and the protocol's weighted bucket sums cannot be "
            f"re-weighted equally); secure.mode={config.secure.mode!r} needs a distributed mechanism, where "
            f"clients add the noise; use secure.mode='plain' with privacy.mode={mode!r}",
            key="privacy.mode",
        )
    if stages.defense.name != "none":
        raise ConfigError(
            f"robustness.defense={config.robustness.defense!r} drops or re-weights rows depending on the other "
            f"clients, so privacy.mode={mode!r} could not bound one client's influence on the noised sum by "
            "privacy.params.clip_norm; use robustness.defense='none'",
            key="robustness.defense",
        )
    if config.robustness.reputation:
        raise ConfigError(
            f"robustness.reputation re-weights rows by how they agree with the other clients, so privacy.mode="
            f"{mode!r} could not bound one client's influence on the noised sum by privacy.params.clip_norm; "
            "set robustness.reputation = false (or use privacy.mode='distributed' under secagg+, where the "
            "reputation only post-processes noised bucket sums)",
            key="robustness.reputation",
        )


def _wire_integer_inputs(config: Config, stages: Stages) -> None:
    """A rule whose messages are integers (votes) under a secure mode: that mode must sum them exactly."""
    enable = getattr(stages.secure, "enable_integer_inputs", None)
    if enable is None:
        raise ConfigError(
            f"peft.rule={config.peft.rule!r} sends integers whose exact sum it needs, but secure.mode="
            f"{config.secure.mode!r} cannot sum integers exactly; use secure.mode='secagg+' or 'plain'",
            key="secure.mode",
        )
    enable()


def _wire_client_noise(config: Config, stages: Stages) -> None:
    """Distributed DP: refuse a protocol that cannot carry client noise, then connect the two plug-ins.

    The protocol reserves the mechanism's noise headroom in every plan (and, with uniform weights,
    plans for weight 1); the mechanism learns the protocol's quantisation step and bucket split.
    ``privacy`` and ``protocols`` never import each other: this is where they meet.
    """
    mode = config.privacy.mode
    enable = getattr(stages.secure, "enable_distributed_noise", None)
    if enable is None:
        raise ConfigError(
            f"privacy.mode={mode!r} has every client add its share of integer noise inside the masked sum, which "
            f"needs a protocol that quantises to integers and reveals only noised sums; secure.mode="
            f"{config.secure.mode!r} does not; use secure.mode='secagg+' (or privacy.mode='central' with "
            "secure.mode='plain')",
            key="secure.mode",
        )
    try:
        enable(headroom=stages.privacy.noise_headroom, uniform_weights=stages.privacy.uniform_weights)  # type: ignore[attr-defined]
    except ValueError as exc:
        raise ConfigError(f"secure.params.precision: {exc}", key="secure.params.precision") from None
    stages.privacy.bind(step=stages.secure.quantisation_step, buckets=stages.secure.noise_buckets)  # type: ignore[attr-defined]


def describe_stage(stage: object, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Name, plug-in class, whether it ships with secure-fl, paper and JSON-safe parameters.

    Parameters are the stage's effective ``settings`` when given (what the config set, defaults
    filled in), merged with its ``describe()`` when it has one; without ``settings``, its
    ``describe()`` or else its public scalar attributes, so a user plug-in shows up in the report
    with its settings without extra code.
    """
    cls = type(stage)
    describe = getattr(stage, "describe", None)
    raw: dict[str, Any]
    if callable(describe):
        raw = dict(describe())
        if settings is not None:
            raw = {**raw, **{k: v for k, v in settings.items() if k not in raw}}
    elif settings is not None:
        raw = dict(settings)
    else:  # public settings only: numbers, strings, flags (never arrays or other state)
        raw = {k: v for k, v in vars(stage).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))}
    described = {
        "name": str(getattr(stage, "name", cls.__name__)),
        "plugin": f"{cls.__module__}.{cls.__qualname__}",
        "builtin": is_builtin_plugin(cls),
        "paper": str(getattr(cls, "paper", "") or ""),
        "params": json.loads(json.dumps(raw, default=str)),
    }
    sends = getattr(cls, "sends", None)
    if isinstance(sends, str):  # a PEFT rule: what each client's message holds (the report's threat model)
        described["sends"] = sends
    return described
