"""Round checkpoints: the global adapter plus what the next round needs to continue exactly.

One ``checkpoints/round-NNNN.safetensors`` file per round holds, written atomically together:

* the global adapter tensors, under their own names;
* the stage plug-ins' state (`Stages.state_dict`: a reputation table, server momentum, ...):
  numpy arrays as extra tensors under the reserved prefix ``__state__/``, everything else as JSON
  in the file's metadata (key ``plugin_state``), with ``{"__tensor__": name}`` where an array was;
* the cohort RNG state (``numpy.random.Generator.bit_generator.state``, metadata ``rng_state``);
* for a rule that merges every release into the base weights (flora), the merged base
  (`secure_fl.peft_agg.hooks.merged_base_state`, metadata ``base``): without it a resumed
  server would apply the next stack to the original base;
* the RFFL reputations (metadata ``reputation``) and the round's metrics record (metadata
  ``record``), so a server killed between the checkpoint and ``metrics.jsonl`` resumes with both.

A round's checkpoint is first written as ``round-NNNN.pending`` (before its ledger line) and
renamed to ``round-NNNN.safetensors`` once the ledger line is on disk: a pending file without a
ledger line was never released (`secure_fl.server.resume` deletes it), one with a ledger line
is promoted on resume.

`read_checkpoint` returns them all; `restore` puts plug-in state and RNG back into fresh stages
(resuming a whole run from its directory builds on this).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from secure_fl.server.faults import crash_point

if TYPE_CHECKING:
    from secure_fl.stages import Stages

#: Tensor names starting with this hold plug-in state, not adapter weights.
STATE_PREFIX = "__state__/"
#: Written into every checkpoint's metadata.
FORMAT = "secure-fl/checkpoint/v1"


@dataclass
class Checkpoint:
    """One round's checkpoint: adapter tensors, plug-in state and cohort RNG state."""

    round: int
    state: dict[str, np.ndarray] = field(repr=False)
    plugin_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    rng_state: dict[str, Any] | None = None
    #: The merged base weights and merge counters (merging rules only), else ``None``.
    base: dict[str, Any] | None = None
    run_id: str = ""
    path: Path | None = None
    #: The RFFL reputations after this round (``[robustness] reputation``), else ``None``.
    reputation: dict[str, Any] | None = None
    #: The round's metrics record as it stood when the checkpoint was written (``None`` in older files).
    record: dict[str, Any] | None = None

    def rng(self) -> np.random.Generator:
        """A generator in the saved cohort RNG state (it draws what the original would have drawn next)."""
        if self.rng_state is None:
            raise ValueError(f"checkpoint {self.path} holds no RNG state (written before secure-fl saved it)")
        name = str(self.rng_state.get("bit_generator", ""))
        bit_generator_cls = getattr(np.random, name, None)
        if bit_generator_cls is None:
            raise ValueError(f"checkpoint {self.path}: unknown bit generator {name!r}")
        bit_generator = bit_generator_cls()
        bit_generator.state = self.rng_state
        return np.random.Generator(bit_generator)


def _encode(value: Any, path: str, tensors: dict[str, np.ndarray]) -> Any:
    """JSON-able form of a state value; arrays move to ``tensors`` under ``STATE_PREFIX + path``."""
    if isinstance(value, np.ndarray):
        name = STATE_PREFIX + path
        tensors[name] = np.ascontiguousarray(value)
        return {"__tensor__": name}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state value at {path!r} is a {type(value).__name__}; use JSON scalars, lists, dicts or numpy arrays")


def _decode(value: Any, tensors: Mapping[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def write_checkpoint(
    target: Path,
    round_number: int,
    state: Mapping[str, np.ndarray],
    *,
    run_id: str,
    plugin_state: Mapping[str, Mapping[str, Any]] | None = None,
    rng_state: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
    reputation: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
) -> Path:
    """Write one checkpoint file atomically (temporary file, fsync, rename)."""
    tensors = {k: np.ascontiguousarray(v) for k, v in state.items()}
    clash = [k for k in tensors if k.startswith(STATE_PREFIX)]
    if clash:
        raise ValueError(f"adapter tensor names may not start with {STATE_PREFIX!r}: {clash}")
    extra: dict[str, np.ndarray] = {}
    metadata = {
        "round": str(round_number),
        "run_id": run_id,
        "format": FORMAT,
        "plugin_state": json.dumps(_encode(dict(plugin_state or {}), "plugins", extra)),
        "rng_state": json.dumps(_encode(dict(rng_state), "rng", extra) if rng_state is not None else None),
        "base": json.dumps(_encode(dict(base), "base", extra) if base is not None else None),
        "reputation": json.dumps(_encode(dict(reputation), "reputation", extra) if reputation is not None else None),
        "record": json.dumps(json_safe(dict(record)) if record is not None else None, allow_nan=False),
    }
    tmp = target.with_suffix(".tmp")
    save_file({**tensors, **extra}, str(tmp), metadata=metadata)
    with tmp.open("rb") as handle:  # on disk before the rename makes it count
        os.fsync(handle.fileno())
    crash_point("checkpoint-write", round_number)
    os.replace(tmp, target)
    return target


def json_safe(value: Any) -> Any:
    """``value`` as JSON can hold it: non-finite floats become ``null``, numpy scalars plain numbers
    (run.json, metrics lines, reputations and the record a checkpoint keeps)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file: adapter tensors, plug-in state and RNG state (older files: no state)."""
    path = Path(path)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata() or {}
    plugin_state = _decode(json.loads(metadata.get("plugin_state", "{}")), tensors)
    rng_state = _decode(json.loads(metadata.get("rng_state", "null")), tensors)
    base = _decode(json.loads(metadata.get("base", "null")), tensors)
    reputation = _decode(json.loads(metadata.get("reputation", "null")), tensors)
    record = json.loads(metadata.get("record", "null"))
    return Checkpoint(
        round=int(metadata.get("round", path.stem.split("-")[-1])),
        state={k: v for k, v in tensors.items() if not k.startswith(STATE_PREFIX)},
        plugin_state=plugin_state,
        rng_state=rng_state,
        base=base,
        run_id=metadata.get("run_id", ""),
        path=path,
        reputation=reputation,
        record=record,
    )


def restore(stages: Stages, checkpoint: Checkpoint) -> np.random.Generator | None:
    """Load the checkpoint's plug-in state into ``stages``; return its cohort RNG (``None`` if absent)."""
    stages.load_state_dict(checkpoint.plugin_state)
    return checkpoint.rng() if checkpoint.rng_state is not None else None
