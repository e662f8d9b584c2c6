"""Where local training and server evaluation run: ``[run] device``.

``"auto"`` picks the first CUDA device when torch sees one, else the CPU; ``"cpu"``, ``"cuda"``
and ``"cuda:N"`` ask for one explicitly. A CUDA setting on a machine without a visible CUDA
device is refused when it is resolved (`resolve_device`), never silently run on the CPU.

The model stays on the CPU between rounds: `on_device` moves it to the device for one round's
local training or one evaluation and back afterwards, so everything else (loading and reading
the adapter state, rule hooks that merge into the base weights, fingerprints, checkpoints)
always sees a CPU model, and a party holds GPU memory only while it trains. Batches follow
the model (`to_device`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from secure_fl.config._checks import _device
from secure_fl.errors import ConfigError


def resolve_device(setting: str) -> torch.device:
    """The torch device ``run.device = setting`` means on this machine.

    ``"auto"``: ``cuda`` if ``torch.cuda.is_available()``, else ``cpu``. ``"cuda"`` / ``"cuda:N"``
    without a visible CUDA device (or with N out of range) raise `ConfigError` naming ``run.device``;
    so does a value that is none of those. ``"cuda"`` resolves to torch's current CUDA device (with
    its index), so it compares equal to the device of a model moved there.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    _device("run.device", setting)
    available = torch.cuda.is_available()
    if setting == "cpu" or (setting == "auto" and not available):
        return torch.device("cpu")
    if not available:
        raise ConfigError(
            f"run.device = {setting!r} but no CUDA device is visible to torch (torch.cuda.is_available() is false; "
            f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}): set run.device = 'cpu' or 'auto', "
            "or run where a GPU and a CUDA build of torch are present",
            key="run.device",
        )
    device = torch.device("cuda" if setting == "auto" else setting)
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"run.device = {setting!r} but torch sees {torch.cuda.device_count()} CUDA device(s) "
            f"(indices 0 to {torch.cuda.device_count() - 1})",
            key="run.device",
        )
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model with neither."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with its tensors on ``device``.

    Handles tensors, anything with a ``.to(device)`` method (a transformers ``BatchEncoding``, a
    user's batch class), and mappings, lists and tuples (named tuples included) of those; other
    values are returned as they are. A batch already on ``device`` is returned as it is (the
    same object), so on the CPU nothing changes.
    """
    if isinstance(batch, torch.Tensor) or callable(getattr(batch, "to", None)):
        return batch.to(device)
    if isinstance(batch, Mapping):
        moved = {key: to_device(value, device) for key, value in batch.items()}
        return batch if all(moved[key] is value for key, value in batch.items()) else moved
    if isinstance(batch, (tuple, list)):
        items = [to_device(value, device) for value in batch]
        if all(new is old for new, old in zip(items, batch)):
            return batch
        if isinstance(batch, list):
            return items
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    return batch


@contextmanager
def on_device(model: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """Run the block with ``model`` on ``device``; it goes back to where it was afterwards, even on error.

    ``Module.to`` keeps the parameter objects (only their data moves), so optimizers and hooks
    created inside the block, and references held outside it, stay valid. On the CPU it is a no-op.
    """
    home = model_device(model)
    if home == device:
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)
