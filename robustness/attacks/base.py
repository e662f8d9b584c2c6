"""The interface of a simulated attack: how a malicious client changes its data and its update.

Attacks exist to evaluate defenses in simulation; a real deployment never instantiates one. An
attack may poison the client's local data before training (`Attack.poison_data`: label flipping,
backdoors) and replace the update after the honest client-side clipping would have run
(`Attack.apply`), so clipping does not cancel it. White-box attacks (ALIE, min-max) read the honest
updates of the round, the number of attackers and the defense from the `AttackContext`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from robustness.errors import RobustnessError


@dataclass(frozen=True)
class AttackContext:
    """What a malicious client knows when it crafts its update (white-box: everything below).

    Attributes
    ----------
    round, client_id:
        Where the attack happens.
    honest_updates:
        The (clipped) updates the honest clients of this round computed, for white-box attacks;
        empty outside simulation. A simulation runs the attackers of a round after every honest
        member of its cohort uploaded, so all attackers of a round see the same list.
    num_attackers:
        ``f``: the attackers in this round's cohort (the cohort members whose honest update is not
        on the board; at least 1, this client).
    cohort_size:
        ``n``: the clients of this round, honest and malicious.
    defense, defense_settings:
        The server's ``[robustness] defense`` and its effective settings.
    bucket_size:
        Clients per secure-aggregation bucket whose sum the server sees (1 in plain mode).
    server_lr:
        The server's learning rate ``eta`` (1.0 for FedAvg: the mean update is applied as is).
    """

    round: int
    client_id: str
    honest_updates: Sequence[Mapping[str, np.ndarray]] = field(default_factory=tuple)
    num_attackers: int = 1
    cohort_size: int = 1
    defense: str = "none"
    defense_settings: Mapping[str, Any] = field(default_factory=dict)
    bucket_size: int = 1
    server_lr: float = 1.0


class Attack(ABC):
    """Base class of every attack; ``name`` is its ``[attack] kind`` value.

    ``white_box`` attacks need the honest updates of the round (`AttackContext.honest_updates`),
    which only a simulation provides; they refuse to run without them.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    white_box: ClassVar[bool] = False

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

    def trigger_set(self, eval_dataset: Any) -> Any | None:
        """The held-out examples that measure the attack's own success, or ``None`` (the default).

        A backdoor returns the examples whose label is not its target, with the trigger inserted
        and the label set to the target: the model's accuracy on them is the backdoor accuracy, which
        a simulation reports every round as ``backdoor_accuracy``. Never used outside simulation.
        """
        return None

    def _needs_context(self) -> RobustnessError:
        """The error a white-box attack raises when it is called without the round's honest updates."""
        return RobustnessError(
            f"attack.kind={self.name!r} is white-box: it needs the honest updates of the round "
            "(AttackContext.honest_updates), which only a simulation provides (secure-fl simulate)"
        )
