"""Tensor bundles on the wire: specs, packing, and validation before a single array is built.

A bundle is a `pb.Manifest` (name, dtype and shape of every tensor, in order, plus the payload's
size and SHA-256) and a payload: the concatenation of every tensor's raw little-endian, C-order
bytes. Nothing is pickled. `check_manifest` and `unpack_tensors` validate a manifest against the
tensors the receiver expects before anything is allocated, so a malicious or buggy peer can only
get its message refused with a `MalformedMessage` naming the peer and the tensor or field.
"""


from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from protocols.errors import MalformedMessage
from protocols.wire.v1 import federation_pb2 as pb

__all__ = ["ALLOWED_DTYPES", "MAX_NDIM", "TensorSpec", "check_manifest", "pack_tensors", "spec_of", "unpack_tensors"]

#: numpy dtype names that may travel on the wire (no object, string, datetime or complex dtypes).
ALLOWED_DTYPES: frozenset[str] = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64",
     "uint8", "uint16", "uint32", "uint64", "bool"}
)  # fmt: skip

#: Most dimensions a received tensor may declare (numpy 1.x supports 32, numpy 2.x supports 64).
MAX_NDIM: int = 32

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
    specs = check_manifest(manifest, expected=expected, max_bytes=sys.maxsize, who=who)
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
