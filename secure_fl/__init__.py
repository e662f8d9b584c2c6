"""secure-fl: federated fine-tuning of PEFT adapters with privacy and robustness built in.

The round: select a cohort -> send the global adapter -> local LoRA training -> secure encoding
-> gRPC upload -> secure aggregation -> defense -> PEFT-aware aggregation -> DP -> new adapter.
Every stage is a plug-in named in the config.
"""

from __future__ import annotations

from pathlib import Path as _Path

import privacy as _privacy
import protocols as _protocols
import robustness as _robustness

_ROOT = _Path(__file__).resolve().parent.parent
for _package in (_privacy, _protocols, _robustness):
    if _package.__file__ is None or _Path(_package.__file__).resolve().parent.parent != _ROOT:
        raise ImportError(
            f"the top-level package {_package.__name__!r} at {_package.__file__} is not secure-fl's "
            f"(expected under {_ROOT}); another installed distribution shadows it. Uninstall it or use a "
            "separate virtual environment."
        )

from secure_fl.config import (  # noqa: E402
    AttackConfig,
    ClientConfig,
    Config,
    DataConfig,
    ModelConfig,
    PeftSection,
    PrivacyConfig,
    RobustnessConfig,
    RunConfig,
    SecureConfig,
    TransportConfig,
    load_config,
    load_preset,
)
from secure_fl.errors import ConfigError, ModelError, RunError, SecureFLError, TransportError  # noqa: E402
from secure_fl.data.datasets import DataError  # noqa: E402

__version__ = "0.1.0"

# Heavy names (they import torch / transformers) load on first use, so `secure-fl --help` and
# config handling stay fast.
_LAZY = {
    "simulate": "secure_fl.simulation",
    "Server": "secure_fl.api",
    "serve": "secure_fl.api",
    "run_client": "secure_fl.api",
    "ClientSummary": "secure_fl.api",
    "RunResult": "secure_fl.server.engine",
    "Callback": "secure_fl.callbacks",
    "EarlyStopping": "secure_fl.callbacks",
    "Workload": "secure_fl.workload",
    "CustomWorkload": "secure_fl.workload",
    "TextClassification": "secure_fl.workload",
    "CausalLM": "secure_fl.workload",
    "TextDataset": "secure_fl.data.datasets",
    "InstructionDataset": "secure_fl.data.instructions",
    "load_adapter": "secure_fl.models",
    "AggregationRule": "secure_fl.peft_agg",
    "register_rule": "secure_fl.peft_agg",
    "Defense": "robustness.defenses",
    "DefenseResult": "robustness.defenses",
    "register_defense": "robustness.defenses",
    "SecureAggregation": "protocols.secagg",
    "BucketSum": "protocols.secagg",
    "Contribution": "protocols.secagg",
    "register_secure_aggregation": "protocols.secagg",
    "ServerRound": "protocols.secagg",
    "ClientRound": "protocols.secagg",
    "Phase": "protocols.secagg",
    "PhaseData": "protocols.secagg",
    "PhaseResult": "protocols.secagg",
    "AnswerSpec": "protocols.secagg",
    "BlobSpec": "protocols.secagg",
    "RoundContext": "protocols.secagg",
    "ClientContext": "protocols.secagg",
    "MechanismContext": "privacy.mechanisms",
    "AttackContext": "robustness.attacks",
    "PrivacyMechanism": "privacy.mechanisms",
    "register_privacy_mechanism": "privacy.mechanisms",
    "Accountant": "privacy.accounting",
    "GaussianEvent": "privacy.accounting",
    "register_accountant": "privacy.accounting",
    "create_accountant": "privacy.accounting",
    "audit": "secure_fl.audit",
    "AuditReport": "secure_fl.audit",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'secure_fl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))

__all__ = [
    "Accountant",
    "AggregationRule",
    "AnswerSpec",
    "AttackContext",
    "AuditReport",
    "BlobSpec",
    "ClientContext",
    "ClientRound",
    "MechanismContext",
    "Phase",
    "PhaseData",
    "PhaseResult",
    "RoundContext",
    "ServerRound",
    "GaussianEvent",
    "audit",
    "create_accountant",
    "register_accountant",
    "AttackConfig",
    "BucketSum",
    "Callback",
    "CausalLM",
    "ClientSummary",
    "Contribution",
    "CustomWorkload",
    "DataError",
    "Defense",
    "DefenseResult",
    "EarlyStopping",
    "InstructionDataset",
    "PrivacyMechanism",
    "RunResult",
    "SecureAggregation",
    "Server",
    "TextClassification",
    "TextDataset",
    "Workload",
    "load_adapter",
    "register_defense",
    "register_privacy_mechanism",
    "register_rule",
    "register_secure_aggregation",
    "run_client",
    "serve",
    "simulate",
    "ClientConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "ModelError",
    "PeftSection",
    "PrivacyConfig",
    "RobustnessConfig",
    "RunConfig",
    "RunError",
    "SecureConfig",
    "SecureFLError",
    "TransportConfig",
    "TransportError",
    "__version__",
    "load_config",
    "load_preset",
]
