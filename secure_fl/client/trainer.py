"""Local training on one party's data: global adapter in, the rule's client message out.

By default the message is the trained adapter tensors (LoRA factors and the saved head) after
local training minus the ones training started from, restricted to the tensors the aggregation
rule says travel; a rule may define another message (`AggregationRule.client_message`), shape
the model at build time and merge released adapters into the base (`secure_fl.peft_agg.hooks`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from privacy.dpsgd import DPSGD, DPSGDUnsupported, sample_rate
from secure_fl.config import Config
from secure_fl.data import InstructionDataset, TextDataset
from secure_fl.device import on_device, resolve_device, to_device
from secure_fl.errors import ConfigError, RunError
from secure_fl.models import BUILD_LOCK, AdaptedModel, load_trainable_state, model_info, trainable_state
from secure_fl.peft_agg import AggregationRule, create_rule
from secure_fl.peft_agg.hooks import MERGES_PLAN_KEY, own_shapes, rule_fingerprint, shape_model, sync_base, trained_shapes
from secure_fl.stages import SAMPLE_RATE_INFO_KEY, build_sample_level, build_stage
from secure_fl.tasks import train_steps
from secure_fl.tensors import Layout
from secure_fl.workload import Batches, Workload, config_workload


#: Local training seeds torch's process-global RNG (dropout), and so does every seeded model build.
#: Clients that share a process (threads in tests, notebooks, the loopback example) train one at a
#: time, and never while a model is being built (one lock for both: a training thread re-seeding the
#: global RNG in the middle of another thread's seeded build made that build, and the run, differ);
#: separate client processes, as in a deployment, train in parallel.
TRAIN_LOCK = BUILD_LOCK


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, round, client id) via SHA-256."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def split_local(dataset: Any, fraction: float, *, seed: int) -> tuple[Any, Any | None]:
    """Split a client's dataset into (train, held-out) parts; ``fraction`` 0 keeps everything."""
    n = len(dataset)
    k = min(n - 1, max(1, int(round(n * fraction)))) if fraction > 0 and n >= 2 else 0
    if k == 0:
        return dataset, None
    order = np.random.default_rng(seed).permutation(n)
    held, kept = np.sort(order[:k]), np.sort(order[k:])
    if isinstance(dataset, (TextDataset, InstructionDataset)):
        return dataset.subset(kept), dataset.subset(held)
    from torch.utils.data import Subset

    return Subset(dataset, kept.tolist()), Subset(dataset, held.tolist())


#: The config keys a refusal of DP-SGD on a model names.
DP_SGD_MODEL_KEYS = "privacy.mode / privacy.dp_sgd, peft.target_modules, peft.modules_to_save"


def check_dp_sgd(dp_sgd: DPSGD, workload: Workload, adapted: AdaptedModel, data: Batches | None) -> None:
    """Refuse, at start, a model whose trainable parameters opacus cannot give per-example gradients.

    The static checks always run; with ``data`` (two of its examples) one forward/backward under
    opacus proves every trainable tensor gets its per-example gradient, so a round never fails
    halfway. Raises `ConfigError` naming the keys that decide what trains.
    """
    try:
        with TRAIN_LOCK:
            if data is not None and len(data) > 0:
                index = torch.arange(min(2, len(data)))
                dp_sgd.check_per_sample_gradients(adapted.model, workload.loss, data.batch(index))
            else:
                dp_sgd.check_model(adapted.model)
    except DPSGDUnsupported as exc:
        raise ConfigError(
            f"DP-SGD (privacy.dp_sgd) cannot train this model: {exc}; opacus needs per-example gradients of every "
            f"trainable tensor: change {DP_SGD_MODEL_KEYS} (LoRA on linear layers such as "
            "target_modules = [\"query\", \"value\"] works), or turn DP-SGD off",
            key="privacy.dp_sgd",
        ) from None


class LocalTrainer:
    """Holds a model and one client's prepared data; trains one round at a time.

    In simulation many trainers share one `AdaptedModel`: each round starts by loading
    the global adapter into it, so sharing is safe as long as clients train one after another.

    Training (and the local evaluation before it) runs on ``device`` (``run.device``, see
    `secure_fl.device`): the model moves there for the round and back afterwards, and
    the message is always CPU float32 numpy arrays.
    """

    def __init__(
        self,
        workload: Workload,
        adapted: AdaptedModel,
        data: Batches,
        *,
        update_keys: list[str],
        num_examples: int,
        eval_data: Batches | None = None,
        eval_batch_size: int = 64,
        rule: AggregationRule | None = None,
        dp_sgd: DPSGD | None = None,
        dp_plan: tuple[int, int] | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.workload = workload
        self.adapted = adapted
        self.data = data
        self.update_keys = list(update_keys)
        self.num_examples = num_examples
        self.eval_data = eval_data
        self.eval_batch_size = eval_batch_size
        #: The client half of ``peft.rule`` (its hooks); default: the base class's, i.e. FedIT's.
        self.rule: AggregationRule = rule if rule is not None else create_rule("fedit")
        #: Sample-level DP-SGD (``privacy.dp_sgd``), or ``None`` for the ordinary training loop.
        self.dp_sgd = dp_sgd
        #: ``(local_steps, batch_size)`` this client's DP-SGD accounting is declared for.
        self.dp_plan = dp_plan
        if dp_sgd is not None and dp_plan is None:
            raise ValueError("DP-SGD needs the (local_steps, batch_size) it is accounted for")
        #: Canary examples' gradients for the sample-level empirical audit (`privacy.dpsgd.DPSGD.train`);
        #: set only by `secure_fl.empirical_audit.CanaryExamples` in an audit run.
        self.canaries: np.ndarray | None = None
        #: Where local training and evaluation run (``run.device``, resolved); the CPU by default.
        self.device = device if device is not None else torch.device("cpu")

    @classmethod
    def create(
        cls,
        workload: Workload,
        dataset: Any,
        config: Config,
        *,
        adapted: AdaptedModel | None = None,
    ) -> LocalTrainer:
        """Build (or reuse) the workload's model and prepare ``dataset`` once.

        The model is shaped by the configured ``peft.rule`` (with its ``[peft.rule_params]``) as on
        the server (its `prepare_model` and `trained_keys`, see
        `secure_fl.peft_agg.hooks.build_for_rule`; a given ``adapted`` is shaped unless it already
        was), and the tensors that travel are the ones the rule names (its ``update_keys``), so
        every caller sends exactly what the server expects. ``run.device`` is resolved here, so a
        CUDA setting on a machine without CUDA is refused before anything is built.

        With ``client.eval_fraction > 0`` a seeded share of the local examples is held out (never
        trained on) to evaluate each global adapter the client receives (federated evaluation).
        """
        seed = config.run.seed
        device = resolve_device(config.run.device)
        rule = build_stage(config, "rule")
        adapted = shape_model(adapted or workload.build(seed=seed), rule, seed=seed)
        train_part, eval_part = split_local(dataset, config.client.eval_fraction, seed=seed)
        data = workload.prepare(adapted, train_part)
        if len(data) == 0:
            raise ValueError("a client needs at least one training example")
        eval_data = workload.prepare(adapted, eval_part) if eval_part is not None else None
        keys = rule.update_keys(adapted.trainable_names)
        dp_sgd = build_sample_level(config)
        if dp_sgd is not None:
            check_dp_sgd(dp_sgd, workload, adapted, data)
        return cls(
            workload,
            adapted,
            data,
            update_keys=keys,
            num_examples=len(data),
            eval_data=eval_data,
            eval_batch_size=config.client.eval_batch_size,
            rule=rule,
            dp_sgd=dp_sgd,
            dp_plan=(config.client.local_steps, config.client.batch_size) if dp_sgd is not None else None,
            device=device,
        )

    @classmethod
    def from_config(
        cls, config: Config, dataset: TextDataset | InstructionDataset, *, adapted: AdaptedModel | None = None
    ) -> LocalTrainer:
        """The config-driven trainer for ``dataset`` (text classification or causal LM, as ``model.task`` says)."""
        workload = config_workload(config, dataset.label_names)
        return cls.create(workload, dataset, config, adapted=adapted)

    def fingerprint(self) -> str:
        """The model fingerprint this client presents at Join (the rule's view of it); cached on the model."""
        key = (self.rule.name, self.adapted.merges_done)
        if key not in self.adapted.fingerprints:
            self.adapted.fingerprints[key] = rule_fingerprint(self.adapted.model, self.rule)
        return self.adapted.fingerprints[key]

    @property
    def sample_rate(self) -> float | None:
        """The Poisson sampling rate of this client's DP-SGD steps (``None`` without DP-SGD)."""
        if self.dp_sgd is None or self.dp_plan is None:
            return None
        return sample_rate(self.dp_plan[1], self.num_examples)

    def join_info(self) -> dict[str, str]:
        """The Join ``info``: the model's layout facts plus what the rule adds (e.g. the LoRA rank).

        Under DP-SGD also `SAMPLE_RATE_INFO_KEY`, the sampling rate the server records each round.
        """
        info = {**model_info(self.adapted.model), **self.rule.join_info(self.adapted.model)}
        if self.sample_rate is not None:
            info[SAMPLE_RATE_INFO_KEY] = repr(self.sample_rate)
        return info

    def start_state(self, global_state: Mapping[str, np.ndarray], plan: Mapping[str, float]) -> dict[str, np.ndarray]:
        """What training starts from: the global adapter in this client's shapes, after any base merge.

        A merging rule folds the released adapter in the global shapes (the server's), then the
        restart state is cut to this client's shapes.
        """
        state = global_state if isinstance(global_state, dict) else dict(global_state)
        state = sync_base(self.rule, self.adapted, state, merges=int(plan.get(MERGES_PLAN_KEY, 0)))
        if own_shapes(self.rule):
            state = self.rule.to_client(state, trained_shapes(self.adapted.model))
        return state

    def train(self, global_state: Mapping[str, np.ndarray], plan: Mapping[str, float], *, seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Train from ``global_state`` as ``plan`` says; return ``(message, metrics)``.

        The message is the rule's `client_message` (by default the delta from the start state).
        """
        model = self.adapted.model
        with TRAIN_LOCK:
            start = self.start_state(global_state, plan)
            load_trainable_state(model, start)
            evaluation: dict[str, float] = {}
            with on_device(model, self.device):
                if self.eval_data is not None:
                    scores = self.workload.evaluate(model, self.eval_data, batch_size=self.eval_batch_size)
                    evaluation = {f"eval_{k}": v for k, v in scores.items()}
                    evaluation["eval_examples"] = float(len(self.eval_data))
                torch.manual_seed(seed)
                if self.dp_sgd is not None:
                    metrics = self._train_private(plan)
                else:
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
        message = self.rule.client_message(local, start, self.update_keys)
        if self.rule.aligns_on_client:  # the upload has the global shapes (sums work under every secure mode)
            message = self.rule.align(message, Layout.of(self.upload_template(message)))
        return message, {**metrics, **evaluation}

    def upload_template(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Zero tensors of the shapes this client uploads for ``tensors`` (the rule's `upload_shapes`)."""
        if not self.rule.aligns_on_client:
            return dict(tensors)
        shapes = self.rule.upload_shapes({k: tuple(np.shape(v)) for k, v in tensors.items()})
        return {k: np.zeros(shapes[k], dtype=np.asarray(v).dtype) for k, v in tensors.items()}

    def _train_private(self, plan: Mapping[str, float]) -> dict[str, Any]:
        """DP-SGD for the steps and batch size this client declared; a plan asking for others is refused.

        Returns no training metrics: the loss and the sampled batch sizes are functions of the
        private examples that DP-SGD does not cover, so they never leave the client.
        """
        assert self.dp_sgd is not None and self.dp_plan is not None
        steps, batch_size = self.dp_plan
        asked = (int(plan["local_steps"]), int(plan["batch_size"]))
        if asked != (steps, batch_size):
            raise RunError(
                f"the server's plan asks for local_steps={asked[0]}, batch_size={asked[1]}, but this client's DP-SGD "
                f"is accounted for client.local_steps={steps}, client.batch_size={batch_size}; refusing to train"
            )
        device = self.device
        self.dp_sgd.train(
            self.adapted.model, self.workload.loss, lambda index: to_device(self.data.batch(index), device), self.num_examples,
            steps=steps, batch_size=batch_size, lr=float(plan["lr"]), weight_decay=float(plan.get("weight_decay", 0.0)),
            canaries=self.canaries,
        )
        return {}
