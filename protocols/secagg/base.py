"""The interface every secure-aggregation protocol implements.

A protocol has a client half (`SecureAggregation.encode`: what leaves the client instead of
the raw update) and a server half (`SecureAggregation.aggregate`: turning everything that
arrived into per-bucket sums). The server's later stages (defenses, PEFT rules) only ever see
`BucketSum` objects, so the same round runs whatever the protocol: in ``plain`` mode every
client is a bucket of one; a masked or encrypted protocol hands on one sum per bucket.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from protocols.wire.serde import TensorSpec


@dataclass(frozen=True)
class Contribution:
    """What one client delivered for a round, after the wire layer validated it.

    Attributes
    ----------
    client_id:
        The sender.
    tensors:
        The decoded payload, exactly as the protocol's client half produced it.
    weight:
        The client's aggregation weight (number of training examples).
    """

    client_id: str
    tensors: Mapping[str, np.ndarray]
    weight: float


@dataclass(frozen=True)
class BucketSum:
    """The weighted sum of the updates of one bucket of clients.

    ``total`` holds ``sum_i w_i * update_i`` per tensor and ``weight`` holds ``sum_i w_i``, so
    ``mean()`` is the bucket's weighted mean update. In ``plain`` mode every bucket has a single
    member and the mean is that client's update.
    """

    total: Mapping[str, np.ndarray]
    weight: float
    members: tuple[str, ...]

    def mean(self) -> dict[str, np.ndarray]:
        """Return the weighted mean update of the bucket (``total / weight``)."""
        if self.weight <= 0:
            raise ValueError(f"bucket {self.members} has non-positive total weight {self.weight}")
        return {name: (value / self.weight).astype(np.float32) for name, value in self.total.items()}


class SecureAggregation(ABC):
    """A secure-aggregation protocol: one subclass per mode, registered under `name`.

    Attributes
    ----------
    name:
        The value of ``[secure] mode`` that selects the protocol.
    reveals_individual_updates:
        True when the server sees each client's update (plain mode). Defenses that need individual
        updates, and the privacy report, read this.
    """

    name: ClassVar[str]
    reveals_individual_updates: ClassVar[bool] = False

    @abstractmethod
    def encode(self, update: Mapping[str, np.ndarray], *, weight: float) -> dict[str, np.ndarray]:
        """Client half: turn a float update into the tensors that are uploaded."""

    @abstractmethod
    def payload_spec(self, update_spec: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
        """Return the specs of the upload for an update with the given tensor specs.

        The server validates every arriving payload against it before the protocol sees it.
        """

    @abstractmethod
    def aggregate(self, contributions: Sequence[Contribution]) -> list[BucketSum]:
        """Server half: combine the round's contributions into bucket sums."""

    def describe(self) -> dict[str, object]:
        """Return what the server can see under this protocol, for the audit report's threat model.

        Keys read by the report: ``server_sees_individual_updates``, ``bucket_size`` (clients per
        sum the server learns; 1 means individual updates) and ``key_custody`` (who holds the keys).
        """
        return {
            "mode": self.name,
            "server_sees_individual_updates": self.reveals_individual_updates,
            "bucket_size": 1 if self.reveals_individual_updates else None,
            "key_custody": None,
        }

    def state_dict(self) -> dict[str, Any]:
        """State kept across rounds, saved with every round's checkpoint (default: none).

        Values may be JSON-able scalars, lists and dicts, or numpy arrays. Settings (the
        ``__init__`` arguments) are not state: they come from the config.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (default: only the empty state is accepted)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but was given {sorted(state)}")
