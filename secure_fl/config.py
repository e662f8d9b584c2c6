"""Run configuration: frozen, validated dataclasses mirroring the TOML sections.

A config is read from a TOML file or a bundled preset, optionally changed with
``--set section.key=value`` overrides, validated once, and written back resolved to the run
directory. Unknown keys and bad values raise `ConfigError` naming the key
and the allowed values. Plug-in names (secure mode, privacy mode, defense, PEFT rule, attack) are
checked against the live registries, so a user-registered plug-in is accepted like a built-in.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import tomli_w

from secure_fl.errors import ConfigError

BUILTIN_MODELS = ("minilm", "tiny-bert")
DATASETS = ("bbc-news", "synthetic", "file")
PARTITIONS = ("iid", "dirichlet")
TASKS = ("seq-cls",)


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}", key=key)


def _positive_int(key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(key, f"must be an integer >= 1, got {value!r}")


def _non_negative_int(key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(key, f"must be an integer >= 0, got {value!r}")


def _positive_float(key: str, value: float) -> None:
    if not value > 0 or value != value or value == float("inf"):
        _fail(key, f"must be a finite number > 0, got {value!r}")


def _non_negative_float(key: str, value: float) -> None:
    if not value >= 0 or value == float("inf"):
        _fail(key, f"must be a finite number >= 0, got {value!r}")


def _fraction(key: str, value: float, *, open_low: bool = False, open_high: bool = False) -> None:
    low_ok = value > 0 if open_low else value >= 0
    high_ok = value < 1 if open_high else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if open_low else '['}0, 1{')' if open_high else ']'}"
        _fail(key, f"must lie in {interval}, got {value!r}")


def _choice(key: str, value: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        _fail(key, f"{value!r} is not one of: {', '.join(allowed)}")


@dataclass(frozen=True)
class RunConfig:
    """``[run]``: how many rounds, clients and how long to wait for them."""

    rounds: int = field(default=3, metadata={"help": "number of federated rounds"})
    num_clients: int = field(default=4, metadata={"help": "number of parties (data partitions)"})
    clients_per_round: int = field(default=4, metadata={"help": "cohort size sampled each round"})
    seed: int = field(default=0, metadata={"help": "seed for partitioning, cohorts and initialisation"})
    round_timeout: float = field(default=600.0, metadata={"help": "seconds to wait for updates before closing a round"})
    min_updates: int = field(default=1, metadata={"help": "fewest updates a round needs once its deadline passed"})
    join_timeout: float = field(default=600.0, metadata={"help": "seconds to wait for clients_per_round clients to join"})
    keep_checkpoints: int = field(default=3, metadata={"help": "number of round checkpoints kept"})
    max_weight: float = field(
        default=1e9,
        metadata={"help": "largest example count (update weight) a party may declare; larger is refused at Join"},
    )
    require_full_cohort: bool = field(
        default=False,
        metadata={"help": "fail the run if fewer than clients_per_round clients joined within join_timeout (else warn)"},
    )

    def __post_init__(self) -> None:
        for name in ("rounds", "num_clients", "clients_per_round", "min_updates", "keep_checkpoints"):
            _positive_int(f"run.{name}", getattr(self, name))
        _non_negative_int("run.seed", self.seed)
        _positive_float("run.round_timeout", self.round_timeout)
        _positive_float("run.join_timeout", self.join_timeout)
        _positive_float("run.max_weight", self.max_weight)
        if self.max_weight > 1e15:
            _fail("run.max_weight", f"{self.max_weight!r} is above 1e15; weights that large lose float64 precision")
        if not isinstance(self.require_full_cohort, bool):
            _fail("run.require_full_cohort", f"must be true or false, got {self.require_full_cohort!r}")
        if self.clients_per_round > self.num_clients:
            _fail("run.clients_per_round", f"{self.clients_per_round} exceeds run.num_clients={self.num_clients}")
        if self.min_updates > self.clients_per_round:
            _fail("run.min_updates", f"{self.min_updates} exceeds run.clients_per_round={self.clients_per_round}")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the frozen base model and its tokenizer."""

    name: str = field(default="minilm", metadata={"help": "'minilm', 'tiny-bert' or a local transformers model directory"})
    task: str = field(default="seq-cls", metadata={"help": "training task"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (longer texts are truncated)"})
    hidden_size: int = field(default=32, metadata={"help": "tiny-bert only: hidden size"})
    num_layers: int = field(default=2, metadata={"help": "tiny-bert only: transformer layers"})
    num_heads: int = field(default=2, metadata={"help": "tiny-bert only: attention heads"})
    intermediate_size: int = field(default=64, metadata={"help": "tiny-bert only: feed-forward size"})
    initializer_range: float = field(default=0.2, metadata={"help": "tiny-bert only: std of the random weights"})

    def __post_init__(self) -> None:
        if not self.name:
            _fail("model.name", f"must be one of {', '.join(BUILTIN_MODELS)} or a local model directory")
        _choice("model.task", self.task, TASKS)
        for name in ("max_length", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            _positive_int(f"model.{name}", getattr(self, name))
        _positive_float("model.initializer_range", self.initializer_range)
        if self.hidden_size % self.num_heads:
            _fail("model.hidden_size", f"{self.hidden_size} is not a multiple of model.num_heads={self.num_heads}")


@dataclass(frozen=True)
class PeftSection:
    """``[peft]``: the LoRA adapter and the server's aggregation rule."""

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: tuple[str, ...] = field(default=("query", "value"), metadata={"help": "module names that get LoRA"})
    modules_to_save: tuple[str, ...] = field(default=("classifier",), metadata={"help": "modules trained in full and sent (the head)"})
    rule: str = field(default="fedit", metadata={"help": "PEFT aggregation rule"})

    def __post_init__(self) -> None:
        _positive_int("peft.r", self.r)
        _positive_float("peft.alpha", self.alpha)
        _fraction("peft.dropout", self.dropout, open_high=True)
        if not self.target_modules:
            _fail("peft.target_modules", "needs at least one module name")
        from secure_fl.peft_agg.registry import available

        _choice("peft.rule", self.rule, available())


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: where the examples come from and how they are split among clients."""

    dataset: str = field(default="bbc-news", metadata={"help": "'bbc-news' (bundled), 'synthetic' or 'file'"})
    path: str = field(default="", metadata={"help": "CSV/JSONL file for dataset='file'"})
    test_path: str = field(default="", metadata={"help": "optional separate test file for dataset='file'"})
    text_column: str = field(default="text", metadata={"help": "column/key holding the text"})
    label_column: str = field(default="label", metadata={"help": "column/key holding the label"})
    label_names: tuple[str, ...] = field(default=(), metadata={"help": "label names, fixing the label -> id mapping"})
    test_fraction: float = field(default=0.2, metadata={"help": "held-out share when no test file is given"})
    partition: str = field(default="dirichlet", metadata={"help": "'iid' or 'dirichlet' label skew"})
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (smaller = more skew)"})
    synthetic_examples: int = field(default=600, metadata={"help": "size of the synthetic set"})
    synthetic_labels: int = field(default=4, metadata={"help": "classes of the synthetic set"})

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, DATASETS)
        _choice("data.partition", self.partition, PARTITIONS)
        _fraction("data.test_fraction", self.test_fraction, open_low=True, open_high=True)
        _positive_float("data.alpha", self.alpha)
        _positive_int("data.synthetic_examples", self.synthetic_examples)
        _positive_int("data.synthetic_labels", self.synthetic_labels)
        if self.dataset == "file" and not self.path:
            _fail("data.path", "is required when data.dataset = 'file'")


@dataclass(frozen=True)
class ClientConfig:
    """``[client]``: the local training plan (the server sends its own plan to every client)."""

    local_steps: int = field(default=10, metadata={"help": "optimizer steps per round"})
    batch_size: int = field(default=16, metadata={"help": "examples per step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clipping for stability (0 = off; not DP)"})
    eval_batch_size: int = field(default=64, metadata={"help": "examples per evaluation batch"})
    eval_fraction: float = field(
        default=0.0,
        metadata={"help": "share of each client's data held out to evaluate the received global adapter (0 = off)"},
    )

    def __post_init__(self) -> None:
        for name in ("local_steps", "batch_size", "eval_batch_size"):
            _positive_int(f"client.{name}", getattr(self, name))
        _positive_float("client.lr", self.lr)
        _non_negative_float("client.weight_decay", self.weight_decay)
        _non_negative_float("client.max_grad_norm", self.max_grad_norm)
        _fraction("client.eval_fraction", self.eval_fraction, open_high=True)


@dataclass(frozen=True)
class SecureConfig:
    """``[secure]``: the secure-aggregation protocol."""

    mode: str = field(default="plain", metadata={"help": "secure-aggregation mode"})

    def __post_init__(self) -> None:
        from protocols.secagg.registry import available

        _choice("secure.mode", self.mode, available())


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: the differential-privacy mechanism and how its spend is accounted."""

    mode: str = field(default="none", metadata={"help": "differential-privacy mode"})
    delta: float = field(default=1e-5, metadata={"help": "delta of every reported (epsilon, delta)"})
    accountants: tuple[str, ...] = field(
        default=("rdp", "prv"), metadata={"help": "accountants whose epsilon the ledger and report show"}
    )

    def __post_init__(self) -> None:
        from privacy.accounting.registry import available as accountants
        from privacy.mechanisms.registry import available

        _choice("privacy.mode", self.mode, available())
        _fraction("privacy.delta", self.delta, open_low=True, open_high=True)
        if not self.accountants:
            _fail("privacy.accountants", "needs at least one accountant, e.g. [\"rdp\"]")
        if len(set(self.accountants)) != len(self.accountants):
            _fail("privacy.accountants", f"names an accountant twice: {list(self.accountants)}")
        for name in self.accountants:
            _choice("privacy.accountants", name, accountants())


@dataclass(frozen=True)
class RobustnessConfig:
    """``[robustness]``: the Byzantine defense."""

    defense: str = field(default="none", metadata={"help": "robust aggregation rule"})

    def __post_init__(self) -> None:
        from robustness.defenses.registry import available

        _choice("robustness.defense", self.defense, available())


@dataclass(frozen=True)
class AttackConfig:
    """``[attack]``: simulated attackers, for evaluating defenses (simulation only)."""

    kind: str = field(default="none", metadata={"help": "attack behaviour of the malicious clients"})
    fraction: float = field(default=0.0, metadata={"help": "share of clients that are malicious"})

    def __post_init__(self) -> None:
        from robustness.attacks.registry import available

        _choice("attack.kind", self.kind, available())
        _fraction("attack.fraction", self.fraction, open_high=True)
        if self.kind == "none" and self.fraction > 0:
            _fail("attack.fraction", "is > 0 but attack.kind = 'none'; choose an attack kind")


@dataclass(frozen=True)
class TransportConfig:
    """``[transport]``: wire limits and polling."""

    chunk_size: int = field(default=1 << 20, metadata={"help": "bytes per streamed chunk"})
    max_update_bytes: int = field(default=1 << 30, metadata={"help": "largest accepted upload"})
    poll_interval: float = field(default=0.5, metadata={"help": "seconds between a waiting client's polls"})
    connect_timeout: float = field(default=120.0, metadata={"help": "seconds a client keeps retrying an unreachable server"})
    liveness_timeout: float = field(
        default=60.0,
        metadata={"help": "seconds of silence after which a joined party is left out of cohorts (and may be evicted)"},
    )
    first_message_timeout: float = field(
        default=10.0, metadata={"help": "seconds the server waits for the first message of an upload stream"}
    )
    idle_timeout: float = field(
        default=60.0, metadata={"help": "seconds the server waits between two messages of an upload stream"}
    )
    max_streams: int = field(default=16, metadata={"help": "most upload/download streams the server serves at once"})
    max_streams_per_peer: int = field(
        default=8, metadata={"help": "most streams one network peer (IP address) may hold open at once"}
    )

    def __post_init__(self) -> None:
        _positive_int("transport.chunk_size", self.chunk_size)
        _positive_int("transport.max_update_bytes", self.max_update_bytes)
        _positive_float("transport.poll_interval", self.poll_interval)
        _positive_float("transport.connect_timeout", self.connect_timeout)
        for name in ("liveness_timeout", "first_message_timeout", "idle_timeout"):
            _positive_float(f"transport.{name}", getattr(self, name))
        _positive_int("transport.max_streams", self.max_streams)
        _positive_int("transport.max_streams_per_peer", self.max_streams_per_peer)
        if self.max_streams_per_peer > self.max_streams:
            _fail("transport.max_streams_per_peer", f"{self.max_streams_per_peer} exceeds transport.max_streams={self.max_streams}")
        if self.chunk_size > 4 << 20:
            _fail("transport.chunk_size", f"{self.chunk_size} exceeds gRPC's default 4 MiB message limit")


_SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "peft": PeftSection,
    "data": DataConfig,
    "client": ClientConfig,
    "secure": SecureConfig,
    "privacy": PrivacyConfig,
    "robustness": RobustnessConfig,
    "attack": AttackConfig,
    "transport": TransportConfig,
}


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

    def __post_init__(self) -> None:
        if self.data.dataset == "synthetic" and self.data.synthetic_examples < 2 * self.run.num_clients:
            _fail("data.synthetic_examples", f"{self.data.synthetic_examples} is too few for {self.run.num_clients} clients")

    # ----------------------------------------------------------------------------- conversion
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        """Build a config from nested ``{section: {key: value}}``; unknown keys are refused."""
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
        """Apply ``section.key=value`` strings (values parsed as TOML, else taken as strings)."""
        data = self.to_dict()
        for item in overrides:
            key, value = parse_override(item)
            section, name = key.split(".", 1)
            data.setdefault(section, {})[name] = value
        return Config.from_dict(data)

    def replace(self, **sections: Any) -> Config:
        """Return a copy with whole sections replaced (``config.replace(run=RunConfig(...))``)."""
        return replace(self, **sections)


def parse_override(item: str) -> tuple[str, Any]:
    """Parse one ``--set section.key=value``; the value is a TOML literal or a bare string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = (part.strip() for part in item.split("=", 1))
    if key.count(".") != 1 or not all(key.split(".")):
        raise ConfigError(f"--set {item!r}: the key must look like section.key (e.g. run.rounds)", key=key)
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
    for key, value in values.items():
        full = f"{section}.{key}"
        if key not in known:
            raise ConfigError(
                f"unknown key {full!r}{_suggest(key, known)}; allowed in [{section}]: {', '.join(sorted(known))}",
                key=full,
            )
        kwargs[key] = _coerce(full, hints[key], value)
    return cls(**kwargs)


def _coerce(key: str, hint: Any, value: Any) -> Any:
    """Check a TOML value against a field type; ints are accepted for floats, never bools."""
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}", key=key)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}", key=key)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}", key=key)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}", key=key)
        return value
    # tuple[str, ...]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: must be a list of strings, got {value!r}", key=key)
    return tuple(value)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


# Names users bring from other frameworks (peft, HF Trainer, Flower) that we spell differently.
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_rounds": "rounds",
    "steps": "local_steps",
    "local_epochs": "local_steps",
}


def _suggest(word: str, options: Iterable[str]) -> str:
    options = list(options)
    if _ALIASES.get(word) in options:
        return f" (did you mean {_ALIASES[word]!r}?)"
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_reference() -> str:
    """Markdown reference of every section and key (default and help), generated from the fields.

    ``docs/configuration.md`` is this text; a test keeps the two identical.
    """
    lines = [
        "# Configuration reference",
        "",
        "Generated from `secure_fl/config.py` by `python -c \"from secure_fl.config import config_reference; "
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
            default = json.dumps(value) if isinstance(value, list) else tomli_w.dumps({"v": value}).strip()[4:]
            lines.append(f"| `{f.name}` | `{default}` | {f.metadata.get('help', '')} |")
        lines.append("")
    return "\n".join(lines)


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
    """One value as an inline TOML literal (lists of strings on one line, as JSON writes them)."""
    return json.dumps(value) if isinstance(value, list) else tomli_w.dumps({"v": value}).strip()[4:]
