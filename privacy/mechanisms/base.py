"""The interface of a differential-privacy mechanism in the round.

A mechanism acts at two points: on the client, before encoding (:meth:`client_transform`: clip
and, in distributed mode, add a noise share), and on the server after aggregation
(:meth:`server_transform`: central noise). :meth:`ledger_entry` says what a release spent; the
server writes it to the privacy ledger before the new global adapter is released.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np


class PrivacyMechanism(ABC):
    """Base class of every privacy mechanism; ``name`` is its ``[privacy] mode`` value."""

    name: ClassVar[str]

    @abstractmethod
    def client_transform(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Transform a client's float update before it is encoded and uploaded."""

    @abstractmethod
    def server_transform(self, delta: Mapping[str, np.ndarray], *, num_contributions: int) -> dict[str, np.ndarray]:
        """Transform the aggregated update on the server before it is applied."""

    @abstractmethod
    def ledger_entry(self, *, round: int, cohort_size: int, contributions: int) -> dict[str, Any] | None:
        """Return what this round's release spent (a ledger line), or ``None`` if nothing."""

    def describe(self) -> dict[str, Any]:
        """Mechanism and parameters, for metrics and reports."""
        return {"mode": self.name}
