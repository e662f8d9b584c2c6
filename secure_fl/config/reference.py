"""The generated configuration reference (``docs/configuration.md``) and ``secure-fl config --explain``."""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

import tomli_w

from secure_fl.config.params import _plain, is_builtin_plugin, plugin_settings
from secure_fl.config.core import Config
from secure_fl.config.sections import _SECTIONS


def config_reference() -> str:
    """Markdown reference of every section and key (default and help), generated from the fields.

    ``docs/configuration.md`` is this text; a test keeps the two identical.
    """
    lines = [
        "# Configuration reference",
        "",
        "Generated from `secure_fl/config/` by `python -c \"from secure_fl.config import config_reference; "
        "print(config_reference(), end='')\" > docs/configuration.md`; a test keeps it in sync.",
        "Plug-in keys (`secure.mode`, `privacy.mode`, `privacy.accountants`, `robustness.defense`, `peft.rule`, `attack.kind`) accept",
        "every name in their registry, including plug-ins a user registered.",
        "",
    ]
    for section, cls in _SECTIONS.items():
        lines += [f"## [{section}]", "", (cls.__doc__ or "").strip().split("\n")[0].replace("``", "`"), "", "| key | default | meaning |", "|---|---|---|"]
        defaults = _plain(asdict(cls()))
        for f in fields(cls):
            value = defaults[f.name]
            lines.append(f"| `{f.name}` | `{_toml_literal(value)}` | {f.metadata.get('help', '')} |")
        lines.append("")
    return "\n".join(lines + _plugin_reference())


#: (heading, table that holds the settings, registry module) of every configurable stage.
_PLUGIN_KINDS = (
    ("secure-aggregation modes", "secure.params", "protocols.secagg.registry"),
    ("privacy mechanisms", "privacy.params", "privacy.mechanisms.registry"),
    ("defenses", "robustness.params", "robustness.defenses.registry"),
    ("PEFT aggregation rules", "peft.rule_params", "secure_fl.peft_agg.registry"),
    ("simulated attacks", "attack.params", "robustness.attacks.registry"),
)


def _plugin_reference() -> list[str]:
    """One table of settings per registered plug-in (its keyword arguments), for the reference."""
    lines = [
        "## Plug-in settings",
        "",
        "Each plug-in's settings are the keyword arguments of its class, given in the table named below",
        "(e.g. `[robustness.params]` then `factor = 3.0`, or `--set robustness.params.factor=3`). Unknown",
        "settings are refused; the server and every client must use the same settings for `secure`,",
        "`privacy` and the PEFT rule (compared at Join).",
        "",
    ]
    for heading, table, module_name in _PLUGIN_KINDS:
        registry = importlib.import_module(module_name)
        lines += [f"### {heading} (`[{table}]`)", ""]
        for name in registry.available():
            if not is_builtin_plugin(registry.plugin_class(name)):
                continue  # built-ins only: the reference must not depend on what a process registered
            lines += _settings_table(name, registry.plugin_class(name))
    from privacy.dpsgd import DPSGD

    lines += ["### sample-level DP-SGD (`[privacy.dp_sgd_params]`)", "",
              "Used with `privacy.mode = \"dp-sgd\"` or `privacy.dp_sgd = true`; compared at Join with "
              "`client.local_steps` and `client.batch_size`.", ""]
    lines += _settings_table("dp-sgd", DPSGD)
    return lines


def _settings_table(name: str, cls: type) -> list[str]:
    """The reference lines of one plug-in's settings (its keyword arguments)."""
    settings = plugin_settings(cls)
    if not settings:
        return [f"- `{name}`: no settings", ""]
    lines = [f"- `{name}`:", "", "  | setting | type | default | meaning |", "  |---|---|---|---|"]
    for setting in settings.values():
        default = "required" if setting.required else "unset" if setting.default is None else (
            f"`{_toml_literal(_plain({'v': setting.default})['v'])}`"
        )
        kind = setting.type_name.replace(" | ", " or ")  # a bare | would split the table cell
        lines.append(f"  | `{setting.name}` | `{kind}` | {default} | {setting.help} |")
    return lines + [""]


def explain_config(config: Config) -> str:
    """The resolved config as TOML, every key commented with its meaning and its default.

    What ``secure-fl config --explain`` prints: valid TOML (it can be saved and edited as a config
    file), one ``key = value  # meaning (default: ...)`` line per key, taken from the config
    dataclasses' field metadata like ``docs/configuration.md``; keys that differ from their
    default are marked ``[changed]``.
    """
    lines: list[str] = []
    values = config.to_dict()
    for section, cls in _SECTIONS.items():
        doc = (cls.__doc__ or "").strip().split("\n")[0].replace("``", "").removeprefix(f"[{section}]: ")
        if lines:
            lines.append("")
        lines += [f"[{section}]", f"# {doc}"]
        defaults = _plain(asdict(cls()))
        for f in fields(cls):
            value, default = values[section][f.name], defaults[f.name]
            changed = " [changed]" if value != default else ""
            help_text = f.metadata.get("help", "")
            lines.append(f"{f.name} = {_toml_literal(value)}  # {help_text} (default: {_toml_literal(default)}){changed}")
    return "\n".join(lines) + "\n"


def _toml_literal(value: Any) -> str:
    """One value as an inline TOML literal (lists on one line, as JSON writes them; tables inline)."""
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k} = {_toml_literal(v)}" for k, v in value.items())
        return f"{{ {inner} }}" if inner else "{}"
    if value is None:
        return '""'
    return json.dumps(value) if isinstance(value, list) else tomli_w.dumps({"v": value}).strip()[4:]
