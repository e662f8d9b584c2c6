"""The interface of a PEFT-aware aggregation rule.

A rule decides how the server turns the rows the defense kept into the global adapter delta
(`AggregationRule.aggregate`) and applies it (`AggregationRule.apply`). Rules that need more
than FedAvg over every LoRA tensor override the hooks below; every default keeps FedIT's
behaviour exactly. `secure_fl.peft_agg.hooks` runs them, on the server and on every client
through the same functions:

* the model: `prepare_model` (freeze tensors, re-initialise A/B from the shared seed) and
  `trained_keys` (which tensors the optimizer updates; the rest are frozen, so they are part of
  the base model and of the model fingerprint, and never travel);
* the message: `update_keys` (which trained tensors are sent), `client_message` (what the
  client uploads; default ``local - start``) and its server side `apply`;
* per-client shapes (heterogeneous ranks): `accepts_client_shapes` (the server pads) or
  `aligns_on_client` (each client pads its own upload, so sums work), `join_info`,
  `client_spec`, `to_client` and `align`;
* the base weights: `merges_into_base` and `merge_into_base` (FLoRA-style: fold the released
  adapter into the base weights between rounds and restart the adapter);
* votes and other integer messages (rank voting): `uniform_weights` (every client counts once,
  whatever its example count), `integer_message` (a secure mode must sum the messages exactly
  as integers), `validate_update` (the server checks each plaintext upload) and `check_config`
  (refuse settings the rule cannot run under).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from protocols.wire.serde import TensorSpec
from secure_fl.tensors import Layout


class AggregationRule(ABC):
    """Base class of every PEFT aggregation rule; ``name`` is its ``[peft] rule`` value.

    Public attributes set in ``__init__`` (numbers, strings, flags) are the rule's settings: the
    run's ``run.json`` and the audit report show them (or what ``describe()`` returns, if defined).

    Attributes
    ----------
    name:
        Registry name.
    paper:
        Where the rule comes from.
    needs_individual_updates:
        True if the rule cannot run on sums (it is then refused under secure aggregation).
    accepts_client_shapes:
        True if clients may hold adapters of their own shapes (e.g. their own LoRA rank): the
        server then validates each client's upload against `client_spec` of what it declared at
        Join, the model fingerprint leaves out the shapes of the trained tensors, and `align`
        brings each revealed update into the global layout. Such a rule sees individual uploads,
        so it is refused under a secure mode that reveals only sums.
    aligns_on_client:
        True if clients may hold adapters of their own shapes but each runs `align` on its own
        message before the upload, which so has the global shapes: the server validates it
        against the global specs (`client_spec` may still refuse a client at Join), the model
        fingerprint leaves out the shapes of the trained tensors, and the uploads can be summed
        under every secure mode (HetLoRA-style zero-padding, `secure_fl.peft_agg.fedit`); the
        client knows the global shapes from the rule's settings (`upload_shapes`). An instance
        attribute: a rule may turn it on from a setting (fedit's ``max_rank``).
    merges_into_base:
        True if every party calls `merge_into_base` on each newly released global adapter.
    uniform_weights:
        True if every bucket's row is weighted by its number of clients instead of their example
        counts, so each client counts once (a vote); ``aggregate`` then gets raw counts as weights.
    sends:
        What each client's message holds, in words, for the audit report's threat model (what the
        server sees per client in ``plain`` mode, or summed under a secure mode).
    integer_message:
        True if `client_message` returns integers in ``[0, size - 1]`` of each tensor and
        `aggregate` needs their exact sum: a secure mode must then sum integers exactly (SecAgg+
        plans a step-1 integer range, `protocols.secagg.secaggplus.SecAggPlus.enable_integer_inputs`),
        and one that cannot is refused at start.
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    needs_individual_updates: ClassVar[bool] = False
    accepts_client_shapes: ClassVar[bool] = False
    aligns_on_client: bool = False
    merges_into_base: ClassVar[bool] = False
    uniform_weights: ClassVar[bool] = False
    integer_message: ClassVar[bool] = False
    sends: ClassVar[str] = "every trained adapter tensor (LoRA A and B of each target module, and the head)"

    def check_config(self, config: Any) -> None:
        """Refuse, when the stages are built, a run configuration this rule cannot run under.

        Raise `secure_fl.errors.ConfigError` naming the key (default: every configuration is fine).
        """

    # ------------------------------------------------------------------ the model
    def prepare_model(self, model: Any, *, seed: int) -> None:
        """Shape the freshly built adapted model in place (default: leave it as built).

        Called on the server and on every client right after the model is built and before its
        fingerprint is taken, with the run seed; torch's global RNG is seeded with it and restored
        afterwards. May freeze tensors (``requires_grad_(False)``) or re-initialise A/B
        deterministically (a frozen random A as FFA-LoRA, an SVD-based init), so that every party
        holds the same starting adapter. Frozen tensors count as base weights: the fingerprint
        covers them, so a party that built them differently is refused at Join.
        """

    def trained_keys(self, trainable: Sequence[str]) -> list[str]:
        """Names of the tensors the optimizer updates (default: every trainable tensor).

        Tensors left out are frozen after `prepare_model`: neither trained, nor sent, nor part
        of the global state.
        """
        return list(trainable)

    # ------------------------------------------------------------------ the message
    def update_keys(self, trainable: Sequence[str]) -> list[str]:
        """Names of the trained tensors that clients send (default: all of them)."""
        return list(trainable)

    def client_message(
        self, local: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray], keys: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """What a client uploads for the tensors ``keys`` (default: ``local - start``, float32).

        ``start`` is the state the client trained from (the global adapter, after `to_client`
        and `merge_into_base`); ``local`` is its state after local training. Whatever this
        returns is what `aggregate` combines and `apply` applies.
        """
        return {key: (local[key] - start[key]).astype(np.float32) for key in keys}

    def validate_update(self, update: Mapping[str, np.ndarray]) -> None:
        """Check one client's plaintext upload when it arrives; raise ``ValueError`` naming the tensor.

        Called by the server for every upload of the training phase in a secure mode that reveals
        individual updates (``plain``), after the wire checks (names, shapes, finite values). A
        refused upload is rejected like any malformed one: the client is named, the round goes on
        without it. Under a mode that reveals only sums it cannot run (default: accept everything).
        """

    @abstractmethod
    def aggregate(self, updates: np.ndarray, weights: np.ndarray, layout: Layout) -> np.ndarray:
        """Combine ``(m, d)`` update rows with ``(m,)`` weights into the ``(d,)`` global delta."""

    def apply(self, global_state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the new global adapter state: ``global + delta`` for the sent tensors."""
        new_state = {name: np.array(value, dtype=np.float32, copy=True) for name, value in global_state.items()}
        for name, value in delta.items():
            new_state[name] += value
        return new_state

    # ------------------------------------------------------------------ per-client shapes
    def join_info(self, model: Any) -> dict[str, str]:
        """Facts a client adds to its Join ``info`` for `client_spec` (default: none).

        Example: ``{"lora_rank": "4"}`` for a rule that accepts heterogeneous ranks.
        """
        return {}

    def client_spec(self, info: Mapping[str, str], specs: Mapping[str, TensorSpec]) -> Mapping[str, TensorSpec] | None:
        """The update specs of a client that declared ``info`` at Join, given the global ``specs``.

        Only called when `accepts_client_shapes` or `aligns_on_client` is true. ``None`` (the
        default) means the global specs (always the case for `aligns_on_client`). Raise
        ``ValueError`` to refuse the client at Join (the reason is sent back).
        """
        return None

    def to_client(self, global_state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """The global adapter as a client whose trained tensors have ``shapes`` loads it.

        Only called when `accepts_client_shapes` or `aligns_on_client` is true. Default:
        unchanged (a rule with heterogeneous ranks slices the leading ``r_i`` ranks, see
        `hooks.leading_block`).
        """
        return dict(global_state)

    def upload_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The shapes a client whose trained tensors have ``shapes`` uploads (default: the same).

        Only called when `aligns_on_client` is true, on the client, before any round: its secure
        mode plans for these shapes, so they must follow from the rule's settings (fedit's
        ``max_rank``), never from what the server sends later.
        """
        return dict(shapes)

    def align(self, update: Mapping[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
        """Bring one revealed update (a bucket mean) into the global ``layout`` before `aggregate`.

        With `aligns_on_client` each client also runs it on its own message before the upload.

        Default: unchanged. A rule with heterogeneous ranks zero-pads to the maximum rank
        (see `hooks.zero_pad`).
        """
        return dict(update)

    # ------------------------------------------------------------------ the base weights
    def merge_into_base(self, model: Any, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Fold the released adapter ``state`` into ``model``'s base weights; return the restart state.

        Only called when `merges_into_base` is true, once per released global adapter, by every
        party (the server before it sends that adapter out again, each client when it receives
        it), so all bases stay equal without sending any base weight. Must be deterministic.
        The returned state (same keys and shapes as ``state``) is what clients train from and
        what the server applies the next aggregate to. Default: no merge.
        """
        return dict(state)

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
