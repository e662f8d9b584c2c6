"""Run configuration: frozen, validated dataclasses mirroring the TOML sections.

A config is read from a TOML file or a bundled preset, optionally changed with
``--set section.key=value`` overrides, validated once, and written back resolved to the run
directory. Unknown keys and bad values raise `ConfigError` naming the key
and the allowed values. Plug-in names (secure mode, privacy mode, defense, PEFT rule, attack) are
checked against the live registries, so a user-registered plug-in is accepted like a built-in,
and each plug-in's settings (``[robustness.params]``, ``[privacy.params]``, ``[secure.params]``,
``[attack.params]``, ``[peft.rule_params]``) are checked against its keyword arguments.

The package's modules: `secure_fl.config.sections` (one dataclass per section),
`secure_fl.config.params` (plug-in settings), `secure_fl.config.core` (`Config`, overrides,
presets) and `secure_fl.config.reference` (the generated reference and ``--explain``).
"""

from __future__ import annotations

from secure_fl.config._checks import _ALIASES, _choice, _coerce, _fail, _fraction, _suggest
from secure_fl.config.core import Config, load_config, load_preset, parse_override, presets
from secure_fl.config.params import Params, PluginSetting, check_params, plugin_settings, resolved_settings
from secure_fl.config.reference import config_reference, explain_config
from secure_fl.config.sections import (
    _SECTIONS,
    BUILTIN_MODELS,
    DATASETS,
    PARTITIONS,
    TASKS,
    AttackConfig,
    ClientConfig,
    DataConfig,
    ModelConfig,
    PeftSection,
    PrivacyConfig,
    RobustnessConfig,
    RunConfig,
    SecureConfig,
    SimulationConfig,
    TransportConfig,
)

__all__ = [
    "BUILTIN_MODELS",
    "DATASETS",
    "PARTITIONS",
    "TASKS",
    "AttackConfig",
    "ClientConfig",
    "Config",
    "DataConfig",
    "ModelConfig",
    "Params",
    "PeftSection",
    "PluginSetting",
    "PrivacyConfig",
    "RobustnessConfig",
    "RunConfig",
    "SecureConfig",
    "SimulationConfig",
    "TransportConfig",
    "_ALIASES",
    "_SECTIONS",
    "_choice",
    "_coerce",
    "_fail",
    "_fraction",
    "_suggest",
    "check_params",
    "config_reference",
    "explain_config",
    "load_config",
    "load_preset",
    "parse_override",
    "plugin_settings",
    "presets",
    "resolved_settings",
]
