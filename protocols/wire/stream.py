"""Chunked streaming of payloads for the v1 wire protocol, and message envelopes.

Payloads are cut into `pb.Chunk` messages (1 MiB by default) so that a large update passes
without raising gRPC message limits; `ChunkAssembler` puts them back together, checking offsets,
sizes and the checksum as it goes, and holds only the bytes that actually arrived.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Union

from protocols.errors import MalformedMessage
from protocols.wire.tensors import TensorSpec, check_manifest
from protocols.wire.v1 import federation_pb2 as pb

__all__ = [
    "DEFAULT_CHUNK_SIZE", "ChunkAssembler", "envelope", "iter_chunks", "read_task_stream", "read_update_stream",
    "task_stream", "update_stream",
]  # fmt: skip

#: Default size of the data in one `pb.Chunk` (1 MiB), well below gRPC's 4 MiB default.
DEFAULT_CHUNK_SIZE: int = 1 << 20

_StreamMsg = Union[pb.UpdateChunk, pb.TaskChunk]
_AnyHeader = Union[pb.UpdateHeader, pb.TaskHeader]


def iter_chunks(
    payload: bytes | bytearray | memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[pb.Chunk]:
    """Cut ``payload`` into chunks of at most ``chunk_size`` bytes with contiguous offsets from 0.

    An empty payload yields no chunk. Raises ``ValueError`` for a non-positive ``chunk_size``.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    view = memoryview(payload)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    for start in range(0, len(view), chunk_size):
        yield pb.Chunk(offset=start, data=bytes(view[start : start + chunk_size]))


class ChunkAssembler:
    """Reassembles a chunked payload described by a manifest, checking as it goes.

    Chunks must arrive in order, without gap or overlap, and stay within ``total_bytes``; empty
    chunks are refused (no correct sender emits them). The SHA-256 is computed incrementally.
    Only ``total_bytes`` and ``sha256`` of the manifest are used; `unpack_tensors` checks
    the tensor specs. A ``total_bytes`` above ``max_bytes`` is refused before any data arrives,
    so that a peer cannot make the receiver allocate arbitrary memory; ``who`` names the peer in
    error messages.
    """

    def __init__(self, manifest: pb.Manifest, *, max_bytes: int, who: str = "peer") -> None:
        self._who = who
        self._total = int(manifest.total_bytes)
        self._sha256 = manifest.sha256
        if self._total > max_bytes:
            raise MalformedMessage(
                f"{who}: payload of {self._total} bytes exceeds the limit of {max_bytes} bytes"
            )
        # Grown as data arrives: a peer that declares a large payload and sends little makes the
        # receiver hold only what it actually sent.
        self._buffer: bytearray | None = bytearray()
        self._received = 0
        self._digest = hashlib.sha256()

    @property
    def received(self) -> int:
        """Number of payload bytes received so far."""
        return self._received

    def add(self, chunk: pb.Chunk) -> None:
        """Append ``chunk``; raise `MalformedMessage` if it is out of place or too long."""
        if self._buffer is None:
            raise RuntimeError("ChunkAssembler.add() called after finish()")
        data = chunk.data  # one access: protobuf may build a new bytes object on each
        who, offset, size = self._who, int(chunk.offset), len(data)
        if offset != self._received:
            problem = "a gap" if offset > self._received else "an overlap"
            raise MalformedMessage(
                f"{who}: chunk at offset {offset} leaves {problem}, "
                f"expected offset {self._received}"
            )
        if size == 0:
            raise MalformedMessage(f"{who}: empty chunk at offset {offset}")
        if offset + size > self._total:
            raise MalformedMessage(
                f"{who}: chunk at offset {offset} with {size} bytes overruns "
                f"total_bytes {self._total}"
            )
        self._buffer += data
        self._digest.update(data)
        self._received += size

    def finish(self) -> bytes:
        """Return the payload; `MalformedMessage` if it is truncated or fails SHA-256."""
        if self._buffer is None:
            raise RuntimeError("ChunkAssembler.finish() called twice")
        if self._received != self._total:
            raise MalformedMessage(
                f"{self._who}: truncated stream: got {self._received} of {self._total} bytes"
            )
        actual = self._digest.hexdigest()
        if actual != self._sha256:
            raise MalformedMessage(
                f"{self._who}: payload sha256 {actual} does not match manifest {self._sha256!r}"
            )
        payload = bytes(self._buffer)
        self._buffer = None
        return payload


def _stream(
    make: Callable[..., _StreamMsg], header: _AnyHeader, payload: bytes, chunk_size: int
) -> Iterator[_StreamMsg]:
    """Check that ``payload`` fits the header's manifest, then yield the header and chunks."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    declared = header.manifest.total_bytes if header.HasField("manifest") else 0
    if declared != len(payload):
        raise ValueError(f"payload has {len(payload)} bytes but the manifest declares {declared}")

    def generate() -> Iterator[_StreamMsg]:
        yield make(header=header)
        for chunk in iter_chunks(payload, chunk_size):
            yield make(chunk=chunk)

    return generate()


def update_stream(
    header: pb.UpdateHeader, payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[pb.UpdateChunk]:
    """Messages of a ``PushUpdate`` call: the header, then one ``UpdateChunk`` per chunk.

    Raises ``ValueError`` (a local bug, not a protocol error) if ``len(payload)`` differs from
    the header's ``manifest.total_bytes``.
    """
    return _stream(pb.UpdateChunk, header, payload, chunk_size)


def task_stream(
    header: pb.TaskHeader, payload: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[pb.TaskChunk]:
    """Messages of a ``PullTask`` reply: the header, then one ``TaskChunk`` per chunk.

    A header without a manifest (WAIT, FINISHED) must come with an empty payload.
    """
    return _stream(pb.TaskChunk, header, payload, chunk_size)


def _read_stream(
    messages: Iterable[_StreamMsg],
    *,
    max_bytes: int,
    who: str,
    manifest_optional: bool,
    expected: Mapping[str, TensorSpec] | None = None,
) -> tuple[_AnyHeader, bytes]:
    """Shared reader of update and task streams: one header, then chunks of its manifest."""
    iterator = iter(messages)
    first = next(iterator, None)
    if first is None:
        raise MalformedMessage(f"{who}: empty stream (no header)")
    if first.WhichOneof("part") != "header":
        raise MalformedMessage(f"{who}: stream must start with a header")
    header = first.header
    if header.HasField("manifest"):
        if expected is not None:
            check_manifest(header.manifest, expected=expected, max_bytes=max_bytes, who=who)
        assembler: ChunkAssembler | None = ChunkAssembler(
            header.manifest, max_bytes=max_bytes, who=who
        )
    elif manifest_optional:
        assembler = None
    else:
        raise MalformedMessage(f"{who}: header has no manifest")
    for message in iterator:
        part = message.WhichOneof("part")
        if part == "header":
            raise MalformedMessage(f"{who}: second header in stream")
        if part != "chunk":
            raise MalformedMessage(f"{who}: stream message carries neither header nor chunk")
        if assembler is None:
            raise MalformedMessage(
                f"{who}: chunk at offset {message.chunk.offset} after a header without manifest"
            )
        assembler.add(message.chunk)
    return header, (assembler.finish() if assembler is not None else b"")


def read_update_stream(
    messages: Iterable[pb.UpdateChunk],
    *,
    max_bytes: int,
    who: str = "peer",
    expected: Mapping[str, TensorSpec] | None = None,
) -> tuple[pb.UpdateHeader, bytes]:
    """Read a ``PushUpdate`` stream into its header and verified payload.

    Raises `MalformedMessage` for an empty stream, a first message that is not a header,
    a second header, a header without manifest, a manifest that differs from ``expected``
    (checked before the first chunk is read), or any chunk problem found by
    `ChunkAssembler` (size limit, offsets, truncation, checksum).
    """
    return _read_stream(
        messages, max_bytes=max_bytes, who=who, manifest_optional=False, expected=expected
    )


def read_task_stream(
    messages: Iterable[pb.TaskChunk], *, max_bytes: int, who: str = "server"
) -> tuple[pb.TaskHeader, bytes]:
    """Read a ``PullTask`` reply into its header and verified payload.

    Same checks as `read_update_stream`, except that a header without a manifest (WAIT,
    FINISHED) is fine: it has no chunks and the payload is ``b""``.
    """
    return _read_stream(
        messages, max_bytes=max_bytes, who=who, manifest_optional=True
    )


def envelope(run_id: str, round: int, client_id: str, phase: str = "") -> pb.Envelope:  # noqa: A002
    """Build the `pb.Envelope` that every message carries (``phase``: the phase it answers)."""
    return pb.Envelope(run_id=run_id, round=round, client_id=client_id, phase=phase)
