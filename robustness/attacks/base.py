"""The interface of a simulated attack: how a malicious client changes its update.

Attacks exist to evaluate defenses in simulation; a real deployment never instantiates one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import numpy as np


class Attack(ABC):
    """Base class of every attack; ``name`` is its ``[attack] kind`` value."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""

    @abstractmethod
    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Return the update a malicious client sends instead of its honest ``update``."""
