"""The interface of a simulated attack: how a malicious client changes its data and its update.

Attacks exist to evaluate defenses in simulation; a real deployment never instantiates one. An
attack may poison the client's local data before training (`Attack.poison_data`: label flipping,
backdoors) and replace the update after the honest client-side clipping would have run
(`Attack.apply`), so clipping does not cancel it. White-box attacks (ALIE, min-max) read the honest
updates of the round from the `AttackContext`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class AttackContext:
    """What a malicious client knows when it crafts its update.

    Attributes
    ----------
    round, client_id:
        Where the attack happens.
    honest_updates:
        The (clipped) updates honest clients of this round computed before this client, for
        white-box attacks; empty outside simulation.
    """

    round: int
    client_id: str
    honest_updates: Sequence[Mapping[str, np.ndarray]] = field(default_factory=tuple)


class Attack(ABC):
    """Base class of every attack; ``name`` is its ``[attack] kind`` value."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""

    @abstractmethod
    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Return the update a malicious client sends instead of its honest ``update``."""

    def apply(
        self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator, context: AttackContext
    ) -> dict[str, np.ndarray]:
        """Return the update to send, given the honest (clipped) one and the round's context.

        Default: `perturb` (the v0.1 hook). White-box attacks override this to read
        ``context.honest_updates``.
        """
        return self.perturb(update, rng=rng)

    def poison_data(self, dataset: Any, *, rng: np.random.Generator) -> Any:
        """Return the local data the malicious client trains on (default: unchanged)."""
        return dataset
