"""Tests of protocols.wire.serde: tensor packing, chunked streams and refusal of bad input."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocols.errors import MalformedMessage
from protocols.wire import serde
from protocols.wire.v1 import federation_pb2 as pb


def _bundle() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer.0.lora_A": rng.standard_normal((8, 16)).astype(np.float32),
        "layer.0.lora_B": rng.standard_normal((16, 8)).astype(np.float16),
        "scale": np.array(3.5, dtype=np.float64),
        "steps": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "mask": rng.random((3, 5)) > 0.5,
        "ids": np.arange(10, dtype=np.uint32).reshape(2, 5),
        "small": np.array([-1, 0, 1], dtype=np.int8),
        "u16": np.array([[1, 65535]], dtype=np.uint16),
        "i16": np.array([-300, 300], dtype=np.int16),
        "i32": np.array([-(2**31), 2**31 - 1], dtype=np.int32),
        "u64": np.array([2**64 - 1], dtype=np.uint64),
        "u8": np.array([255], dtype=np.uint8),
    }


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        assert np.array_equal(got[name], array), name


def _header(tensors: dict[str, np.ndarray]) -> tuple[pb.UpdateHeader, bytes]:
    manifest, payload = serde.pack_tensors(tensors)
    header = pb.UpdateHeader(
        envelope=serde.envelope("run", 1, "c3"), manifest=manifest, weight=10.0, encoding="plain"
    )
    return header, payload


def _raises(fn: Callable[[], object], *fragments: str) -> MalformedMessage:
    """Assert that ``fn`` raises MalformedMessage whose message contains every fragment."""
    with pytest.raises(MalformedMessage) as info:
        fn()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    return info.value


# --- round trips -------------------------------------------------------------------------------


def test_round_trip_many_dtypes_and_shapes() -> None:
    tensors = _bundle()
    manifest, payload = serde.pack_tensors(tensors)
    assert [t.name for t in manifest.tensors] == list(tensors)
    assert manifest.total_bytes == len(payload) == sum(a.nbytes for a in tensors.values())
    assert manifest.sha256 == hashlib.sha256(payload).hexdigest()
    got = serde.unpack_tensors(manifest, payload, expected=serde.spec_of(tensors))
    _assert_same(got, tensors)
    assert got["scale"].shape == () and got["empty"].shape == (0, 4)
    assert all(not a.flags.writeable for a in got.values())


def test_round_trip_through_stream_with_tiny_chunks() -> None:
    tensors = _bundle()
    header, payload = _header(tensors)
    messages = list(serde.update_stream(header, payload, chunk_size=7))
    assert messages[0].WhichOneof("part") == "header"
    assert all(m.WhichOneof("part") == "chunk" for m in messages[1:])
    got_header, got_payload = serde.read_update_stream(messages, max_bytes=1 << 20, who="c3")
    assert got_header == header and got_payload == payload
    _assert_same(serde.unpack_tensors(got_header.manifest, got_payload), tensors)


def test_unpack_accepts_bytearray_and_memoryview() -> None:
    tensors = _bundle()
    manifest, payload = serde.pack_tensors(tensors)
    buffer = bytearray(payload)
    got = serde.unpack_tensors(manifest, buffer)
    buffer[:] = bytes(len(buffer))  # returned arrays must not alias the caller's buffer
    _assert_same(got, tensors)
    _assert_same(serde.unpack_tensors(manifest, memoryview(payload)), tensors)


@settings(max_examples=40, deadline=None)
@given(
    arrays=st.lists(
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.int64]),
            shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
        ),
        min_size=0,
        max_size=4,
    ),
    chunk_size=st.integers(min_value=1, max_value=300),
)
def test_property_round_trip(arrays: list[np.ndarray], chunk_size: int) -> None:
    tensors = {f"t{i}": a for i, a in enumerate(arrays)}
    header, payload = _header(tensors)
    messages = serde.update_stream(header, payload, chunk_size=chunk_size)
    got_header, got_payload = serde.read_update_stream(messages, max_bytes=1 << 20)
    got = serde.unpack_tensors(got_header.manifest, got_payload, expected=serde.spec_of(tensors))
    assert list(got) == list(tensors)
    for name, array in tensors.items():
        assert got[name].dtype == array.dtype
        # NaN payloads must survive bit-for-bit, so compare the raw bytes too.
        assert np.array_equal(got[name], array, equal_nan=array.dtype.kind == "f")
        assert got[name].tobytes() == array.tobytes()


def test_big_endian_input_is_sent_little_endian() -> None:
    values = np.array([1.0, -2.5, 3.25], dtype=">f4")
    ints = np.array([1, 256], dtype=">i8")
    manifest, payload = serde.pack_tensors({"x": values, "n": ints})
    assert [t.dtype for t in manifest.tensors] == ["float32", "int64"]
    expected = values.astype("<f4").tobytes() + ints.astype("<i8").tobytes()
    assert payload == expected
    assert payload[12:20] == (1).to_bytes(8, "little")
    got = serde.unpack_tensors(manifest, payload)
    assert got["x"].dtype == np.dtype("float32") and got["x"].dtype.isnative
    assert np.array_equal(got["x"], values) and np.array_equal(got["n"], ints)


def test_non_contiguous_input_is_packed_in_c_order() -> None:
    base = np.arange(12, dtype=np.int32).reshape(3, 4)
    manifest, payload = serde.pack_tensors({"t": base.T})
    assert payload == np.ascontiguousarray(base.T).tobytes()
    assert tuple(manifest.tensors[0].shape) == (4, 3)


def test_task_stream_without_manifest() -> None:
    header = pb.TaskHeader(envelope=serde.envelope("run", 0, "c1"), kind=pb.TaskHeader.WAIT)
    messages = list(serde.task_stream(header, b""))
    assert len(messages) == 1
    got, payload = serde.read_task_stream(messages, max_bytes=0)
    assert got.kind == pb.TaskHeader.WAIT and payload == b""
    chunk = pb.TaskChunk(chunk=pb.Chunk(offset=0, data=b"x"))
    _raises(lambda: serde.read_task_stream([messages[0], chunk], max_bytes=10), "server")


def test_task_stream_with_manifest() -> None:
    tensors = _bundle()
    manifest, payload = serde.pack_tensors(tensors)
    header = pb.TaskHeader(kind=pb.TaskHeader.TRAIN, manifest=manifest, plan={"lr": 0.1})
    got, data = serde.read_task_stream(serde.task_stream(header, payload, 100), max_bytes=1 << 20)
    _assert_same(serde.unpack_tensors(got.manifest, data), tensors)


def test_iter_chunks_offsets() -> None:
    chunks = list(serde.iter_chunks(b"abcdefghij", 4))
    assert [(c.offset, c.data) for c in chunks] == [(0, b"abcd"), (4, b"efgh"), (8, b"ij")]
    assert list(serde.iter_chunks(b"", 4)) == []
    with pytest.raises(ValueError):
        list(serde.iter_chunks(b"abc", 0))


def test_tensor_spec() -> None:
    spec = serde.TensorSpec.of("w", np.zeros((3, 4), dtype=np.float16))
    assert spec == serde.TensorSpec("w", "float16", (3, 4)) and spec.nbytes == 24
    assert serde.TensorSpec("w", "int64", ()).nbytes == 8


def test_large_payload_chunks_stay_small() -> None:
    rng = np.random.default_rng(1)
    tensors = {
        "big": rng.integers(0, 255, size=50 * 1024 * 1024, dtype=np.uint8),
        "tail": np.arange(1000, dtype=np.float32),
    }
    header, payload = _header(tensors)
    messages = list(serde.update_stream(header, payload))
    assert len(messages) > 50
    assert max(m.ByteSize() for m in messages) <= int(1.1 * (1 << 20))
    got_header, got_payload = serde.read_update_stream(messages, max_bytes=64 << 20)
    _assert_same(serde.unpack_tensors(got_header.manifest, got_payload), tensors)


# --- malformed manifests -----------------------------------------------------------------------


def _expected() -> dict[str, serde.TensorSpec]:
    return {
        "layer.0.lora_A": serde.TensorSpec("layer.0.lora_A", "float32", (8, 16)),
        "layer.0.lora_B": serde.TensorSpec("layer.0.lora_B", "float32", (16, 8)),
    }


def _packed(**overrides: np.ndarray) -> tuple[pb.Manifest, bytes]:
    tensors = {
        "layer.0.lora_A": np.ones((8, 16), dtype=np.float32),
        "layer.0.lora_B": np.ones((16, 8), dtype=np.float32),
    }
    tensors.update({k.replace("__", "."): v for k, v in overrides.items()})
    return serde.pack_tensors(tensors)


def test_wrong_shape_vs_expected() -> None:
    manifest, payload = _packed(layer__0__lora_A=np.ones((8, 32), dtype=np.float32))
    err = _raises(
        lambda: serde.unpack_tensors(manifest, payload, expected=_expected(), who="client 'c3'"),
        "client 'c3': tensor 'layer.0.lora_A' has shape (8, 32), expected (8, 16)",
    )
    assert err.code.name == "INVALID_ARGUMENT"


def test_wrong_dtype_vs_expected() -> None:
    manifest, payload = _packed(layer__0__lora_B=np.ones((16, 8), dtype=np.float64))
    _raises(
        lambda: serde.unpack_tensors(manifest, payload, expected=_expected(), who="client 'c3'"),
        "client 'c3'", "'layer.0.lora_B'", "float64", "expected float32",
    )


def test_missing_tensor_vs_expected() -> None:
    manifest, payload = serde.pack_tensors({"layer.0.lora_A": np.ones((8, 16), np.float32)})
    _raises(
        lambda: serde.unpack_tensors(manifest, payload, expected=_expected(), who="c3"),
        "c3", "missing", "'layer.0.lora_B'",
    )


def test_extra_tensor_vs_expected() -> None:
    manifest, payload = _packed(bonus=np.ones(2, dtype=np.float32))
    _raises(
        lambda: serde.unpack_tensors(manifest, payload, expected=_expected(), who="c3"),
        "c3", "unexpected", "'bonus'",
    )


def _unpack(manifest: pb.Manifest, payload: bytes) -> dict[str, np.ndarray]:
    return serde.unpack_tensors(manifest, payload, who="c3")


def test_duplicate_name() -> None:
    manifest, payload = _packed()
    manifest.tensors.add().CopyFrom(manifest.tensors[0])
    manifest.total_bytes += 8 * 16 * 4
    payload += payload[: 8 * 16 * 4]
    manifest.sha256 = hashlib.sha256(payload).hexdigest()
    _raises(lambda: _unpack(manifest, payload), "c3", "'layer.0.lora_A'", "twice")


def test_empty_name() -> None:
    manifest, payload = _packed()
    manifest.tensors[1].name = ""
    _raises(lambda: serde.unpack_tensors(manifest, payload, who="c3"), "c3", "empty name")


def test_disallowed_dtype_on_pack_and_unpack() -> None:
    _raises(
        lambda: serde.pack_tensors({"obj": np.array([object()], dtype=object)}), "'obj'", "object"
    )
    _raises(lambda: serde.pack_tensors({"s": np.array(["hi"])}), "'s'")
    manifest, payload = _packed()
    manifest.tensors[0].dtype = "object"
    _raises(lambda: _unpack(manifest, payload), "c3", "'layer.0.lora_A'", "object")


def test_negative_and_absurd_shapes() -> None:
    manifest, payload = _packed()
    manifest.tensors[0].shape[:] = [-8, -16]
    _raises(lambda: _unpack(manifest, payload), "c3", "'layer.0.lora_A'", "negative")
    manifest, payload = _packed()
    manifest.tensors[0].shape[:] = [2**40, 2**40, 2**40]
    _raises(lambda: serde.unpack_tensors(manifest, payload, who="c3"), "c3", "'layer.0.lora_A'")
    manifest, payload = _packed()
    manifest.tensors[0].shape[:] = [0, 2**62]  # zero elements, but numpy could not build it
    manifest.total_bytes = 16 * 8 * 4
    _raises(lambda: serde.unpack_tensors(manifest, payload[512:], who="c3"), "'layer.0.lora_A'")
    manifest, payload = _packed()
    manifest.tensors[0].shape[:] = [1] * 100
    _raises(lambda: _unpack(manifest, payload), "'layer.0.lora_A'", "dimensions")


def test_total_bytes_inconsistent_with_specs() -> None:
    manifest, payload = _packed()
    manifest.total_bytes -= 4
    _raises(lambda: serde.unpack_tensors(manifest, payload[:-4], who="c3"), "c3", "total_bytes")


def test_payload_length_differs_from_total_bytes() -> None:
    manifest, payload = _packed()
    _raises(lambda: serde.unpack_tensors(manifest, payload[:-4], who="c3"), "c3", "payload")


def test_bad_checksum_in_unpack() -> None:
    manifest, payload = _packed()
    corrupted = bytearray(payload)
    corrupted[5] ^= 0xFF
    _raises(lambda: serde.unpack_tensors(manifest, bytes(corrupted), who="c3"), "c3", "sha256")
    serde.unpack_tensors(manifest, bytes(corrupted), verify_checksum=False)


# --- malformed streams -------------------------------------------------------------------------


def _stream(chunk_size: int = 100) -> list[pb.UpdateChunk]:
    header, payload = _header(_bundle())
    return list(serde.update_stream(header, payload, chunk_size=chunk_size))


def _read(messages: list[pb.UpdateChunk]) -> tuple[pb.UpdateHeader, bytes]:
    return serde.read_update_stream(messages, max_bytes=1 << 20, who="client 'c3'")


def test_bad_checksum_in_stream() -> None:
    messages = _stream()
    messages[2].chunk.data = bytes([messages[2].chunk.data[0] ^ 1]) + messages[2].chunk.data[1:]
    _raises(lambda: _read(messages), "client 'c3'", "sha256")


def test_truncated_stream() -> None:
    messages = _stream()
    total = messages[0].header.manifest.total_bytes
    got = total - len(messages[-1].chunk.data)
    message = f"truncated stream: got {got} of {total} bytes"
    _raises(lambda: _read(messages[:-1]), "client 'c3'", message)


def test_gap_in_offsets() -> None:
    messages = _stream()
    del messages[2]
    _raises(lambda: _read(messages), "client 'c3'", "offset 200", "gap")


def test_overlap_in_offsets() -> None:
    messages = _stream()
    messages[2].chunk.offset = 50
    _raises(lambda: _read(messages), "client 'c3'", "offset 50", "overlap")


def test_reordered_chunks() -> None:
    messages = _stream()
    messages[2], messages[3] = messages[3], messages[2]
    _raises(lambda: _read(messages), "client 'c3'", "offset 200")


def test_overrun_past_total_bytes() -> None:
    messages = _stream()
    last = messages[-1].chunk
    messages.append(pb.UpdateChunk(chunk=pb.Chunk(offset=last.offset + len(last.data), data=b"x")))
    _raises(lambda: _read(messages), "client 'c3'", "overruns")
    messages = _stream()
    messages[-1].chunk.data += b"xyz"
    _raises(lambda: _read(messages), "client 'c3'", "overruns")


def test_empty_chunk_refused() -> None:
    messages = _stream()
    messages.insert(2, pb.UpdateChunk(chunk=pb.Chunk(offset=100, data=b"")))
    _raises(lambda: _read(messages), "client 'c3'", "empty chunk at offset 100")


def test_total_bytes_over_limit_refused_before_data() -> None:
    manifest = pb.Manifest(total_bytes=1 << 40, sha256="0" * 64)
    header = pb.UpdateHeader(manifest=manifest)

    def messages() -> Iterator[pb.UpdateChunk]:
        yield pb.UpdateChunk(header=header)
        raise AssertionError("data was read before the size check")

    _raises(
        lambda: serde.read_update_stream(messages(), max_bytes=1 << 20, who="c3"), "c3", "exceeds"
    )
    _raises(lambda: serde.ChunkAssembler(manifest, max_bytes=1 << 20, who="c3"), "c3", str(1 << 40))


def test_stream_starting_with_chunk() -> None:
    messages = _stream()
    _raises(lambda: _read(messages[1:]), "client 'c3'", "stream must start with a header")


def test_two_headers() -> None:
    messages = _stream()
    messages.insert(2, messages[0])
    _raises(lambda: _read(messages), "client 'c3'", "second header")


def test_empty_stream() -> None:
    _raises(lambda: _read([]), "client 'c3'", "empty stream")
    _raises(lambda: serde.read_task_stream([], max_bytes=10), "server", "empty stream")


def test_update_header_without_manifest() -> None:
    _raises(lambda: _read([pb.UpdateChunk(header=pb.UpdateHeader())]), "client 'c3'", "manifest")


def test_message_without_part() -> None:
    messages = _stream()
    messages.insert(2, pb.UpdateChunk())
    _raises(lambda: _read(messages), "client 'c3'", "neither")


def test_sender_payload_mismatch_is_a_local_error() -> None:
    header, payload = _header(_bundle())
    with pytest.raises(ValueError):
        serde.update_stream(header, payload[:-1])
