"""The interface of a differential-privacy mechanism in the round.

A mechanism acts at two points: on the client, before encoding (`client_transform`: clip
and, in distributed mode, add a noise share), and on the server after aggregation
(`server_transform`: central noise). `privacy_event` says what one release costs as a
`GaussianEvent`; the server composes it into the configured accountants
and writes the result to the privacy ledger before the new global adapter is released.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from privacy.accounting import GaussianEvent


class PrivacyMechanism(ABC):
    """Base class of every privacy mechanism; ``name`` is its ``[privacy] mode`` value.

    ``guarantee`` names what holds when the mechanism is used as configured (e.g.
    ``"client-level (epsilon, delta)-DP"``); ``"none"`` makes the audit report warn loudly.
    """

    name: ClassVar[str]
    guarantee: ClassVar[str] = "none"

    @abstractmethod
    def client_transform(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Transform a client's float update before it is encoded and uploaded."""

    @abstractmethod
    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: int) -> dict[str, np.ndarray]:
        """Transform the aggregated update on the server before it is applied."""

    @abstractmethod
    def privacy_event(self, *, cohort_size: int, population: int, contributions: int) -> GaussianEvent:
        """What releasing this round's aggregate costs.

        ``cohort_size`` clients were selected out of ``population`` connected ones and
        ``contributions`` updates arrived. A release without noise returns an event with
        ``noise_multiplier=0``, which every accountant reports as an unbounded epsilon.
        """

    def describe(self) -> dict[str, Any]:
        """Mechanism parameters for the ledger and the audit report (JSON-serialisable).

        The keys ``clip_norm`` and ``noise_multiplier`` are shown in the report's mechanism table.
        By default: mode, guarantee and the mechanism's settings (its ``__init__`` keyword
        arguments, read back from the attributes of the same name), so the ledger records the
        configured values, not the defaults.
        """
        settings = {
            name: getattr(self, name)
            for name, parameter in inspect.signature(type(self)).parameters.items()
            if parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)
            and isinstance(getattr(self, name, None), (bool, int, float, str))
        }
        return {"mode": self.name, "guarantee": self.guarantee, **settings}
