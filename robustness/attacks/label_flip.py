"""``label-flip``: train honestly on flipped labels (a data-poisoning attack)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from robustness.attacks._data import check_dataset, check_label, replace
from robustness.attacks.base import Attack


class LabelFlip(Attack):
    """Relabel the attacker's examples, then send the update honest training on them gives.

    With neither ``source`` nor ``target`` set every label ``y`` becomes ``C - 1 - y`` (``C``
    classes); with both, only examples of class ``source`` become ``target`` (RFFL uses 1 -> 7).

    Parameters
    ----------
    source:
        The class to relabel (-1: every class, flipped to ``C - 1 - y``).
    target:
        The label ``source`` examples get (-1 together with ``source = -1``).
    """

    name = "label-flip"
    paper = "https://arxiv.org/abs/2007.08432"

    def __init__(self, *, source: int = -1, target: int = -1) -> None:
        for setting, value in (("source", source), ("target", target)):
            if isinstance(value, bool) or not isinstance(value, int) or value < -1:
                raise ValueError(f"{setting} must be a class id >= 0 (or -1), got {value!r}")
        if (source == -1) != (target == -1):
            raise ValueError(f"set both source and target (a targeted flip) or neither; got source={source}, target={target}")
        if source != -1 and source == target:
            raise ValueError(f"source and target are both {source}: nothing would be flipped")
        self.source = source
        self.target = target

    def perturb(self, update: Mapping[str, np.ndarray], *, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Return the update unchanged: the poison is in the data."""
        return dict(update)

    def poison_data(self, dataset: Any, *, rng: np.random.Generator) -> Any:
        """The dataset with its labels flipped (``C - 1 - y``, or ``source -> target``)."""
        classes = check_dataset(dataset, attack=self.name, fields=("labels",))
        labels = np.asarray(dataset.labels, dtype=np.int64)
        if self.source == -1:
            return replace(dataset, labels=classes - 1 - labels)
        check_label(self.source, classes, setting="source", attack=self.name)
        check_label(self.target, classes, setting="target", attack=self.name)
        return replace(dataset, labels=np.where(labels == self.source, self.target, labels))
