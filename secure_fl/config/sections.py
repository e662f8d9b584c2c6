"""The config sections: one frozen, validated dataclass per TOML table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from secure_fl.config._checks import (
    _choice,
    _device,
    _fail,
    _fraction,
    _non_negative_float,
    _non_negative_int,
    _positive_float,
    _positive_int,
)
from secure_fl.config.params import Params, check_params


def _params_field(table: str) -> Any:
    return field(
        default_factory=Params,
        metadata={"help": f"settings of the selected plug-in (its keyword arguments), as a [{table}] table"},
    )


def _check_plugin_params(section: object, attribute: str, key: str, cls: type, what: str) -> None:
    """Validate and coerce ``section.<attribute>`` against the settings of plug-in class ``cls``."""
    checked = check_params(key, cls, getattr(section, attribute), what=what)
    object.__setattr__(section, attribute, checked)

BUILTIN_MODELS = ("minilm", "tiny-bert", "tiny-gpt2")
#: Built-in models that are decoders (``model.task = "causal-lm"``); the others are encoders (``"seq-cls"``).
DECODER_MODELS = ("tiny-gpt2",)
DATASETS = ("bbc-news", "synthetic", "file")
PARTITIONS = ("iid", "dirichlet")
TASKS = ("seq-cls", "causal-lm")
SAMPLING = ("fixed", "poisson")


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
    sampling: str = field(default="fixed", metadata={
        "help": "'fixed': clients_per_round clients from the seeded generator (run-level epsilon at q = 1); "
                "'poisson': each connected client independently with probability sample_rate, from the OS CSPRNG "
                "(secret; the run-level epsilon uses amplification by sampling)"
    })
    sample_rate: float = field(default=0.0, metadata={
        "help": "sampling = 'poisson' only: each client's selection probability q (0: clients_per_round / num_clients)"
    })
    device: str = field(default="auto", metadata={
        "help": "where local training and server evaluation run: 'auto' (the GPU when torch sees one, else the CPU), "
                "'cpu', 'cuda' or 'cuda:N' (refused where no CUDA device is visible); each party reads its own"
    })

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
        _choice("run.sampling", self.sampling, SAMPLING)
        _fraction("run.sample_rate", self.sample_rate)
        _device("run.device", self.device)
        if self.sample_rate and self.sampling != "poisson":
            _fail("run.sample_rate", f"is {self.sample_rate} but run.sampling = {self.sampling!r}; set run.sampling = 'poisson'")


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: the frozen base model and its tokenizer."""

    name: str = field(default="minilm", metadata={
        "help": "'minilm', 'tiny-bert' (encoders, seq-cls), 'tiny-gpt2' (a decoder, causal-lm) or a local "
                "transformers model directory"
    })
    task: str = field(default="seq-cls", metadata={
        "help": "training task: 'seq-cls' (text classification, reports accuracy) or 'causal-lm' (instruction or "
                "text fine-tuning of a decoder, reports loss and perplexity)"
    })
    max_length: int = field(default=128, metadata={"help": "tokens per example (longer texts are truncated)"})
    hidden_size: int = field(default=32, metadata={"help": "tiny-bert / tiny-gpt2 only: hidden size"})
    num_layers: int = field(default=2, metadata={"help": "tiny-bert / tiny-gpt2 only: transformer layers"})
    num_heads: int = field(default=2, metadata={"help": "tiny-bert / tiny-gpt2 only: attention heads"})
    intermediate_size: int = field(default=64, metadata={"help": "tiny-bert / tiny-gpt2 only: feed-forward size"})
    initializer_range: float = field(default=0.2, metadata={"help": "tiny-bert / tiny-gpt2 only: std of the random weights"})

    def __post_init__(self) -> None:
        if not self.name:
            _fail("model.name", f"must be one of {', '.join(BUILTIN_MODELS)} or a local model directory")
        _choice("model.task", self.task, TASKS)
        if self.task == "causal-lm" and self.name in BUILTIN_MODELS and self.name not in DECODER_MODELS:
            _fail("model.name", f"{self.name!r} is an encoder; model.task = 'causal-lm' needs a decoder: "
                  f"{', '.join(repr(m) for m in DECODER_MODELS)} or a local causal-LM checkpoint directory")
        if self.task != "causal-lm" and self.name in DECODER_MODELS:
            _fail("model.task", f"is {self.task!r} but model.name = {self.name!r} is a decoder; set model.task = 'causal-lm'")
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
    target_modules: tuple[str, ...] = field(default=("query", "value"), metadata={
        "help": "module names that get LoRA (default for model.task = 'causal-lm': [\"c_attn\"], GPT-2's attention; "
                "Llama-style checkpoints use [\"q_proj\", \"v_proj\"])"
    })
    modules_to_save: tuple[str, ...] = field(default=("classifier",), metadata={
        "help": "modules trained in full and sent (the head; default for model.task = 'causal-lm': none)"
    })
    rule: str = field(default="fedit", metadata={"help": "PEFT aggregation rule"})
    rule_params: Params = _params_field("peft.rule_params")

    def __post_init__(self) -> None:
        _positive_int("peft.r", self.r)
        _positive_float("peft.alpha", self.alpha)
        _fraction("peft.dropout", self.dropout, open_high=True)
        if not self.target_modules:
            _fail("peft.target_modules", "needs at least one module name")
        from secure_fl.peft_agg.registry import available, plugin_class

        _choice("peft.rule", self.rule, available())
        _check_plugin_params(self, "rule_params", "peft.rule_params", plugin_class(self.rule), f"rule {self.rule!r}")


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: where the examples come from and how they are split among clients."""

    dataset: str = field(default="bbc-news", metadata={
        "help": "'bbc-news' (bundled), 'synthetic' or 'file' (causal-lm: bbc-news is plain text, synthetic a "
                "generated instruction set)"
    })
    path: str = field(default="", metadata={
        "help": "CSV/JSONL file for dataset='file' (causal-lm: JSONL, each line with prompt and response keys, or a "
                "text key)"
    })
    test_path: str = field(default="", metadata={"help": "optional separate test file for dataset='file'"})
    text_column: str = field(default="text", metadata={"help": "column/key holding the text (causal-lm: plain-LM text)"})
    prompt_column: str = field(default="prompt", metadata={
        "help": "causal-lm only: JSONL key of the instruction prompt (masked out of the loss, used verbatim)"
    })
    response_column: str = field(default="response", metadata={
        "help": "causal-lm only: JSONL key of the response (the tokens the loss is computed on)"
    })
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
        for name in ("text_column", "prompt_column", "response_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _fail(f"data.{name}", f"must be a non-empty string, got {getattr(self, name)!r}")


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
    bucket_size: int = field(default=0, metadata={
        "help": "most clients per bucket: the cohort is split at random into buckets whose sums the server "
                "learns (0: one bucket, the whole cohort) under secagg+, bfv and ckks; in plain mode the server averages random "
                "buckets of the individual updates before the defense (bucketing, Karimireddy et al. 2022; 0 or 1: "
                "no bucketing)"
    })
    params: Params = _params_field("secure.params")

    def __post_init__(self) -> None:
        import inspect

        from protocols.secagg.registry import available, plugin_class

        _choice("secure.mode", self.mode, available())
        _non_negative_int("secure.bucket_size", self.bucket_size)
        cls = plugin_class(self.mode)
        in_params = Params(self.params).get("bucket_size")
        # Plain mode: the server buckets the revealed updates itself (secure_fl.server.pipeline).
        if self.bucket_size and not getattr(cls, "reveals_individual_updates", False):
            if "bucket_size" not in inspect.signature(cls).parameters:
                _fail("secure.bucket_size", f"secure mode {self.mode!r} does not split the cohort into buckets; "
                      "use secure.mode='secagg+' (or leave bucket_size at 0)")
            if in_params is not None and in_params != self.bucket_size:
                _fail("secure.bucket_size", f"is {self.bucket_size} but secure.params.bucket_size is {in_params}; "
                      "set one of them")
            object.__setattr__(self, "params", Params({**Params(self.params).to_dict(), "bucket_size": self.bucket_size}))
        _check_plugin_params(self, "params", "secure.params", cls, f"secure mode {self.mode!r}")
        if not self.bucket_size and isinstance(self.params.get("bucket_size"), int):
            object.__setattr__(self, "bucket_size", self.params["bucket_size"])


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: the differential-privacy mechanism and how its spend is accounted."""

    mode: str = field(default="none", metadata={"help": "differential-privacy mode"})
    delta: float = field(default=1e-5, metadata={"help": "delta of every reported (epsilon, delta)"})
    accountants: tuple[str, ...] = field(
        default=("rdp", "prv"), metadata={"help": "accountants whose epsilon the ledger and report show"}
    )
    target_epsilon: float = field(default=0.0, metadata={
        "help": "run-level budget at delta (0: none): z is calibrated for run.rounds releases unless "
                "privacy.params.noise_multiplier is set (then the target is a cap); a round that would pass it is not run"
    })
    client_target_epsilon: float = field(default=0.0, metadata={
        "help": "per-client budget at delta (0: none): a client whose own epsilon (releases it took part in, "
                "q = 1) would pass it is no longer selected"
    })
    params: Params = _params_field("privacy.params")
    dp_sgd: bool = field(default=False, metadata={
        "help": "also train every client with sample-level DP-SGD (opacus), on top of a client-level mode; "
                "implied by mode = 'dp-sgd'"
    })
    dp_sgd_params: Params = field(
        default_factory=Params,
        metadata={"help": "DP-SGD settings (noise_multiplier, max_grad_norm), as a [privacy.dp_sgd_params] table"},
    )
    audit: bool = field(
        default=False,
        metadata={"help": "after `secure-fl simulate`, run the one-run empirical audit with canary clients "
                          "(canary examples in DP-SGD for mode dp-sgd; as `secure-fl audit RUN_DIR --empirical`)"},
    )
    audit_canaries: int = field(
        default=100, metadata={"help": "canaries (clients, or DP-SGD examples for mode dp-sgd) of the empirical audit (each inserted with probability 1/2)"}
    )

    def __post_init__(self) -> None:
        from privacy.accounting.registry import available as accountants
        from privacy.dpsgd import DPSGD
        from privacy.mechanisms.registry import available, plugin_class

        _choice("privacy.mode", self.mode, available())
        _check_plugin_params(self, "params", "privacy.params", plugin_class(self.mode), f"privacy mode {self.mode!r}")
        if not isinstance(self.dp_sgd, bool):
            _fail("privacy.dp_sgd", f"must be true or false, got {self.dp_sgd!r}")
        if self.mode == "dp-sgd":
            object.__setattr__(self, "dp_sgd", True)  # the resolved config says so explicitly
        elif self.dp_sgd and self.mode == "none":
            _fail("privacy.dp_sgd", "is true with privacy.mode = 'none'; for sample-level DP alone use "
                  "privacy.mode = 'dp-sgd', or pick a client-level mode to combine DP-SGD with")
        if self.dp_sgd_params and not self.dp_sgd:
            _fail("privacy.dp_sgd_params", "is set but DP-SGD is off; set privacy.mode = 'dp-sgd' or "
                  "privacy.dp_sgd = true (or remove the table)")
        _check_plugin_params(self, "dp_sgd_params", "privacy.dp_sgd_params", DPSGD, "DP-SGD")
        try:
            DPSGD(**dict(self.dp_sgd_params))
        except ValueError as exc:
            named = next((k for k in self.dp_sgd_params if str(exc).startswith(k)), None)
            _fail(f"privacy.dp_sgd_params.{named}" if named else "privacy.dp_sgd_params", str(exc))
        _fraction("privacy.delta", self.delta, open_low=True, open_high=True)
        if not self.accountants:
            _fail("privacy.accountants", "needs at least one accountant, e.g. [\"rdp\"]")
        if len(set(self.accountants)) != len(self.accountants):
            _fail("privacy.accountants", f"names an accountant twice: {list(self.accountants)}")
        for name in self.accountants:
            _choice("privacy.accountants", name, accountants())
        for name in ("target_epsilon", "client_target_epsilon"):
            _non_negative_float(f"privacy.{name}", getattr(self, name))
            if getattr(self, name) and self.mode == "none":
                _fail(f"privacy.{name}", f"is {getattr(self, name)} but privacy.mode = 'none' releases without noise "
                      "(epsilon unbounded from round 1); choose a differential-privacy mode")
        if not isinstance(self.audit, bool):
            _fail("privacy.audit", f"must be true or false, got {self.audit!r}")
        _positive_int("privacy.audit_canaries", self.audit_canaries)
        if self.audit_canaries < 10:
            _fail("privacy.audit_canaries", f"is {self.audit_canaries}; the audit needs at least 10 canaries "
                  "to bound anything (100 or more for a bound above 1)")


@dataclass(frozen=True)
class RobustnessConfig:
    """``[robustness]``: the Byzantine defense and the per-client reputation (RFFL).

    A setting of the selected defense may also be written directly in ``[robustness]``
    (``f = 2`` for ``[robustness.params] f = 2``); it is stored under ``params``.
    """

    defense: str = field(default="none", metadata={
        "help": "robust aggregation rule, run across the rows the server sees (client updates in plain mode, "
                "bucket means when secure.bucket_size splits the cohort)"
    })
    params: Params = _params_field("robustness.params")
    reputation: bool = field(default=False, metadata={
        "help": "keep a reputation per client (RFFL, Xu and Lyu 2021): cosine agreement of what the client took "
                "part in with the aggregate, smoothed over rounds; rows are weighted by it and clients below the "
                "threshold are removed for the rest of the run"
    })
    reputation_alpha: float = field(default=0.95, metadata={
        "help": "smoothing of the reputation: r <- alpha r + (1 - alpha) cosine score (RFFL uses 0.95)"
    })
    reputation_threshold: float = field(default=1.0 / 3.0, metadata={
        "help": "a client whose normalised reputation falls below threshold / (reputable clients) is removed"
    })
    reputation_warmup: int = field(default=10, metadata={
        "help": "rounds of reputation updates before any client may be removed (RFFL: 10)"
    })

    def __post_init__(self) -> None:
        from robustness.defenses.registry import available, plugin_class

        _choice("robustness.defense", self.defense, available())
        _check_plugin_params(self, "params", "robustness.params", plugin_class(self.defense), f"defense {self.defense!r}")
        if not isinstance(self.reputation, bool):
            _fail("robustness.reputation", f"must be true or false, got {self.reputation!r}")
        _fraction("robustness.reputation_alpha", self.reputation_alpha, open_high=True)
        _fraction("robustness.reputation_threshold", self.reputation_threshold, open_high=True)
        _non_negative_int("robustness.reputation_warmup", self.reputation_warmup)

    @staticmethod
    def shorthand_settings(values: Any) -> tuple[str, ...]:
        """The keys of ``[robustness]`` that are settings of its defense (moved into ``params``)."""
        from robustness.defenses.registry import available, plugin_class

        from secure_fl.config.params import plugin_settings

        name = values.get("defense", "none") if hasattr(values, "get") else "none"
        if not isinstance(name, str) or name not in available():
            return ()
        return tuple(plugin_settings(plugin_class(name)))


@dataclass(frozen=True)
class AttackConfig:
    """``[attack]``: simulated attackers, for evaluating defenses (simulation only)."""

    kind: str = field(default="none", metadata={"help": "attack behaviour of the malicious clients"})
    fraction: float = field(default=0.0, metadata={"help": "share of clients that are malicious"})
    params: Params = _params_field("attack.params")

    def __post_init__(self) -> None:
        from robustness.attacks.registry import available, plugin_class

        _choice("attack.kind", self.kind, available())
        _check_plugin_params(self, "params", "attack.params", plugin_class(self.kind), f"attack {self.kind!r}")
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
    max_chunks: int = field(default=4096, metadata={
        "help": "most chunks one upload stream may carry beyond what its payload needs at chunk_size: a stream "
                "may carry max(max_chunks, ceil(total_bytes / chunk_size)) chunks, so a client that chunks as "
                "configured is never refused and a stream of tiny chunks is cut off early (INVALID_ARGUMENT)"
    })
    max_requests_per_second: float = field(default=100.0, metadata={
        "help": "calls per second one party (its certificate id under mTLS, else its client id) may make on "
                "average; more gets RESOURCE_EXHAUSTED and the client retries later; 0 turns the limit off. "
                "Honest clients poll twice a second, the Ray runner at most about 50 times"
    })
    request_burst: int = field(default=200, metadata={
        "help": "calls a party may make at once above max_requests_per_second (its token bucket's size)"
    })
    max_silent_parties: int = field(default=256, metadata={
        "help": "most joined parties kept while silent for longer than liveness_timeout; beyond it the "
                "longest-silent are evicted (never one the open round waits for; they may join again)"
    })
    max_inflight_bytes: int = field(default=2 << 30, metadata={
        "help": "bytes of uploads the server holds at once: an upload reserves its declared size before its "
                "first chunk is read, or is refused with RESOURCE_EXHAUSTED (the client retries); "
                "at least max_update_bytes"
    })

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
        _positive_int("transport.max_chunks", self.max_chunks)
        _non_negative_float("transport.max_requests_per_second", self.max_requests_per_second)
        _positive_int("transport.request_burst", self.request_burst)
        _non_negative_int("transport.max_silent_parties", self.max_silent_parties)
        _positive_int("transport.max_inflight_bytes", self.max_inflight_bytes)
        if self.max_inflight_bytes < self.max_update_bytes:
            _fail("transport.max_inflight_bytes",
                  f"{self.max_inflight_bytes} is below transport.max_update_bytes={self.max_update_bytes}: "
                  "the largest accepted upload could never be received")


#: ``[simulation] backend`` values.
BACKENDS = ("in-process", "ray")
#: The resources a Ray party runner may ask for, with their defaults.
CLIENT_RESOURCES = {"num_cpus": 1.0, "num_gpus": 0.0}


@dataclass(frozen=True)
class SimulationConfig:
    """``[simulation]``: where ``secure-fl simulate`` runs the selected parties' work."""

    backend: str = field(default="in-process", metadata={
        "help": "'in-process' (threads of this process) or 'ray' (Ray actors, local instance or a cluster; "
                "pip install 'secure-fl[ray]')"
    })
    ray_address: str = field(default="", metadata={
        "help": "Ray cluster to join (e.g. 'ray://head:10001' or 'auto'); '' starts a local Ray instance"
    })
    client_resources: Params = field(default_factory=lambda: Params(CLIENT_RESOURCES), metadata={
        "help": "resources of each Ray party runner: {num_cpus = 1, num_gpus = 0} (num_gpus < 1 shares a GPU)"
    })
    max_runners: int = field(default=0, metadata={
        "help": "most Ray party runners at once (0: as many as the cluster's resources and the cohort allow)"
    })

    def __post_init__(self) -> None:
        _choice("simulation.backend", self.backend, BACKENDS)
        if not isinstance(self.ray_address, str):
            _fail("simulation.ray_address", f"must be a string, got {self.ray_address!r}")
        _non_negative_int("simulation.max_runners", self.max_runners)
        given = dict(self.client_resources)
        unknown = sorted(set(given) - set(CLIENT_RESOURCES))
        if unknown:
            _fail(f"simulation.client_resources.{unknown[0]}",
                  f"is not a resource secure-fl asks Ray for; allowed: {', '.join(CLIENT_RESOURCES)}")
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                _fail(f"simulation.client_resources.{name}", f"must be a number >= 0, got {value!r}")
            _non_negative_float(f"simulation.client_resources.{name}", float(value))
        resources = {**CLIENT_RESOURCES, **{k: float(v) for k, v in given.items()}}
        if resources["num_cpus"] <= 0 and resources["num_gpus"] <= 0:
            _fail("simulation.client_resources", "asks for no CPU and no GPU; give num_cpus > 0 or num_gpus > 0")
        object.__setattr__(self, "client_resources", Params(resources))


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
    "simulation": SimulationConfig,
}

