"""``backdoor``: scaled model replacement with a trigger phrase (Bagdasaryan et al., AISTATS 2020)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from robustness.attacks._data import check_dataset, check_label, replace, with_trigger
from robustness.attacks._vectors import flatten, unflatten
from robustness.attacks.base import Attack, AttackContext


class Backdoor(Attack):
    """Train on examples carrying a trigger labelled ``target_label``, then boost the update.

    `poison_data` puts ``trigger`` in front of a ``poison_fraction`` of the attacker's examples and
    labels them ``target_label``; the update sent is ``gamma * update`` with ``gamma = n / eta``
    (cohort size over the server's learning rate), so that after averaging the global model
    moves to the attacker's model (model replacement: ``gamma (X - G) + G``). `trigger_set` gives
    the held-out examples that measure the backdoor: those not of class ``target_label``, with the
    trigger, labelled ``target_label``.

    Parameters
    ----------
    trigger:
        The word or phrase inserted at the start of a poisoned text (a rare word by default).
    poison_fraction:
        Share of the attacker's examples that get the trigger, in (0, 1].
    target_label:
        The class id triggered examples are labelled with (and the model should predict).
    boost:
        ``gamma``; 0 uses ``n / server_lr`` of the round.
    """

    name = "backdoor"
    paper = "https://arxiv.org/abs/1807.00459"

    def __init__(self, *, trigger: str = "cf", poison_fraction: float = 0.5, target_label: int = 0, boost: float = 0.0) -> None:
        if not isinstance(trigger, str) or not trigger.strip():
            raise ValueError(f"trigger must be a non-empty word or phrase, got {trigger!r}")
        if isinstance(poison_fraction, bool) or not isinstance(poison_fraction, (int, float)) or not 0 < poison_fraction <= 1:
            raise ValueError(f"poison_fraction must lie in (0, 1], got {poison_fraction!r}")
        if isinstance(target_label, bool) or not isinstance(target_label, int) or target_label < 0:
            raise ValueError(f"target_label must be a class id >= 0, got {target_label!r}")
        if isinstance(boost, bool) or not isinstance(boost, (int, float)) or not math.isfinite(boost) or boost < 0:
            raise ValueError(f"boost must be a finite number >= 0 (0: n / server_lr), got {boost!r}")
        self.trigger = trigger.strip()
        self.poison_fraction = float(poison_fraction)
        self.target_label = target_label
        self.boost = float(boost)

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Return ``boost * update`` (needs ``boost > 0``: without a context ``n`` is unknown)."""
        if self.boost == 0:
            raise self._needs_context()
        return unflatten(self.boost * flatten(update), update)

    def gamma(self, context: AttackContext) -> float:
        """The boost of this round: ``boost``, or ``n / server_lr`` when it is 0."""
        return self.boost if self.boost > 0 else context.cohort_size / context.server_lr

    def apply(
        self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator, context: AttackContext
    ) -> dict[str, np.ndarray]:
        """Return ``gamma * update``, the update of training on the poisoned data, boosted."""
        return unflatten(self.gamma(context) * flatten(update), update)

    def poison_data(self, dataset: Any, *, rng: np.random.Generator) -> Any:
        """The dataset with the trigger in a ``poison_fraction`` of its texts, those labelled ``target_label``."""
        classes = check_dataset(dataset, attack=self.name, fields=("texts", "labels"))
        check_label(self.target_label, classes, setting="target_label", attack=self.name)
        size = len(dataset.labels)
        count = min(size, max(1, round(self.poison_fraction * size))) if size else 0
        index = np.sort(rng.choice(size, size=count, replace=False)) if count else np.zeros(0, np.int64)
        labels = np.array(dataset.labels, dtype=np.int64)
        labels[index] = self.target_label
        return replace(dataset, texts=with_trigger(dataset.texts, index, self.trigger), labels=labels)

    def trigger_set(self, eval_dataset: Any) -> Any | None:
        """Held-out examples not of class ``target_label``, triggered and labelled ``target_label`` (None if none)."""
        classes = check_dataset(eval_dataset, attack=self.name, fields=("texts", "labels"))
        check_label(self.target_label, classes, setting="target_label", attack=self.name)
        keep = np.flatnonzero(np.asarray(eval_dataset.labels) != self.target_label)
        if keep.size == 0:
            return None
        texts = with_trigger([eval_dataset.texts[i] for i in keep], np.arange(keep.size), self.trigger)
        return replace(eval_dataset, texts=texts, labels=np.full(keep.size, self.target_label, np.int64))
