"""``secure-fl bench peft``: every PEFT rule on the same federated workload, side by side.

For each rule, one simulated run of the preset (bbc-news: 10 clients, Dirichlet(0.5) label skew,
the preset's rounds; the rule is the only difference) in ``plain`` mode, so the server sees
what each client trained. Measured per rule:

* test accuracy after every round (the server's held-out evaluation);
* bytes up per client per round (the training phase's upload, as the coordinator counted it);
* the **aggregation error** every round: ``||dW_global - sum_i p_i dW_i||_F / ||sum_i p_i dW_i||_F``
  over every LoRA target module, where ``dW_i`` is client i's change of the module's effective
  weight (base weight plus its adapter's contribution, whatever the rule's parametrisation) and
  ``dW_global`` the change of the released global model's, ``p_i`` the example-count weights.
  Effective weights are read by probing each wrapped linear layer with the identity matrix, so
  the measure is the same for every rule: 0 for an exact rule (FLoRA, FFA-LoRA, Fed-SB), the
  cross terms of ``mean(B) mean(A)`` for FedIT.

One JSON line per rule (``rule``, ``accuracy``, ``accuracy_per_round``, ``bytes_up_per_client``,
``bytes_down_per_client``, ``aggregation_error`` per round, ``seconds``); a progress bar over the runs.
FLoRA's server rank is the sum of the clients' ranks (its global adapter is their stack); every
client of every rule trains at the preset's rank.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secure_fl.callbacks import Callback
from secure_fl.errors import ConfigError

#: The workload every rule runs on, per preset: (preset, overrides).
PEFT_PRESETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "smoke": ("smoke", ()),
    "bbc-news": ("bbc-news", ("run.num_clients=10", "run.clients_per_round=10", "data.partition='dirichlet'",
                              "data.alpha=0.5")),
}


def effective_weights(model: Any) -> dict[str, np.ndarray]:
    """The effective weight ``W`` (out x in) of every LoRA-wrapped linear layer, read through its forward pass.

    The layer maps ``x`` to ``x W^T + b``; with ``x`` the identity and the bias removed that is
    ``W^T``, whatever the adapter's parametrisation (B A, B R A, a merged base). Dropout is off
    (the model is put in eval mode and restored).
    """
    import torch

    from secure_fl.peft_agg.hooks import lora_layers

    was_training = model.training
    model.eval()
    out: dict[str, np.ndarray] = {}
    try:
        with torch.no_grad():
            for name, module in lora_layers(model):
                base = module.base_layer
                eye = torch.eye(base.in_features, dtype=base.weight.dtype)
                y = module(eye)
                if base.bias is not None:
                    y = y - base.bias
                out[name] = y.T.double().numpy()
    finally:
        model.train(was_training)
    return out


@dataclass
class _Probe(Callback):
    """Reads the global and every client's effective weights at the right moments of each round.

    Also an `ExtraParties` of zero parties: `build` is how it gets the server and the honest trainers.
    """

    count: int = 0
    server: Any = None
    trainers: dict[str, Any] = field(default_factory=dict)
    before: dict[str, np.ndarray] = field(default_factory=dict)
    local: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    errors: list[float | None] = field(default_factory=list)

    def build(self, server: Any, honest: Sequence[Any]) -> list[Any]:
        self.server = server
        self.trainers = {f"client-{i}": trainer for i, trainer in enumerate(honest)}
        return []

    def _global(self) -> dict[str, np.ndarray]:
        from secure_fl.models import load_trainable_state

        state = self.server.start_state()  # the released adapter after any base merge (idempotent)
        load_trainable_state(self.server.adapted.model, state)
        return effective_weights(self.server.adapted.model)

    def on_round_start(self, round_number: int, cohort: Sequence[str]) -> None:
        self.before = self._global()
        self.local = {}

    def on_update(self, client_id: str, round_number: int) -> None:
        trainer = self.trainers.get(client_id)
        if trainer is not None:  # the trainer's model still holds what this client just trained
            self.local[client_id] = effective_weights(trainer.adapted.model)

    def on_round_end(self, record: dict[str, Any]) -> bool | None:
        contributors = [c for c in record.get("selected", []) if c in self.local and c not in record.get("dropped", [])]
        if record.get("status") != "ok" or not contributors:
            self.errors.append(None)
            return None
        after = self._global()
        weights = np.asarray([self.trainers[c].num_examples for c in contributors], dtype=np.float64)
        weights /= weights.sum()
        num, den = 0.0, 0.0
        for name, start in self.before.items():
            ideal = sum(w * (self.local[c][name] - start) for w, c in zip(weights, contributors))
            num += float(np.sum((after[name] - start - ideal) ** 2))
            den += float(np.sum(ideal**2))
        self.errors.append(float(np.sqrt(num / den)) if den > 0 else None)
        return None


@dataclass(frozen=True)
class PeftBench:
    """Which rules to compare, on which preset, for how many rounds, with which extra overrides."""

    preset: str = "smoke"
    rules: tuple[str, ...] = ()
    rounds: int | None = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from secure_fl.peft_agg.registry import available

        if self.preset not in PEFT_PRESETS:
            raise ConfigError(f"--preset {self.preset!r}: choose one of {', '.join(PEFT_PRESETS)}", key="--preset")
        unknown = sorted(set(self.rules) - set(available()))
        if unknown:
            raise ConfigError(f"--rules: unknown rule(s) {', '.join(unknown)}; registered: {', '.join(available())}",
                              key="--rules")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}", key="--rounds")

    def names(self) -> tuple[str, ...]:
        """The rules to run: the ones named, else every registered rule but rank voting (not LoRA)."""
        from secure_fl.peft_agg.registry import available

        return self.rules or tuple(r for r in available() if r != "rank-vote")

    def config_for(self, rule: str) -> Any:
        """The run configuration of ``rule``'s cell.

        FLoRA's global adapter is the stack of the cohort's adapters, so its server rank is the
        sum of the clients' ranks (and ``alpha`` grows with it, keeping ``alpha / r``); every
        client trains at the preset's rank (`client_ranks`), as every other rule's clients do.
        """
        from secure_fl.config import load_preset

        name, base = PEFT_PRESETS[self.preset]
        overrides = [*base, f"peft.rule={rule!r}", "secure.mode='plain'", "privacy.mode='none'", *self.overrides]
        if self.rounds is not None:
            overrides.append(f"run.rounds={self.rounds}")
        config = load_preset(name).with_overrides(overrides)
        if rule == "flora":
            k = config.run.clients_per_round
            config = config.with_overrides([f"peft.r={config.peft.r * k}", f"peft.alpha={config.peft.alpha * k}"])
        return config

    def client_ranks(self, rule: str) -> list[int] | None:
        """The clients' LoRA ranks of ``rule``'s cell (FLoRA: the preset's rank; others: the config's)."""
        if rule != "flora":
            return None
        from secure_fl.config import load_preset

        name, base = PEFT_PRESETS[self.preset]
        return [load_preset(name).with_overrides([*base, *self.overrides]).peft.r]


def run_peft_bench(bench: PeftBench, out_dir: str | Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Run every rule's cell; write ``results.jsonl`` under ``out_dir`` and return the records."""
    from tqdm import tqdm

    from secure_fl.simulation import simulate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    names = bench.names()
    bar = tqdm(names, desc="peft rules", unit="run", disable=not progress)
    for rule in bar:
        bar.set_postfix_str(rule)
        probe = _Probe()
        started = time.perf_counter()
        cell = out / rule
        if cell.exists():
            raise ConfigError(f"{cell} already holds a run; choose a new --out", key="--out")
        result = simulate(bench.config_for(rule), cell, callbacks=[probe], progress=False, extra_parties=probe,
                          client_ranks=bench.client_ranks(rule))
        metrics = result.metrics
        downloads = [
            sum(p["bytes_down"] for p in r.get("phases", []) if p.get("phase") in ("update", "masked-input", "encrypted-input"))
            / max(1, r["clients"]) for r in metrics if r.get("status") == "ok"
        ]
        uploads = [
            sum(p["bytes_up"] for p in r.get("phases", []) if p.get("phase") in ("update", "masked-input", "encrypted-input"))
            / max(1, r["clients"]) for r in metrics if r.get("status") == "ok"
        ]
        record = {
            "bench": "peft", "preset": bench.preset, "rule": rule,
            "accuracy": result.final_accuracy,
            "accuracy_per_round": [r.get("accuracy") for r in metrics],
            "bytes_up_per_client": round(float(np.mean(uploads))) if uploads else None,
            "bytes_down_per_client": round(float(np.mean(downloads))) if downloads else None,
            "aggregation_error": probe.errors,
            "rounds": len(metrics), "clients": metrics[-1]["clients"] if metrics else 0,
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(record), flush=True)
        records.append(record)
    with (out / "results.jsonl").open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return records
