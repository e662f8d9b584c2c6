"""Tests of the run configuration: presets, TOML round trips, overrides and validation errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from secure_fl.cli import main
from secure_fl.config import Config, load_config, load_preset, parse_override, presets
from secure_fl.errors import ConfigError

# ------------------------------------------------------------------------------ presets, defaults


def test_bundled_presets_are_listed() -> None:
    names = presets()
    assert "smoke" in names and "bbc-news" in names
    assert names == tuple(sorted(names))


@pytest.mark.parametrize("name", presets())
def test_every_preset_loads(name: str) -> None:
    cfg = load_preset(name)
    assert isinstance(cfg, Config)


def test_smoke_preset_values() -> None:
    cfg = load_preset("smoke")
    assert cfg.run.rounds == 2
    assert cfg.model.name == "tiny-bert"
    assert cfg.data.dataset == "synthetic"
    assert cfg.peft.target_modules == ("query", "value")
    # a key absent from the preset keeps its default
    assert cfg.peft.modules_to_save == ("classifier",)


def test_defaults_are_valid() -> None:
    cfg = Config()
    assert cfg == Config.from_dict({})
    assert cfg == Config.from_dict(cfg.to_dict())
    assert cfg.secure.mode == "plain"
    assert cfg.privacy.mode == "none"
    assert cfg.robustness.defense == "none"
    assert cfg.attack.kind == "none"
    assert cfg.peft.rule == "fedit"


def test_load_config_defaults_to_bbc_news() -> None:
    assert load_config() == load_preset("bbc-news")


# ------------------------------------------------------------------------------ TOML round trip


def _assert_round_trip(cfg: Config, path: Path) -> None:
    text = cfg.to_toml()
    path.write_text(text, encoding="utf-8")
    again = Config.from_toml(path)
    assert again == cfg
    assert again.to_toml() == text
    # save() writes the same text
    saved = path.with_name("saved.toml")
    cfg.save(saved)
    assert saved.read_text(encoding="utf-8") == text


@pytest.mark.parametrize("name", presets())
def test_preset_toml_round_trip(name: str, tmp_path: Path) -> None:
    _assert_round_trip(load_preset(name), tmp_path / "config.toml")


def test_default_toml_round_trip(tmp_path: Path) -> None:
    _assert_round_trip(Config(), tmp_path / "config.toml")


def test_overridden_toml_round_trip(tmp_path: Path) -> None:
    cfg = load_preset("smoke").with_overrides(
        [
            "run.rounds=7",
            "run.round_timeout=5",  # an int for a float field
            "peft.target_modules=[\"query\",\"key\",\"value\"]",
            "peft.modules_to_save=[]",
            "data.dataset=file",
            "data.path=/tmp/some data/x.jsonl",
            "data.label_names=[\"neg\",\"pos\"]",
            "client.lr=3e-4",
            "model.name=/some/dir",
            "transport.chunk_size=4194304",
        ]
    )
    assert cfg.run.round_timeout == 5.0 and isinstance(cfg.run.round_timeout, float)
    assert cfg.peft.modules_to_save == ()
    assert cfg.data.path == "/tmp/some data/x.jsonl"
    _assert_round_trip(cfg, tmp_path / "config.toml")


def test_to_dict_is_plain_data() -> None:
    data = load_preset("smoke").to_dict()
    assert data["peft"]["target_modules"] == ["query", "value"]
    assert list(data) == [
        "run", "model", "peft", "data", "client", "secure", "privacy", "robustness", "attack", "transport", "simulation",
    ]
    assert data["simulation"]["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}


# ------------------------------------------------------------------------------ overrides


def test_with_overrides_applies_typed_values() -> None:
    base = load_preset("smoke")
    cfg = base.with_overrides(
        ["run.rounds=7", "peft.target_modules=[\"query\",\"key\"]", "data.partition=iid", "model.name=/some/dir"]
    )
    assert cfg.run.rounds == 7 and type(cfg.run.rounds) is int
    assert cfg.peft.target_modules == ("query", "key")
    assert cfg.data.partition == "iid"
    assert cfg.model.name == "/some/dir"
    # everything else is unchanged, and the base config is not mutated
    assert cfg.client == base.client
    assert base.run.rounds == 2


def test_with_overrides_later_wins_and_quoted_strings() -> None:
    cfg = Config().with_overrides(["run.rounds=2", "run.rounds=5", 'data.partition="iid"', "peft.target_modules=query"])
    assert cfg.run.rounds == 5
    assert cfg.data.partition == "iid"
    assert cfg.peft.target_modules == ("query",)  # a single string becomes a one-element list


def test_load_config_applies_overrides(tmp_path: Path) -> None:
    assert load_config(preset="smoke", overrides=["run.rounds=9"]).run.rounds == 9
    path = tmp_path / "c.toml"
    load_preset("smoke").save(path)
    assert load_config(path, overrides=["run.seed=3"]).run.seed == 3


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("run.rounds=7", ("run.rounds", 7)),
        (" run.rounds = 7 ", ("run.rounds", 7)),
        ("client.lr=1e-3", ("client.lr", 1e-3)),
        ("model.name=/some/dir", ("model.name", "/some/dir")),
        ("model.name=a=b", ("model.name", "a=b")),
        ('data.partition="iid"', ("data.partition", "iid")),
        ("peft.target_modules=[\"a\", \"b\"]", ("peft.target_modules", ["a", "b"])),
        ("data.path=", ("data.path", "")),
    ],
)
def test_parse_override(item: str, expected: tuple) -> None:
    assert parse_override(item) == expected


@pytest.mark.parametrize("item", ["run.rounds", "rounds=3", "run.rounds.x=3", ".rounds=3", "run.=3", "=3"])
def test_parse_override_refuses_malformed_items(item: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(item)
    assert repr(item) in str(info.value)
    assert "section.key" in str(info.value)


def test_with_overrides_refuses_malformed_item() -> None:
    with pytest.raises(ConfigError):
        Config().with_overrides(["run.rounds.x=3"])


# ------------------------------------------------------------------------------ unknown names


def test_unknown_section_is_refused_with_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"runn": {"rounds": 3}})
    msg = str(info.value)
    assert info.value.key == "runn"
    assert "[runn]" in msg
    assert "did you mean 'run'" in msg
    assert "transport" in msg  # allowed sections listed


def test_unknown_section_through_override() -> None:
    with pytest.raises(ConfigError) as info:
        Config().with_overrides(["secur.mode=plain"])
    assert info.value.key == "secur"
    assert "did you mean 'secure'" in str(info.value)


def test_section_must_be_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"run": 3})
    assert info.value.key == "run"


@pytest.mark.parametrize(
    ("override", "key", "suggestion"),
    [
        ("run.round=3", "run.round", "rounds"),
        ("peft.rul=fedit", "peft.rul", "rule"),
        ("client.learning_rate=0.1", "client.learning_rate", "lr"),
        ("client.momentum=0.9", "client.momentum", None),
    ],
)
def test_unknown_key_is_refused_with_suggestion(override: str, key: str, suggestion: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        Config().with_overrides([override])
    msg = str(info.value)
    assert info.value.key == key
    assert repr(key) in msg
    if suggestion is not None:
        assert f"did you mean {suggestion!r}" in msg
    else:
        assert "did you mean" not in msg


def test_unknown_key_peft_rank_lists_r() -> None:
    with pytest.raises(ConfigError) as info:
        Config().with_overrides(["peft.rank=4"])
    msg = str(info.value)
    assert info.value.key == "peft.rank"
    assert "'peft.rank'" in msg
    # the allowed keys of [peft] are listed, so the user can find 'r'
    assert "allowed in [peft]: alpha, dropout, modules_to_save, r, rule, rule_params, target_modules" in msg


def test_unknown_key_peft_rank_suggests_r() -> None:
    with pytest.raises(ConfigError) as info:
        Config().with_overrides(["peft.rank=4"])
    assert "did you mean 'r'" in str(info.value)


# ------------------------------------------------------------------------------ wrong types


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("run", "rounds", "7", "must be an integer"),
        ("run", "rounds", True, "must be an integer"),
        ("run", "rounds", 7.0, "must be an integer"),
        ("run", "round_timeout", "5", "must be a number"),
        ("run", "round_timeout", False, "must be a number"),
        ("model", "name", 3, "must be a string"),
        ("peft", "target_modules", 3, "must be a list of strings"),
        ("peft", "target_modules", ["query", 3], "must be a list of strings"),
        ("data", "label_names", [1, 2], "must be a list of strings"),
    ],
)
def test_wrong_type_is_refused(section: str, key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({section: {key: value}})
    full = f"{section}.{key}"
    assert info.value.key == full
    assert str(info.value).startswith(f"{full}: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("run.rounds=seven", "run.rounds"),
        ('run.rounds="7"', "run.rounds"),
        ("run.rounds=true", "run.rounds"),
        ("run.rounds=7.5", "run.rounds"),
        ("peft.target_modules=3", "peft.target_modules"),
        ("model.name=1.5", "model.name"),
    ],
)
def test_wrong_type_through_override(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config().with_overrides([override])
    assert info.value.key == key
    assert key in str(info.value)


# ------------------------------------------------------------------------------ bad values

BAD_VALUES = [
    # (overrides, key, fragments that must appear in the message)
    (["run.rounds=0"], "run.rounds", [">= 1"]),
    (["run.rounds=-3"], "run.rounds", [">= 1"]),
    (["run.seed=-1"], "run.seed", [">= 0"]),
    (["run.round_timeout=0"], "run.round_timeout", ["> 0"]),
    (["run.round_timeout=inf"], "run.round_timeout", ["finite"]),
    (["run.round_timeout=nan"], "run.round_timeout", ["finite"]),
    (["run.clients_per_round=5"], "run.clients_per_round", ["run.num_clients=4"]),
    (["run.min_updates=5", "run.num_clients=10", "run.clients_per_round=4"], "run.min_updates", ["run.clients_per_round=4"]),
    (["model.name=\"\""], "model.name", ["minilm", "tiny-bert"]),
    (["model.task=generation"], "model.task", ["'generation'", "seq-cls"]),
    (["model.hidden_size=33"], "model.hidden_size", ["model.num_heads=2"]),
    (["model.initializer_range=0"], "model.initializer_range", ["> 0"]),
    (["peft.r=0"], "peft.r", [">= 1"]),
    (["peft.alpha=0"], "peft.alpha", ["> 0"]),
    (["peft.alpha=-1.5"], "peft.alpha", ["> 0"]),
    (["peft.dropout=1.0"], "peft.dropout", ["[0, 1)"]),
    (["peft.dropout=-0.1"], "peft.dropout", ["[0, 1)"]),
    (["peft.target_modules=[]"], "peft.target_modules", ["at least one"]),
    (["peft.rule=no-such-rule"], "peft.rule", ["'no-such-rule'", "fedit"]),
    (["data.test_fraction=1.0"], "data.test_fraction", ["(0, 1)"]),
    (["data.test_fraction=0"], "data.test_fraction", ["(0, 1)"]),
    (["data.alpha=0"], "data.alpha", ["> 0"]),
    (["data.dataset=file"], "data.path", ["data.dataset = 'file'"]),
    (["data.dataset=imdb"], "data.dataset", ["'imdb'", "bbc-news, synthetic, file"]),
    (["data.partition=shards"], "data.partition", ["'shards'", "iid, dirichlet"]),
    (["data.dataset=synthetic", "data.synthetic_examples=7"], "data.synthetic_examples", ["4 clients"]),
    (["client.lr=0"], "client.lr", ["> 0"]),
    (["client.weight_decay=-1"], "client.weight_decay", [">= 0"]),
    (["client.batch_size=0"], "client.batch_size", [">= 1"]),
    (["secure.mode=secagg-plus"], "secure.mode", ["'secagg-plus'", "plain"]),
    (["privacy.mode=dp"], "privacy.mode", ["'dp'", "none"]),
    (["robustness.defense=geomed"], "robustness.defense", ["'geomed'", "krum"]),
    (["attack.kind=signflip"], "attack.kind", ["'signflip'", "none"]),
    (["attack.fraction=0.2"], "attack.fraction", ["attack.kind = 'none'"]),
    (["attack.fraction=1.0"], "attack.fraction", ["[0, 1)"]),
    (["transport.chunk_size=4194305"], "transport.chunk_size", ["4 MiB"]),
    (["transport.chunk_size=0"], "transport.chunk_size", [">= 1"]),
    (["transport.poll_interval=0"], "transport.poll_interval", ["> 0"]),
]


@pytest.mark.parametrize(("overrides", "key", "fragments"), BAD_VALUES, ids=[" ".join(o) for o, _, _ in BAD_VALUES])
def test_bad_value_is_refused(overrides: list[str], key: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Config().with_overrides(overrides)
    msg = str(info.value)
    assert info.value.key == key
    assert msg.startswith(f"{key}: "), msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_limits_are_inclusive_where_documented() -> None:
    cfg = Config().with_overrides(
        [
            "transport.chunk_size=4194304",
            "run.clients_per_round=4",
            "run.min_updates=4",
            "peft.dropout=0",
            "attack.fraction=0",
            "data.dataset=file",
            "data.path=x.csv",
        ]
    )
    assert cfg.transport.chunk_size == 4 << 20
    assert cfg.run.min_updates == cfg.run.clients_per_round == cfg.run.num_clients


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Config().with_overrides(["run.rounds=0"])


# ------------------------------------------------------------------------------ files and presets


def test_from_toml_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    assert str(path) in str(info.value)
    assert "does not exist" in str(info.value)


def test_from_toml_invalid_syntax(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[run\nrounds = = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    assert str(path) in str(info.value)
    assert "not valid TOML" in str(info.value)


def test_from_toml_bad_key_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[run]\nrounds = 0\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Config.from_toml(path)
    assert info.value.key == "run.rounds"
    assert str(path) in str(info.value)
    assert "run.rounds" in str(info.value)


def test_from_toml_accepts_str_path(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[run]\nrounds = 9\n", encoding="utf-8")
    assert Config.from_toml(str(path)).run.rounds == 9


def test_load_config_refuses_file_and_preset(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    Config().save(path)
    with pytest.raises(ConfigError) as info:
        load_config(path, "smoke")
    assert "not both" in str(info.value)


def test_unknown_preset_lists_available() -> None:
    with pytest.raises(ConfigError) as info:
        load_preset("smok")
    msg = str(info.value)
    assert "'smok'" in msg
    assert "did you mean 'smoke'" in msg
    for name in presets():
        assert name in msg
    with pytest.raises(ConfigError):
        load_config(preset="no-such-preset")


# ------------------------------------------------------------------------------ command line


def test_cli_refuses_unknown_key(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["config", "--preset", "smoke", "--set", "peft.rank=4"])
    captured = capsys.readouterr()
    assert status == 2
    assert "peft.rank" in captured.err
    assert captured.err.startswith("error: ")
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_prints_resolved_config(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["config", "--preset", "smoke", "--set", "run.rounds=3"])
    captured = capsys.readouterr()
    assert status == 0
    assert "rounds = 3" in captured.out
    data = tomllib.loads(captured.out)
    assert Config.from_dict(data) == load_preset("smoke").with_overrides(["run.rounds=3"])


def test_cli_refuses_bad_value(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--preset", "smoke", "--set", "run.rounds=0"]) == 2
    assert "run.rounds" in capsys.readouterr().err


# ------------------------------------------------------------------------------ robustness shorthand


def test_defense_settings_may_sit_directly_in_the_robustness_table(tmp_path: Path) -> None:
    from tests.conftest import smoke_config

    short = smoke_config("robustness.defense='krum'", "robustness.f=1")
    assert short.robustness.params["f"] == 1
    assert short == smoke_config("robustness.defense='krum'", "robustness.params.f=1")
    path = tmp_path / "c.toml"
    path.write_text(short.to_toml(), encoding="utf-8")
    assert load_config(path) == short  # stored under [robustness.params]
    with pytest.raises(ConfigError, match=r"robustness.f is 1 but robustness.params.f is 2"):
        smoke_config("robustness.defense='krum'", "robustness.f=1", "robustness.params.f=2")
    with pytest.raises(ConfigError, match=r"unknown key 'robustness.trim_fraction'"):
        smoke_config("robustness.defense='krum'", "robustness.trim_fraction=0.1")  # not a Krum setting
    with pytest.raises(ConfigError, match=r"robustness.reputation_alpha"):
        smoke_config("robustness.reputation=true", "robustness.reputation_alpha=1.0")
