"""Registry of PEFT aggregation rules: one file plus one line in ``_RULES`` each."""

from __future__ import annotations

from protocols._registry import Registry
from secure_fl.peft_agg.base import AggregationRule
from secure_fl.peft_agg.fed_sb import FedSB
from secure_fl.peft_agg.fedit import FedIT
from secure_fl.peft_agg.ffa_lora import FFALoRA
from secure_fl.peft_agg.flora import FLoRA
from secure_fl.peft_agg.lora_fair import LoRAFAIR
from secure_fl.peft_agg.rank_vote import RankVote

_RULES: Registry[AggregationRule] = Registry(
    "PEFT aggregation rule",
    "peft.rule",
    {
        "fedit": FedIT,
        "ffa-lora": FFALoRA,
        "fed-sb": FedSB,
        "rank-vote": RankVote,
        "flora": FLoRA,
        "lora-fair": LoRAFAIR,
    },
)


#: ``register_rule(name, cls, force=False)``: add a plug-in class (its ``name`` attribute must match).
register_rule = _RULES.register
#: ``create_rule(name, **kwargs)``: instantiate the plug-in registered under ``name``.
create_rule = _RULES.create
#: ``available()``: the registered names, sorted.
available = _RULES.names
#: ``plugin_class(name)``: the class registered under ``name`` (its settings are its keyword arguments).
plugin_class = _RULES.get
