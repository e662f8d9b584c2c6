"""Simulated parties, built when a cohort selects them and released after their round.

A simulation's population can be far larger than a round's cohort (thousands of parties, ten a
round), so nothing per party is kept between its rounds but its id, its partition's indices and
the Join reply: `PartyBuilder.client` builds the party's `FederatedClient` (trainer, encoded data,
protocol stages) on the model every party of its rank shares, and the caller drops it once the
round is over. The same builder runs in the driver (``simulation.backend = "in-process"``) and
inside every Ray party runner (`secure_fl.ray_backend`), so a party is the same object whatever
hosts it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secure_fl.client.client import ClientStages, FederatedClient, HonestBoard
from secure_fl.client.trainer import LocalTrainer, derive_seed
from secure_fl.config import Config
from secure_fl.errors import ConfigError
from secure_fl.transport.base import ClientTransport
from secure_fl.workload import Workload


def party_id(index: int) -> str:
    """The id of simulated party ``index`` (0-based): ``client-<index>``."""
    return f"client-{index}"


class Partitions(Sequence[Any]):
    """Party ``i``'s data, cut from one dataset by index when asked for (nothing copied up front)."""

    def __init__(self, dataset: Any, indices: Sequence[np.ndarray]) -> None:
        self.dataset = dataset
        self.indices = [np.asarray(i, dtype=np.int64) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: Any) -> Any:  # a slice is not needed by any caller
        return self.dataset.subset(self.indices[int(index)])


@dataclass(frozen=True)
class PartySource:
    """Everything needed to build any simulated party, on any host (picklable for Ray).

    Parameters
    ----------
    config:
        The run's config (every party's unless ``client_ranks`` gives it another LoRA rank).
    workload:
        The model and data handling of a party of rank ``peft.r``.
    partitions:
        Party ``i``'s training data is ``partitions[i]`` (a `Partitions` view or a list of datasets).
    attackers:
        Indices of the parties that attack (``[attack]``).
    client_ranks:
        Party ``i`` trains LoRA rank ``client_ranks[i % len]`` (``None``: every party has ``peft.r``).
    label_names:
        The label names every party's model is built for (per-rank workloads need them).
    """

    config: Config
    workload: Workload
    partitions: Sequence[Any]
    attackers: frozenset[int] = frozenset()
    client_ranks: tuple[int, ...] | None = None
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for rank in dict.fromkeys(self.client_ranks or ()):
            if not 1 <= int(rank) <= self.config.peft.r:
                raise ConfigError(f"client_ranks: rank {rank} is not within 1..peft.r={self.config.peft.r}", key="peft.r")

    @property
    def size(self) -> int:
        """How many parties there are."""
        return len(self.partitions)

    def rank_of(self, index: int) -> int | None:
        """Party ``index``'s LoRA rank, or ``None`` for ``peft.r``."""
        return None if not self.client_ranks else int(self.client_ranks[index % len(self.client_ranks)])


@dataclass
class PartyBuilder:
    """Builds a `PartySource`'s parties on one host; one model per distinct LoRA rank, shared.

    With ``keep`` every party built is kept and handed out again (a run whose extra parties read
    the honest trainers, such as the empirical audit's canaries); otherwise each call builds a
    fresh party that the caller releases after its round. An attacker's random generator and poisoned
    data are kept either way (one per attacker), so its draws continue across rounds as if it never left.
    """

    source: PartySource
    board: HonestBoard = field(default_factory=HonestBoard)
    keep: bool = False
    _models: dict[int | None, tuple[Config, Workload, Any]] = field(default_factory=dict, repr=False)
    _rngs: dict[int, np.random.Generator] = field(default_factory=dict, repr=False)
    _kept: dict[int, FederatedClient] = field(default_factory=dict, repr=False)
    _poisoned: dict[int, Any] = field(default_factory=dict, repr=False)

    def model(self, rank: int | None) -> tuple[Config, Workload, Any]:
        """``(config, workload, shared model)`` of the parties of LoRA rank ``rank`` (``None``: ``peft.r``)."""
        if rank not in self._models:
            config, workload = self.source.config, self.source.workload
            if rank is not None:
                from secure_fl.peft_agg.ranks import with_lora_rank
                from secure_fl.workload import config_workload

                config = with_lora_rank(config, rank)
                workload = config_workload(config, tuple(self.source.label_names))
            self._models[rank] = (config, workload, workload.build(seed=config.run.seed))
        return self._models[rank]

    def trainer(self, index: int, stages: ClientStages | None = None) -> LocalTrainer:
        """Party ``index``'s trainer: its data (poisoned if it attacks) on its rank's shared model."""
        config, workload, adapted = self.model(self.source.rank_of(index))
        stages = stages if stages is not None else self._stages(index)
        if stages.attack is None:
            dataset = self.source.partitions[index]
        elif index not in self._poisoned:  # label flipping, backdoors: poisoned once, kept (attackers are few)
            dataset = stages.attack.poison_data(self.source.partitions[index],
                                                rng=np.random.default_rng([config.run.seed, 11, index]))
            self._poisoned[index] = dataset
        else:
            dataset = self._poisoned[index]
        return LocalTrainer.create(workload, dataset, config, adapted=adapted)

    def _stages(self, index: int) -> ClientStages:
        return ClientStages.from_config(self.source.config, malicious=index in self.source.attackers)

    def client(self, index: int, transport: ClientTransport) -> FederatedClient:
        """Party ``index`` as a `FederatedClient` over ``transport`` (not yet joined)."""
        if index in self._kept:
            return self._kept[index]
        if not 0 <= index < self.source.size:
            raise ValueError(f"party index {index} is outside 0..{self.source.size - 1}")
        config = self.source.config
        stages = self._stages(index)
        trainer = self.trainer(index, stages)
        rng = None
        if stages.attack is not None:
            rng = self._rngs.setdefault(index, np.random.default_rng(derive_seed(config.run.seed, "attack", party_id(index))))
        client = FederatedClient(
            party_id(index), transport, trainer, stages, seed=config.run.seed,
            chunk_size=config.transport.chunk_size, board=self.board, rng=rng,
        )
        if self.keep:
            self._kept[index] = client
        return client

    def release(self, index: int) -> None:
        """Forget a kept party (nothing to do for parties that are not kept)."""
        self._kept.pop(index, None)
