"""``[run] device``: resolution, refusals, batches following the model, and CPU runs unchanged."""

from __future__ import annotations

import math
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from secure_fl.device import model_device, on_device, resolve_device, to_device
from secure_fl.errors import ConfigError
from secure_fl.simulation import simulate
from tests.conftest import smoke_config

NO_CUDA = not torch.cuda.is_available()


def test_cpu_resolves_to_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the machine without CUDA")
def test_auto_without_cuda_is_cpu() -> None:
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("setting", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_refused(setting: str) -> None:
    with pytest.raises(ConfigError, match=r"run\.device.*no CUDA device is visible") as info:
        resolve_device(setting)
    assert info.value.key == "run.device"


@pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused_before_the_run(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"run\.device"):
        simulate(smoke_config("run.device=cuda", "run.rounds=1"), tmp_path, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("value", ["gpu", "CUDA", "cuda:", "cuda:x", "cpu:0", ""])
def test_bad_value_refused_at_config_load(value: str) -> None:
    with pytest.raises(ConfigError, match=r"run\.device") as info:
        smoke_config(f"run.device={value}")
    assert info.value.key == "run.device"


def test_accepted_values_load() -> None:
    for value in ("auto", "cpu", "cuda", "cuda:1"):
        assert smoke_config(f"run.device={value}").run.device == value
    assert smoke_config().run.device == "auto"


def test_to_device_keeps_structure() -> None:
    Pair = namedtuple("Pair", "x y")
    batch = {"ids": torch.ones(2), "rest": [torch.zeros(1), (torch.ones(1), "tag")], "pair": Pair(torch.ones(1), 3)}
    assert to_device(batch, torch.device("cpu")) is batch  # already there: the same object, nothing copied
    meta = to_device(batch, torch.device("meta"))  # a device every torch build has
    assert meta["ids"].device.type == "meta" and isinstance(meta["rest"], list) and meta["rest"][1][1] == "tag"
    assert meta["rest"][1][0].device.type == "meta"
    assert isinstance(meta["pair"], Pair) and meta["pair"].x.device.type == "meta" and meta["pair"].y == 3


def test_on_device_cpu_is_a_no_op() -> None:
    model = torch.nn.Linear(2, 2)
    weight, data = model.weight, model.weight.data
    with on_device(model, torch.device("cpu")) as inside:
        assert inside is model and model_device(model) == torch.device("cpu")
    assert model.weight is weight and model.weight.data.data_ptr() == data.data_ptr()


def _run(tmp_path: Path, *overrides: str) -> tuple[list[dict[str, object]], dict[str, np.ndarray]]:
    result = simulate(smoke_config("run.rounds=1", *overrides), tmp_path, progress=False)
    metrics = [{k: v for k, v in m.items() if k in ("accuracy", "loss", "train_loss")} for m in result.metrics]
    return metrics, result.global_state


def test_cpu_matches_default_bit_for_bit(tmp_path: Path) -> None:
    default_metrics, default_state = _run(tmp_path / "default")
    cpu_metrics, cpu_state = _run(tmp_path / "cpu", "run.device=cpu")
    assert cpu_metrics == default_metrics
    assert default_state.keys() == cpu_state.keys()
    for name, value in default_state.items():
        np.testing.assert_array_equal(cpu_state[name], value)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("extra", [(), ("privacy.mode=dp-sgd",)], ids=["plain", "dp-sgd"])
def test_cuda_smoke_run(tmp_path: Path, extra: tuple[str, ...]) -> None:
    result = simulate(smoke_config("run.rounds=1", "run.device=cuda", *extra), tmp_path, progress=False)
    accuracy = result.metrics[-1]["accuracy"]
    assert isinstance(accuracy, float) and math.isfinite(accuracy)
    for value in result.global_state.values():
        assert isinstance(value, np.ndarray) and value.dtype == np.float32 and np.isfinite(value).all()
