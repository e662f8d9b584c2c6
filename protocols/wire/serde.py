"""Tensor (de)serialisation and chunked streaming for the v1 wire protocol.

A bundle of tensors is sent as a `pb.Manifest` (name, dtype and shape of every tensor, in
order, plus the payload's size and SHA-256) and a payload: the concatenation of every tensor's raw
little-endian, C-order bytes. Nothing is pickled: the receiver validates the manifest against the
payload (and, optionally, against the tensors it expects) before building a single array, so a
malicious or buggy peer can only get its message refused with a `MalformedMessage` that
names the peer and the offending tensor or field.

Payloads are cut into `pb.Chunk` messages (1 MiB by default) so that a large update passes
without raising gRPC message limits; `ChunkAssembler` puts them back together, checking
offsets, sizes and the checksum as it goes.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Union

import numpy as np

from protocols.errors import MalformedMessage
from protocols.wire.v1 import federation_pb2 as pb

__all__ = [
    "ALLOWED_DTYPES", "DEFAULT_CHUNK_SIZE", "MAX_NDIM", "ChunkAssembler", "TensorSpec",
    "check_manifest", "envelope", "iter_chunks", "pack_tensors", "read_task_stream", "read_update_stream",
    "spec_of", "task_stream", "unpack_tensors", "update_stream",
]  # fmt: skip

#: numpy dtype names that may travel on the wire (no object, string, datetime or complex dtypes).
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64",
     "uint8", "uint16", "uint32", "uint64", "bool"}
)  # fmt: skip

#: Default size of the data in one `pb.Chunk` (1 MiB), well below gRPC's 4 MiB default.
DEFAULT_CHUNK_SIZE: int = 1 << 20

#: Most dimensions a received tensor may declare (numpy 1.x supports 32, numpy 2.x supports 64).
MAX_NDIM: int = 32

_StreamMsg = Union[pb.UpdateChunk, pb.TaskChunk]
_AnyHeader = Union[pb.UpdateHeader, pb.TaskHeader]


@dataclass(frozen=True)
class TensorSpec:
    """Python-side description of one tensor: its name, numpy dtype name and shape.

    Used both to describe what was received and to state what a receiver expects (see the
    ``expected`` argument of `unpack_tensors`).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    #: When True (an expected spec only), any shape of the same rank with every dimension at most
    #: ``shape``'s is accepted: ciphertexts and other variable-length payloads with a maximum.
    variable: bool = False

    @property
    def nbytes(self) -> int:
        """Size of the tensor's raw bytes, computed with Python ints so it cannot overflow."""
        return math.prod(int(d) for d in self.shape) * np.dtype(self.dtype).itemsize

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> TensorSpec:
        """Describe ``array`` under ``name``."""
        array = np.asarray(array)
        return cls(name=name, dtype=array.dtype.name, shape=tuple(int(d) for d in array.shape))


def spec_of(tensors: Mapping[str, np.ndarray]) -> dict[str, TensorSpec]:
    """Describe every tensor of a bundle, e.g. as the ``expected`` of `unpack_tensors`."""
    return {name: TensorSpec.of(name, array) for name, array in tensors.items()}


def pack_tensors(tensors: Mapping[str, np.ndarray]) -> tuple[pb.Manifest, bytes]:
    """Serialise a bundle of tensors into a manifest and a payload.

    The manifest lists the tensors in the mapping's iteration order, with ``total_bytes`` and the
    lower-case hex SHA-256 of the payload. The payload concatenates every array's C-order bytes,
    always little-endian (non-native inputs are converted) so every receiver reads it alike.

    Raises
    ------
    MalformedMessage
        A name is empty or not a string, or a dtype is not in `ALLOWED_DTYPES` (naming the
        tensor): the receiver would refuse such a bundle anyway.
    """
    manifest = pb.Manifest()
    digest = hashlib.sha256()
    parts: list[bytes] = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise MalformedMessage(f"cannot pack tensor with invalid name {name!r}")
        array = np.asarray(value)
        if array.dtype.name not in ALLOWED_DTYPES:
            raise MalformedMessage(
                f"cannot pack tensor {name!r}: dtype {array.dtype.name!r} is not allowed "
                f"(allowed: {', '.join(sorted(ALLOWED_DTYPES))})"
            )
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
        digest.update(raw)
        parts.append(raw)
        manifest.tensors.add(name=name, dtype=array.dtype.name, shape=[int(d) for d in array.shape])
    payload = b"".join(parts)
    manifest.total_bytes = len(payload)
    manifest.sha256 = digest.hexdigest()
    return manifest, payload


def _specs_from_manifest(manifest: pb.Manifest, who: str) -> list[TensorSpec]:
    """Validate every spec of ``manifest`` on its own and convert it to `TensorSpec`."""
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    for index, spec in enumerate(manifest.tensors):
        name = spec.name
        if not name:
            raise MalformedMessage(f"{who}: tensor #{index} of the manifest has an empty name")
        if name in seen:
            raise MalformedMessage(f"{who}: tensor {name!r} appears twice in the manifest")
        seen.add(name)
        if spec.dtype not in ALLOWED_DTYPES:
            raise MalformedMessage(f"{who}: tensor {name!r} has disallowed dtype {spec.dtype!r}")
        shape = tuple(int(d) for d in spec.shape)
        if len(shape) > MAX_NDIM:
            raise MalformedMessage(
                f"{who}: tensor {name!r} has {len(shape)} dimensions (at most {MAX_NDIM})"
            )
        if any(d < 0 for d in shape):
            raise MalformedMessage(f"{who}: tensor {name!r} has negative dimension in {shape}")
        # numpy refuses shapes whose non-zero dims multiply past the address space even when
        # another dim is 0; refuse them here, cleanly.
        if math.prod(max(d, 1) for d in shape) * np.dtype(spec.dtype).itemsize > sys.maxsize:
            raise MalformedMessage(f"{who}: tensor {name!r} has absurd shape {shape}")
        specs.append(TensorSpec(name=name, dtype=spec.dtype, shape=shape))
    return specs


def _check_expected(specs: list[TensorSpec], expected: Mapping[str, TensorSpec], who: str) -> None:
    """Refuse a bundle whose names, dtypes or shapes differ from ``expected``."""
    got = {s.name: s for s in specs}
    missing = [name for name in expected if name not in got]
    extra = [s.name for s in specs if s.name not in expected]
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing tensor(s) {', '.join(map(repr, missing))}")
        if extra:
            problems.append(f"unexpected tensor(s) {', '.join(map(repr, extra))}")
        raise MalformedMessage(f"{who}: {'; '.join(problems)}")
    for name, want in expected.items():
        spec = got[name]
        if spec.dtype != want.dtype:
            raise MalformedMessage(
                f"{who}: tensor {name!r} has dtype {spec.dtype}, expected {want.dtype}"
            )
        if want.variable:
            if len(spec.shape) != len(want.shape) or any(d > m for d, m in zip(spec.shape, want.shape)):
                raise MalformedMessage(
                    f"{who}: tensor {name!r} has shape {spec.shape}, expected at most {tuple(want.shape)}"
                )
        elif spec.shape != tuple(want.shape):
            raise MalformedMessage(
                f"{who}: tensor {name!r} has shape {spec.shape}, expected {tuple(want.shape)}"
            )


def check_manifest(
    manifest: pb.Manifest, *, expected: Mapping[str, TensorSpec] | None, max_bytes: int, who: str
) -> list[TensorSpec]:
    """Validate a manifest before any of its payload is read or any memory is reserved for it.

    Every spec is checked on its own, then against ``expected`` (when given), the declared
    ``total_bytes`` against the sum of the specs and against ``max_bytes``. A receiver that calls
    this on the header of a stream refuses a lying manifest (a 1 GiB ``total_bytes`` for a 4 kB
    update) at once, instead of after reading, or reserving memory for, the declared size.
    """
    specs = _specs_from_manifest(manifest, who)
    if expected is not None:
        _check_expected(specs, expected, who)
    declared = sum(s.nbytes for s in specs)
    if declared != manifest.total_bytes:
        raise MalformedMessage(
            f"{who}: manifest tensors add up to {declared} bytes "
            f"but total_bytes is {manifest.total_bytes}"
        )
    if declared > max_bytes:
        raise MalformedMessage(f"{who}: payload of {declared} bytes exceeds the limit of {max_bytes} bytes")
    return specs


def unpack_tensors(
    manifest: pb.Manifest,
    payload: bytes | bytearray | memoryview,
    *,
    expected: Mapping[str, TensorSpec] | None = None,
    who: str = "peer",
    verify_checksum: bool = True,
) -> dict[str, np.ndarray]:
    """Rebuild a bundle of tensors from a manifest and its payload, validating everything first.

    Parameters
    ----------
    manifest, payload
        What the peer sent. A ``bytes`` payload is used without copying; a mutable buffer is
        copied once so that the returned arrays cannot change under the caller.
    expected
        If given, the exact tensors (name, dtype, shape) the caller accepts.
    who
        Names the peer in error messages, e.g. ``"client 'c3'"``.
    verify_checksum
        Check the SHA-256 (skip it only when a `ChunkAssembler` already did).

    Returns
    -------
    dict[str, numpy.ndarray]
        Tensors in manifest order and native byte order, all **read-only**: views into the
        immutable payload, or copies where the bytes were misaligned or (big-endian hosts)
        byte-swapped. Call ``.copy()`` for a writable array.

    Raises
    ------
    MalformedMessage
        Empty or duplicate name, disallowed dtype, negative or absurd shape, a mismatch with
        ``expected``, sizes not adding up to ``total_bytes`` or the payload length, or a bad
        checksum. Sizes are checked with Python ints before anything is allocated.
    """
    specs = _specs_from_manifest(manifest, who)
    if expected is not None:
        _check_expected(specs, expected, who)
    declared = sum(s.nbytes for s in specs)
    if declared != manifest.total_bytes:
        raise MalformedMessage(
            f"{who}: manifest tensors add up to {declared} bytes "
            f"but total_bytes is {manifest.total_bytes}"
        )
    data = payload if isinstance(payload, bytes) else bytes(payload)
    if len(data) != manifest.total_bytes:
        raise MalformedMessage(
            f"{who}: payload has {len(data)} bytes, manifest says {manifest.total_bytes}"
        )
    if verify_checksum:
        actual = hashlib.sha256(data).hexdigest()
        if actual != manifest.sha256:
            raise MalformedMessage(
                f"{who}: payload sha256 {actual} does not match manifest {manifest.sha256!r}"
            )
    out: dict[str, np.ndarray] = {}
    offset = 0
    for spec in specs:
        wire = np.dtype(spec.dtype).newbyteorder("<")
        size = spec.nbytes
        try:
            array = np.frombuffer(data, dtype=wire, count=size // wire.itemsize, offset=offset)
            array = array.reshape(spec.shape)
        except ValueError as exc:  # pragma: no cover - shapes were validated above
            raise MalformedMessage(f"{who}: tensor {spec.name!r}: {exc}") from exc
        array = array.astype(wire.newbyteorder("="), copy=False)
        if not array.flags.aligned:
            array = array.copy()
        array.flags.writeable = False
        out[spec.name] = array
        offset += size
    return out


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
