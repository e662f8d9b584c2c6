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
    if _Path(_package.__file__).resolve().parent.parent != _ROOT:
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

__version__ = "0.1.0"

__all__ = [
    "AttackConfig",
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
