"""`Config`: the whole run configuration, its TOML round trip, overrides and presets.

A config is read from a TOML file or a bundled preset, optionally changed with
``--set section.key=value`` overrides, validated once, and written back resolved to the run
directory. Unknown keys and bad values raise `ConfigError` naming the key
and the allowed values. Plug-in names (secure mode, privacy mode, defense, PEFT rule, attack) are
checked against the live registries, so a user-registered plug-in is accepted like a built-in.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

from secure_fl.config._checks import _coerce, _fail, _suggest
from secure_fl.config.params import Params, _plain
from secure_fl.config.sections import (
    _SECTIONS,
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
from secure_fl.errors import ConfigError


@dataclass(frozen=True)
class Config:
    """A whole run configuration; one attribute per TOML section."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftSection = field(default_factory=PeftSection)
    data: DataConfig = field(default_factory=DataConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    secure: SecureConfig = field(default_factory=SecureConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        if self.data.dataset == "synthetic" and self.data.synthetic_examples < 2 * self.run.num_clients:
            _fail("data.synthetic_examples", f"{self.data.synthetic_examples} is too few for {self.run.num_clients} clients")
        if self.model.task == "causal-lm":
            _check_causal_lm(self)

    # ----------------------------------------------------------------------------- conversion
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Build a config from nested ``{section: {key: value}}``; unknown keys are refused.

        With ``[model] task = "causal-lm"``, ``[peft]`` keys left out take the causal-LM defaults
        (`CAUSAL_LM_PEFT_DEFAULTS`: LoRA on GPT-2's ``c_attn``, no classification head).
        """
        data = _task_defaults(data)
        sections: dict[str, Any] = {}
        for section_name, values in data.items():
            if section_name not in _SECTIONS:
                raise ConfigError(
                    f"unknown section [{section_name}]{_suggest(section_name, _SECTIONS)}; "
                    f"allowed: {', '.join(_SECTIONS)}",
                    key=section_name,
                )
            if not isinstance(values, Mapping):
                raise ConfigError(f"[{section_name}] must be a table of key = value pairs", key=section_name)
            sections[section_name] = _build_section(section_name, _SECTIONS[section_name], values)
        return cls(**sections)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain-data form (tuples become lists), as written to ``config.toml``."""
        return {name: _plain(asdict(getattr(self, name))) for name in _SECTIONS}

    @classmethod
    def from_toml(cls, path: str | Path) -> Config:
        """Read a TOML config file; syntax errors and bad keys name the file."""
        path = Path(path)
        if path.is_dir():
            inside = path / "config.toml"
            hint = f" (a run directory's config is {inside})" if inside.is_file() else ""
            raise ConfigError(f"config file {path} is a directory; give the path of a TOML file{hint}")
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}", key=exc.key) from None

    def to_toml(self) -> str:
        """The resolved config as TOML text (every key, in a fixed order)."""
        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        """Write `to_toml` to ``path``."""
        Path(path).write_text(self.to_toml(), encoding="utf-8")

    def with_overrides(self, overrides: Iterable[str]) -> Config:
        """Apply ``section.key=value`` strings (values parsed as TOML, else taken as strings).

        A plug-in setting is ``section.params.key=value`` (``peft.rule_params.key`` for the rule).
        """
        data: dict[str, Any] = self.to_dict()
        for item in overrides:
            key, value = parse_override(item)
            *path, name = key.split(".")
            table = data
            for depth, part in enumerate(path):
                table = table.setdefault(part, {})
                if not isinstance(table, dict):
                    where = ".".join(path[: depth + 1])
                    raise ConfigError(f"--set {item!r}: {where} is a value, not a table of settings", key=where)
            table[name] = value
        return Config.from_dict(data)

    def replace(self, **sections: Any) -> Config:
        """Return a copy with whole sections replaced (``config.replace(run=RunConfig(...))``)."""
        return replace(self, **sections)


#: ``[peft]`` defaults for ``model.task = "causal-lm"`` where the file leaves the key out: LoRA on
#: GPT-2's fused attention projection and no head trained in full (the LM head is tied to the
#: frozen embeddings).
CAUSAL_LM_PEFT_DEFAULTS: dict[str, Any] = {"target_modules": ["c_attn"], "modules_to_save": []}

#: Simulated attacks that poison a client's labelled examples; a causal-LM run has no labels.
_DATA_ATTACKS = ("label-flip", "backdoor")


def _task_defaults(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """``data`` with the causal-LM ``[peft]`` defaults filled in where ``[model] task = "causal-lm"``."""
    model = data.get("model")
    if not isinstance(model, Mapping) or model.get("task") != "causal-lm":
        return data
    peft = data.get("peft", {})
    if not isinstance(peft, Mapping):
        return data  # the section check names the problem
    return {**data, "peft": {**CAUSAL_LM_PEFT_DEFAULTS, **peft}}


def _check_causal_lm(config: Config) -> None:
    """Cross-section checks of a ``model.task = "causal-lm"`` config, each naming the key to change."""
    data = config.data
    if "classifier" in config.peft.modules_to_save:
        _fail("peft.modules_to_save", f"{list(config.peft.modules_to_save)} names the classification head, which a "
              "causal LM does not have; set peft.modules_to_save = [] (the default for model.task = 'causal-lm')")
    if data.label_names:
        _fail("data.label_names", "is set but model.task = 'causal-lm' has no labels; remove data.label_names")
    if len({data.text_column, data.prompt_column, data.response_column}) < 3:
        _fail("data.prompt_column", "data.text_column, data.prompt_column and data.response_column must differ, got "
              f"{data.text_column!r}, {data.prompt_column!r}, {data.response_column!r}")
    if data.dataset == "file" and not data.path.lower().endswith((".jsonl", ".json")):
        _fail("data.path", f"{data.path!r}: model.task = 'causal-lm' reads JSON Lines (.jsonl), one object per line "
              f"with {data.prompt_column!r} and {data.response_column!r} keys or a {data.text_column!r} key")
    if config.attack.kind in _DATA_ATTACKS:
        _fail("attack.kind", f"{config.attack.kind!r} poisons labelled examples, which model.task = 'causal-lm' does "
              "not have; use a model-poisoning attack (e.g. 'sign-flip', 'gaussian', 'alie')")


#: The keys of a section that hold a plug-in's settings table (``--set section.params.key=value``).
_PARAMS_TABLES = ("params", "rule_params", "dp_sgd_params", "client_resources")


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one ``--set section.key=value``; the value is a TOML literal or a bare string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = (part.strip() for part in item.split("=", 1))
    parts = key.split(".")
    if not all(parts) or not (len(parts) == 2 or (len(parts) == 3 and parts[1] in _PARAMS_TABLES)):
        raise ConfigError(
            f"--set {item!r}: the key must look like section.key (e.g. run.rounds) or section.params.key "
            "(e.g. robustness.params.factor)",
            key=key,
        )
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def presets() -> tuple[str, ...]:
    """Names of the bundled presets."""
    return tuple(sorted(p.name[: -len(".toml")] for p in resources.files("secure_fl.presets").iterdir() if p.name.endswith(".toml")))


def load_preset(name: str) -> Config:
    """Load a bundled preset by name (``smoke``, ``bbc-news``)."""
    if name not in presets():
        raise ConfigError(f"unknown preset {name!r}{_suggest(name, presets())}; available: {', '.join(presets())}")
    text = resources.files("secure_fl.presets").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return Config.from_dict(tomllib.loads(text))


def load_config(config: str | Path | None = None, preset: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve a config the way the command line does: a file or a preset, then overrides."""
    if config is not None and preset is not None:
        raise ConfigError("give either a config file or a preset, not both")
    base = Config.from_toml(config) if config is not None else load_preset(preset or "bbc-news")
    return base.with_overrides(overrides)


def _build_section(section: str, cls: type, values: Mapping[str, Any]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    values = _move_shorthand(section, cls, values, known)
    for key, value in values.items():
        full = f"{section}.{key}"
        if key not in known:
            raise ConfigError(
                f"unknown key {full!r}{_suggest(key, known)}; allowed in [{section}]: {', '.join(sorted(known))}",
                key=full,
            )
        if hints[key] is Params:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full}: must be a table of setting = value pairs ([{full}]), got {value!r}", key=full)
            kwargs[key] = Params(value)
        else:
            kwargs[key] = _coerce(full, hints[key], value)
    return cls(**kwargs)



def _move_shorthand(section: str, cls: type, values: Mapping[str, Any], known: set[str]) -> Mapping[str, Any]:
    """Move plug-in settings written directly in a section (``[robustness] f = 2``) into its ``params``."""
    shorthand = getattr(cls, "shorthand_settings", None)
    if shorthand is None:
        return values
    names = set(shorthand(values)) - known
    moved = {key: value for key, value in values.items() if key in names}
    if not moved:
        return values
    params = values.get("params", {})
    if not isinstance(params, Mapping):
        return values  # the params check names the problem
    for key, value in moved.items():
        if key in params and params[key] != value:
            raise ConfigError(
                f"{section}.{key} is {value!r} but {section}.params.{key} is {params[key]!r}; set one of them",
                key=f"{section}.{key}",
            )
    rest = {key: value for key, value in values.items() if key not in moved}
    return {**rest, "params": {**params, **moved}}
