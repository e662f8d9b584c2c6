"""Local training on one party's data: global adapter in, adapter delta out.

The update is the trainable adapter tensors (LoRA factors and the saved head) after local
training minus the global ones, restricted to the tensors the aggregation rule says travel.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from secure_fl.config import Config
from secure_fl.data import TextDataset
from secure_fl.models import AdaptedModel, load_trainable_state, trainable_state
from secure_fl.tasks import train_steps
from secure_fl.workload import Batches, TextClassification, Workload


#: Local training seeds torch's process-global RNG (dropout). Clients that share a process (threads
#: in tests, notebooks, the loopback example) train one at a time so every run is reproducible;
#: separate client processes, as in a deployment, train in parallel.
TRAIN_LOCK = threading.Lock()


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, round, client id) via SHA-256."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class LocalTrainer:
    """Holds a model and one client's prepared data; trains one round at a time.

    In simulation many trainers share one :class:`AdaptedModel`: each round starts by loading
    the global adapter into it, so sharing is safe as long as clients train one after another.
    """

    def __init__(
        self, workload: Workload, adapted: AdaptedModel, data: Batches, *, update_keys: list[str], num_examples: int
    ) -> None:
        self.workload = workload
        self.adapted = adapted
        self.data = data
        self.update_keys = list(update_keys)
        self.num_examples = num_examples

    @classmethod
    def create(
        cls,
        workload: Workload,
        dataset: Any,
        *,
        seed: int,
        update_keys: list[str] | None = None,
        adapted: AdaptedModel | None = None,
    ) -> LocalTrainer:
        """Build (or reuse) the workload's model and prepare ``dataset`` once."""
        adapted = adapted or workload.build(seed=seed)
        data = workload.prepare(adapted, dataset)
        if len(data) == 0:
            raise ValueError("a client needs at least one training example")
        keys = update_keys if update_keys is not None else list(adapted.trainable_names)
        return cls(workload, adapted, data, update_keys=keys, num_examples=len(data))

    @classmethod
    def from_config(
        cls, config: Config, dataset: TextDataset, *, update_keys: list[str] | None = None, adapted: AdaptedModel | None = None
    ) -> LocalTrainer:
        """The config-driven text-classification trainer for ``dataset``."""
        workload = TextClassification(config.model, config.peft, dataset.label_names)
        return cls.create(workload, dataset, seed=config.run.seed, update_keys=update_keys, adapted=adapted)

    def train(self, global_state: Mapping[str, np.ndarray], plan: Mapping[str, float], *, seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Train from ``global_state`` as ``plan`` says; return ``(delta, metrics)``."""
        model = self.adapted.model
        with TRAIN_LOCK:
            load_trainable_state(model, global_state)
            torch.manual_seed(seed)
            metrics = train_steps(
                model,
                self.workload,
                self.data,
                steps=int(plan["local_steps"]),
                batch_size=int(plan["batch_size"]),
                lr=float(plan["lr"]),
                weight_decay=float(plan.get("weight_decay", 0.0)),
                max_grad_norm=float(plan.get("max_grad_norm", 0.0)),
                seed=seed,
            )
            local = trainable_state(model)
        delta = {key: (local[key] - global_state[key]).astype(np.float32) for key in self.update_keys}
        return delta, metrics
