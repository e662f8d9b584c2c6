"""Tensor (de)serialisation and chunked streaming for the v1 wire protocol.

A bundle of tensors is sent as a `pb.Manifest` (name, dtype and shape of every tensor, in
order, plus the payload's size and SHA-256) and a payload: the concatenation of every tensor's raw
little-endian, C-order bytes. Nothing is pickled: the receiver validates the manifest against the
payload (and, optionally, against the tensors it expects) before building a single array, so a
malicious or buggy peer can only get its message refused with a `MalformedMessage` that
names the peer and the offending tensor or field.

This module is the one import for every conversion (style: one serde module per protocol); the
code lives in `protocols.wire.tensors` (specs, packing, validation) and `protocols.wire.stream`
(chunking, envelopes).

Payloads are cut into `pb.Chunk` messages (1 MiB by default) so that a large update passes
without raising gRPC message limits; `ChunkAssembler` puts them back together, checking
offsets, sizes and the checksum as it goes.
"""

from __future__ import annotations

from protocols.wire.stream import (
    DEFAULT_CHUNK_SIZE, ChunkAssembler, envelope, iter_chunks, read_task_stream, read_update_stream, task_stream,
    update_stream,
)
from protocols.wire.tensors import (
    ALLOWED_DTYPES, MAX_NDIM, TensorSpec, check_manifest, pack_tensors, spec_of, unpack_tensors,
)

__all__ = [
    "ALLOWED_DTYPES", "DEFAULT_CHUNK_SIZE", "MAX_NDIM", "ChunkAssembler", "TensorSpec",
    "check_manifest", "envelope", "iter_chunks", "pack_tensors", "read_task_stream", "read_update_stream",
    "spec_of", "task_stream", "unpack_tensors", "update_stream",
]  # fmt: skip
