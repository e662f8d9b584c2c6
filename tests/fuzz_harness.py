"""A fuzz harness for the gRPC server: malformed messages on every RPC and protocol phase (issue 15).

Not a test module (pytest collects only ``test_*.py``): `tests/test_fuzz.py` runs it briefly and
``benchmarks/fuzz.py`` runs it long. A real `FederatedServer` behind a real `GrpcServer` on
loopback runs its rounds while honest `FederatedClient` threads take part; every honest message
is intercepted by `FuzzTransport`, which first sends mutants of it over a raw channel (bytes in,
bytes out, so undecodable bytes really reach the server) and then the real message:

- Join (after every party joined, so a mutant with a fresh valid id finds the run full), PullTask
  and Leave requests: random bytes, flipped, truncated or spliced bytes, and field mutations (run
  id, round, ids with bad characters or 100 kB long, protocol version, fingerprint, example count,
  stage info);
- PushUpdate streams of every phase the secure mode declares (plain: the update; secagg+:
  advertise-keys, share-keys, masked-input, unmask): the same byte mutations on any message of
  the stream, plus wrong run / round / phase / client, huge or negative shapes, odd dtypes, wrong
  sizes and checksums, chunks reordered, dropped, duplicated, empty or past the end, no header,
  two headers, bad weights and metrics, blobs with bad names, unknown names, too many or too
  large, NaN and infinite tensors, another encoding.

One more party (``zz-fuzz``) joins validly, takes part in every cohort and never sends a valid
answer: it sends mutants of what it would answer, then leaves and joins again, so rounds do not
wait for it. The mutator is a `random.Random` seeded per (seed, party, RPC, call): the same seed
sends the same mutants (how many polls there are depends on timing).

Oracles: (a) no refusal is INTERNAL, UNKNOWN or another code outside `ALLOWED` (a client-side
timeout counts as a hang); (b) no mutant that is invalid is accepted, and ``zz-fuzz`` never
contributes to a round; (c) the honest clients finish every round with status ok and the round
thread stays alive. A mutant the server cannot tell from a valid message (a changed weight within
bounds, a blob value of the right size, another joined party's id: without mutual TLS anyone may
claim any id) is not sent and is counted in ``skipped_ambiguous``.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from protocols.wire import serde
from protocols.wire.limits import CLIENT_ID_PATTERN
from protocols.wire.v1 import federation_pb2 as pb
from secure_fl.client.client import ClientStages, FederatedClient
from secure_fl.client.trainer import LocalTrainer
from secure_fl.config import Config
from secure_fl.data.sources import client_dataset
from secure_fl.server.engine import BackgroundRun, FederatedServer
from secure_fl.transport.grpc_client import CHANNEL_OPTIONS, GrpcTransport
from secure_fl.transport.grpc_server import SERVICE_NAME, GrpcServer

#: Every status a refusal may carry; anything else (INTERNAL, UNKNOWN, UNAVAILABLE...) is a crash.
ALLOWED = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
})
FUZZ_ID = "zz-fuzz"
#: Seconds a raw fuzz call may take before it counts as a hang.
CALL_TIMEOUT = 15.0
_BAD_IDS = ("", "evil\x1b[2J", "a\nb", "nul\x00", "sp ace", "-x", "x" * 65, "é" * 10, "y" * 100_000, "client-99")
_BAD_NAMES = ("", "\x00", "../../etc", "a" * 200, "é", "not-a-phase", "update\n")
_BAD_DTYPES = ("", "object", "float128", "complex64", "<U10", "V8", "float33", "O", "bool\x00", ">f4", "int4")


@dataclass
class Tally:
    """What a fuzz run sent and how the server answered (thread-safe)."""

    messages: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_rpc: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    accepted_invalid: list[str] = field(default_factory=list)
    skipped_ambiguous: int = 0
    #: Mutants the mutator failed to build (a harness bug, reported, never sent).
    harness_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    #: The raw messages of every accepted invalid mutant (hex), to replay them.
    evidence: list[list[str]] = field(default_factory=list)

    def record(self, rpc: str, label: str, status: str, *, invalid: bool, details: str = "",
               raw: bytes | list[bytes] = b"") -> None:
        """Count one sent mutant and check oracles (a) and (b) on the answer."""
        with self.lock:
            self.messages += 1
            self.by_status[status] += 1
            self.by_rpc[rpc] += 1
            if status == "OK":
                if invalid:
                    self.accepted_invalid.append(f"{rpc}/{label}")
                    self.evidence.append([r.hex() for r in (raw if isinstance(raw, list) else [raw])])
            elif status not in {c.name for c in ALLOWED} or (status == "DEADLINE_EXCEEDED" and details == "Deadline Exceeded"):
                self.crashes.append(f"{rpc}/{label}: {status}: {details[:200]}")

    def summary(self) -> dict[str, Any]:
        """The counters as a JSON-ready dict."""
        with self.lock:
            return {
                "messages": self.messages, "by_status": dict(sorted(self.by_status.items())),
                "by_rpc": dict(sorted(self.by_rpc.items())), "crashes": len(self.crashes),
                "accepted_invalid": len(self.accepted_invalid), "skipped_ambiguous": self.skipped_ambiguous,
                "harness_errors": len(self.harness_errors),
                "crash_examples": self.crashes[:5], "accepted_examples": self.accepted_invalid[:5],
            }


def _decode(kind: type[Message], raw: bytes) -> Any:
    try:
        return kind.FromString(raw)
    except (DecodeError, RuntimeError, ValueError):
        return None


def _byte_mutants(rng: random.Random, raw: bytes) -> tuple[str, bytes]:
    """One byte-level mutation of a serialized message."""
    data = bytearray(raw)
    how = rng.choice(("flip", "flip", "truncate", "insert", "delete", "random", "splice", "varint"))
    if how == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif how == "truncate" and data:
        del data[rng.randrange(len(data)):]
    elif how == "insert":
        i = rng.randint(0, len(data))
        data[i:i] = rng.randbytes(rng.randint(1, 16))
    elif how == "delete" and data:
        i = rng.randrange(len(data))
        del data[i:i + rng.randint(1, 16)]
    elif how == "splice":  # a field with a huge declared length, or a deep nesting of groups
        data += rng.choice((b"\x0a\xff\xff\xff\xff\x0f", b"\x0b" * 2000, b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01"))
    elif how == "varint":
        data += b"\x10" + b"\xff" * rng.randint(9, 12)
    else:
        how = "random"
        data = bytearray(rng.randbytes(rng.randint(0, 300)))
    return how, bytes(data)


class Fuzzer:
    """Sends mutants of real messages through a raw channel and judges the answers."""

    def __init__(self, address: str, server: FederatedServer, *, seed: int, tally: Tally, per_push: int,
                 per_pull: int, pull_budget: int, per_join: int, per_leave: int, num_parties: int) -> None:
        self.server = server
        self.coordinator = server.coordinator
        self.seed = seed
        self.tally = tally
        self.per_push, self.per_pull, self.per_join, self.per_leave = per_push, per_pull, per_join, per_leave
        self.pull_budget = pull_budget
        self.num_parties = num_parties
        #: Held while judging and sending a Join/Leave/PullTask mutant, and while zz-fuzz leaves and rejoins.
        self.membership = threading.RLock()
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        path = f"/{SERVICE_NAME}/"
        self._unary = {m: self._channel.unary_unary(path + m) for m in ("Join", "Leave")}
        self._pull = self._channel.unary_stream(path + "PullTask")
        self._push = self._channel.stream_unary(path + "PushUpdate")
        self._calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def rng(self, party: str, rpc: str) -> random.Random:
        """The mutator of one intercepted call, seeded by (seed, party, RPC, call number)."""
        with self._lock:
            self._calls[party, rpc] += 1
            n = self._calls[party, rpc]
        return random.Random(f"{self.seed}/{party}/{rpc}/{n}")

    def close(self) -> None:
        """Close the raw channel."""
        self._channel.close()

    # ------------------------------------------------------------------ sending
    def _send(self, rpc: str, label: str, payload: bytes | list[bytes], invalid: bool) -> None:
        try:
            if rpc == "PushUpdate":
                self._push(iter(payload), timeout=CALL_TIMEOUT)
            elif rpc == "PullTask":
                list(self._pull(payload, timeout=CALL_TIMEOUT))
            else:
                self._unary[rpc](payload, timeout=CALL_TIMEOUT)
            status, details = "OK", ""
        except grpc.RpcError as exc:
            status, details = exc.code().name, exc.details() or ""
        self.tally.record(rpc, label, status, invalid=invalid, details=details, raw=payload)

    def _skip(self) -> None:
        with self.tally.lock:
            self.tally.skipped_ambiguous += 1

    # ------------------------------------------------------------------ unary requests
    def fuzz_join(self, request: pb.JoinRequest, party: str) -> None:
        """Join mutants, once every party joined: each must be refused (a fresh valid id finds the run full)."""
        self.coordinator.wait_for_clients(self.num_parties, timeout=60)
        rng = self.rng(party, "Join")
        for _ in range(self.per_join):
            label, raw = self._mutate_unary(rng, request, _join_fields)
            with self.membership:
                self._send("Join", label, raw, invalid=True)

    def fuzz_leave(self, request: pb.LeaveRequest, party: str, count: int | None = None) -> None:
        """Leave mutants: a decodable one for this run naming a joined party would remove it, so it is not sent."""
        rng = self.rng(party, "Leave")
        for _ in range(self.per_leave if count is None else count):
            label, raw = self._mutate_unary(rng, request, _envelope_fields)
            with self.membership:
                decoded = _decode(pb.LeaveRequest, raw)
                if decoded is not None and decoded.envelope.run_id == self.server.run_id and \
                        decoded.envelope.client_id in set(self.coordinator.active_clients()):
                    self._skip()
                    continue
                self._send("Leave", label, raw, invalid=True)

    def fuzz_pull(self, request: pb.PullTaskRequest, party: str) -> None:
        """PullTask mutants: answered only if the decoded request is for this run and a joined party."""
        with self._lock:
            count = min(self.per_pull, self.pull_budget)
            self.pull_budget -= count
        if count <= 0:
            return
        rng = self.rng(party, "PullTask")
        for _ in range(count):
            label, raw = self._mutate_unary(rng, request, _envelope_fields)
            with self.membership:
                decoded = _decode(pb.PullTaskRequest, raw)
                valid = decoded is not None and decoded.envelope.run_id == self.server.run_id and \
                    decoded.envelope.client_id in set(self.coordinator.active_clients())
                self._send("PullTask", label, raw, invalid=not valid)

    def _mutate_unary(self, rng: random.Random, request: Message, fields: Callable[[random.Random, Any], str]) -> tuple[str, bytes]:
        if rng.random() < 0.5:
            return _byte_mutants(rng, request.SerializeToString())
        copy = type(request)()
        copy.CopyFrom(request)
        return fields(rng, copy), copy.SerializeToString()

    # ------------------------------------------------------------------ update streams
    def fuzz_push(self, messages: list[pb.UpdateChunk], party: str, count: int | None = None) -> None:
        """PushUpdate mutants of a real answer: every one sent must be refused."""
        rng = self.rng(party, "PushUpdate")
        base = _hard_key(messages)
        assert base is not None
        original = [m.SerializeToString(deterministic=True) for m in messages]
        in_clear = messages[0].header.weight > 0  # a training answer whose weight travels in the clear
        for _ in range(self.per_push if count is None else count):
            try:
                label, stream, certain = _mutate_stream(rng, messages, trains=in_clear, run_id=self.server.run_id)
            except (ValueError, TypeError, OverflowError) as exc:  # a mutator bug must not stop the honest client
                with self.tally.lock:
                    self.tally.harness_errors.append(repr(exc)[:200])
                continue
            if _canonical(stream) == original or (not certain and self._could_be_valid(stream, base)):
                self._skip()  # indistinguishable from a valid answer (or another party's)
                continue
            self._send("PushUpdate", label, stream, invalid=True)

    def _could_be_valid(self, stream: list[bytes], base: tuple[Any, ...]) -> bool:
        """Whether a byte-mutated stream decodes to the original's checked content (or another joined party's)."""
        decoded = [_decode(pb.UpdateChunk, raw) for raw in stream]
        if not all(d is not None for d in decoded):
            return False
        key = _hard_key(decoded)
        if key is None or key[1:] != base[1:]:
            return False
        (run, number, client, phase), (base_run, base_number, base_client, base_phase) = key[0], base[0]
        # an empty phase name answers the training phase (v0.1 clients): treat it as the same phase
        return (run, number) == (base_run, base_number) and phase in (base_phase, "") and (
            client == base_client or client in set(self.coordinator.active_clients())
        )


def _join_fields(rng: random.Random, r: pb.JoinRequest) -> str:
    how = rng.choice(("version", "fingerprint", "examples", "info", "info-huge", "envelope", "envelope"))
    if how == "version":
        r.protocol_version = rng.choice((0, 2, 99, 2**32 - 1))
    elif how == "fingerprint":
        r.model_fingerprint = rng.choice(("", "0" * 64, r.model_fingerprint.upper(), r.model_fingerprint[:-1], "x" * 10_000))
    elif how == "examples":
        r.num_examples = rng.choice((0, 2**64 - 1, 10**10))
    elif how == "info":
        key = rng.choice([k for k in r.info] or ["stage.secure"])
        r.info[key] = rng.choice(("", "garbage", "\x00\n", "z" * 5000))
    elif how == "info-huge":
        for i in range(200):
            r.info[f"k{i}"] = "v" * 100
    else:
        return _envelope_fields(rng, r)
    return how


def _envelope_fields(rng: random.Random, r: Any) -> str:
    how = rng.choice(("run_id", "client_id", "client_id", "round", "phase", "clear"))
    env = r.envelope
    if how == "run_id":
        env.run_id = rng.choice(("other-run", "r" * 100_000, "\x00", env.run_id + "x"))
    elif how == "client_id":
        env.client_id = rng.choice(_BAD_IDS)
    elif how == "round":
        env.round = rng.choice((1, 2, 7, 2**32 - 1))
        env.client_id = rng.choice(_BAD_IDS)  # with a round, still someone unknown
    elif how == "phase":
        env.phase = rng.choice(_BAD_NAMES)
        env.run_id = "other-run"
    else:
        r.ClearField("envelope")
    return how


def _canonical(stream: list[bytes]) -> list[bytes] | None:
    """The messages re-serialized deterministically (map order fixed); ``None`` if one does not decode."""
    decoded = [_decode(pb.UpdateChunk, raw) for raw in stream]
    if not all(d is not None for d in decoded):
        return None
    return [d.SerializeToString(deterministic=True) for d in decoded]


def _hard_key(messages: Iterable[Any]) -> tuple[Any, ...] | None:
    """What the server must check exactly: envelope, manifest, encoding and the chunks, in order."""
    items = list(messages)
    if not items or items[0].WhichOneof("part") != "header":
        return None
    h = items[0].header
    env = (h.envelope.run_id, h.envelope.round, h.envelope.client_id, h.envelope.phase)
    rest = tuple(
        ("h" if m.WhichOneof("part") == "header" else "c", m.chunk.offset, bytes(m.chunk.data)) for m in items[1:]
    )
    return (env, h.manifest.SerializeToString(deterministic=True), h.encoding, h.HasField("manifest"), rest)


def _copy_stream(messages: list[pb.UpdateChunk]) -> list[pb.UpdateChunk]:
    out = []
    for m in messages:
        c = pb.UpdateChunk()
        c.CopyFrom(m)
        out.append(c)
    return out


def _mutate_stream(
    rng: random.Random, messages: list[pb.UpdateChunk], *, trains: bool, run_id: str
) -> tuple[str, list[bytes], bool]:
    """``(label, raw messages, certainly invalid)`` for one mutant of a valid PushUpdate stream."""
    if rng.random() < 0.35:  # byte mutations: judged afterwards by what they decode to
        raws = [m.SerializeToString() for m in messages]
        i = rng.randrange(len(raws))
        label, raws[i] = _byte_mutants(rng, raws[i])
        if label == "random" and rng.random() < 0.3:
            raws = [rng.randbytes(rng.randint(0, 200)) for _ in range(rng.randint(1, 5))]
        return f"bytes-{label}@{i}", raws, False
    s = _copy_stream(messages)
    h = s[0].header
    how = rng.choice((
        "envelope", "envelope", "manifest", "manifest", "dtype", "chunks", "chunks", "weight", "metrics",
        "blobs", "blobs", "nan", "encoding", "wrong-type",
    ))
    if how == "envelope":
        what = rng.choice(("run", "round", "phase", "client"))
        if what == "run":
            h.envelope.run_id = rng.choice(("", "other-run", run_id + "x", "r" * 50_000, "\n"))
        elif what == "round":
            h.envelope.round = rng.choice((0, h.envelope.round + 1, h.envelope.round + 100, 2**32 - 1)) if h.envelope.round else 5
        elif what == "phase":
            h.envelope.phase = rng.choice([n for n in (*_BAD_NAMES, "advertise-keys", "share-keys", "masked-input",
                                                        "unmask", "update") if n not in (h.envelope.phase, "")])
        else:
            h.envelope.client_id = rng.choice(_BAD_IDS)
        how = f"envelope-{what}"
    elif how == "manifest":
        what = rng.choice(("huge-shape", "negative-shape", "many-dims", "total", "sha", "rename", "extra", "drop", "dup", "clear"))
        tensors = h.manifest.tensors
        if what == "huge-shape" and tensors:
            tensors[rng.randrange(len(tensors))].shape[:] = rng.choice(([2**40], [2**31, 2**31], [2**62, 4], [2**63 - 1]))
        elif what == "negative-shape" and tensors:
            t = tensors[rng.randrange(len(tensors))]
            t.shape[:] = [-1, *t.shape] if rng.random() < 0.5 else [-(2**63)]
        elif what == "many-dims" and tensors:
            tensors[rng.randrange(len(tensors))].shape[:] = [1] * rng.choice((33, 100, 1000))
        elif what == "total":
            h.manifest.total_bytes = rng.choice((0, h.manifest.total_bytes + 1, max(0, h.manifest.total_bytes - 1), 2**64 - 1, 1 << 40))
        elif what == "sha":
            h.manifest.sha256 = rng.choice(("", "0" * 64, h.manifest.sha256.upper() if h.manifest.sha256 != h.manifest.sha256.upper() else "z", "x" * 10_000))
        elif what == "rename" and tensors:
            tensors[rng.randrange(len(tensors))].name = rng.choice(("", "x", "\x00", "a" * 5000, "../w"))
        elif what in ("extra", "dup"):
            t = tensors.add()
            if what == "dup" and len(tensors) > 1:
                t.CopyFrom(tensors[0])
            else:
                t.name, t.dtype, t.shape[:] = "extra.tensor", "float32", [1]
        elif what == "drop" and tensors:
            del tensors[rng.randrange(len(tensors))]
        else:
            what = "clear"
            h.ClearField("manifest")
            if len(s) == 1:
                s.append(pb.UpdateChunk(chunk=pb.Chunk(offset=0, data=b"x")))
        how = f"manifest-{what}"
    elif how == "dtype" and h.manifest.tensors:
        h.manifest.tensors[rng.randrange(len(h.manifest.tensors))].dtype = rng.choice(_BAD_DTYPES + ("float64", "int64", "uint8"))
        if h.manifest.tensors and all(t.dtype == m.dtype for t, m in zip(h.manifest.tensors, messages[0].header.manifest.tensors)):
            h.manifest.tensors[0].dtype = "object"
    elif how == "chunks":
        chunks = s[1:]
        what = rng.choice(("no-header", "two-headers", "header-last", "swap", "drop", "dup", "offset", "empty", "past-end", "empty-stream", "extra-data"))
        if what == "no-header":
            s = chunks or [pb.UpdateChunk(chunk=pb.Chunk(offset=0, data=b"x"))]
        elif what == "two-headers":
            s.insert(rng.randint(1, len(s)), _copy_stream(s[:1])[0])
        elif what == "header-last":
            s = [*chunks, s[0]] if chunks else [s[0], s[0]]
        elif what == "swap" and len(chunks) >= 2:
            i, j = rng.sample(range(1, len(s)), 2)
            s[i], s[j] = s[j], s[i]
            if bytes(s[i].chunk.data) == bytes(s[j].chunk.data):
                s[i].chunk.offset += 1
        elif what == "drop" and chunks:
            del s[rng.randrange(1, len(s))]
        elif what == "dup" and chunks:
            i = rng.randrange(1, len(s))
            s.insert(i, _copy_stream([s[i]])[0])
        elif what == "offset" and chunks:
            c = s[rng.randrange(1, len(s))].chunk
            c.offset = (c.offset + rng.choice((1, 2**63, 2**64 - 1))) % 2**64
        elif what == "empty":
            s.insert(rng.randint(1, len(s)), pb.UpdateChunk(chunk=pb.Chunk(offset=h.manifest.total_bytes if not chunks else 0)))
        elif what == "empty-stream":
            return "chunks-empty-stream", [], True
        else:
            what = "past-end"
            s.append(pb.UpdateChunk(chunk=pb.Chunk(offset=h.manifest.total_bytes, data=rng.randbytes(rng.randint(1, 64)))))
        how = f"chunks-{what}"
    elif how == "weight":
        if trains:
            h.weight = rng.choice((-1.0, 0.0, math.nan, math.inf, -math.inf, 1e39, 1e300, 5e-324 * -1))
        else:
            h.weight = rng.choice((1.0, -1.0, math.nan, math.inf, 1e-300))
    elif how == "metrics":
        if trains:
            choice = rng.choice(("nan", "inf", "range", "name", "many"))
            if choice == "nan":
                h.metrics["train_loss"] = math.nan
            elif choice == "inf":
                h.metrics["eval_loss"] = math.inf
            elif choice == "range":
                h.metrics["eval_accuracy"] = rng.choice((7.0, -0.5, 1e300))
            elif choice == "name":
                h.metrics[rng.choice(("\x00", "a b", "x" * 100, "9lives", "é"))] = 1.0
            else:
                for i in range(rng.choice((33, 500))):
                    h.metrics[f"m{i}"] = 1.0
        else:
            h.metrics["train_loss"] = 0.5
    elif how == "blobs":
        what = rng.choice(("bad-name", "unknown", "oversize", "too-many"))
        if what == "bad-name":
            h.blobs[rng.choice(("", "\x00", "a b", "x" * 200, "é", "\n"))] = b"x"
        elif what == "unknown":
            h.blobs["no-such-blob"] = rng.randbytes(8)
        elif what == "oversize":
            if h.blobs:
                name = rng.choice(list(h.blobs))
                h.blobs[name] = bytes(h.blobs[name]) + rng.randbytes(rng.choice((1, 4096, 1 << 20)))
            else:
                h.blobs["pk"] = rng.randbytes(1 << 16)
        else:
            name = next(iter(h.blobs), "share/client-0")
            prefix = name.rsplit("/", 1)[0]
            for i in range(300):
                h.blobs[f"{prefix}/p{i}"] = b"x"
        how = f"blobs-{what}"
    elif how == "nan":
        tensors = _float_tensors(messages)
        if tensors is None:
            h.manifest.tensors.add(name="nan", dtype="float32", shape=[1])
            how = "nan-extra"
        else:
            name = rng.choice(sorted(tensors))
            tensors[name] = tensors[name].copy()
            tensors[name].flat[rng.randrange(tensors[name].size)] = rng.choice((np.nan, np.inf, -np.inf))
            manifest, body = serde.pack_tensors(tensors)
            header = pb.UpdateHeader()
            header.CopyFrom(h)
            header.manifest.CopyFrom(manifest)
            s = list(serde.update_stream(header, body, rng.choice((64, 4096, 1 << 20))))
    elif how == "encoding":
        h.encoding = rng.choice(("", "ckks", "plain" if h.encoding != "plain" else "secagg+", "\x00", "x" * 1000))
    else:
        how = "wrong-type"
        return how, [pb.JoinRequest(envelope=h.envelope, protocol_version=1).SerializeToString(), *[m.SerializeToString() for m in s[1:]]], False
    return how, [m.SerializeToString() for m in s], True


def _float_tensors(messages: list[pb.UpdateChunk]) -> dict[str, np.ndarray] | None:
    header, payload = serde.read_update_stream(messages, max_bytes=1 << 30)
    tensors = serde.unpack_tensors(header.manifest, payload)
    if not tensors or not all(v.dtype.kind == "f" and v.size for v in tensors.values()):
        return None
    return dict(tensors)


class FuzzTransport(GrpcTransport):
    """A real client transport that sends mutants of every message before the message itself.

    With ``withhold`` (the fuzz party), answers are never sent: after their mutants, the party
    leaves and joins again and tells its client the answer was accepted.
    """

    def __init__(self, address: str, fuzzer: Fuzzer, party: str, *, withhold: bool = False) -> None:
        super().__init__(address, timeout=120.0)
        self.fuzzer, self.party, self.withhold = fuzzer, party, withhold
        self.join_request: pb.JoinRequest | None = None
        self.errors: list[str] = []

    def join(self, request: pb.JoinRequest) -> pb.JoinReply:
        """The real Join, then (first time only) Join and Leave mutants."""
        with self.fuzzer.membership:
            reply = super().join(request)
        first = self.join_request is None
        self.join_request = request
        if first:
            self.fuzzer.fuzz_join(request, self.party)
            self.fuzzer.fuzz_leave(pb.LeaveRequest(envelope=reply.envelope, reason="fuzz"), self.party)
        return reply

    def pull_task(self, request: pb.PullTaskRequest) -> Iterator[pb.TaskChunk]:
        """PullTask mutants (while the pull budget lasts), then the real poll."""
        self.fuzzer.fuzz_pull(request, self.party)
        return super().pull_task(request)

    def push_update(self, messages: Iterable[pb.UpdateChunk]) -> pb.PushReply:
        """PushUpdate mutants of this answer, then the answer (or, withholding, leave and rejoin)."""
        stream = list(messages)
        self.fuzzer.fuzz_push(stream, self.party)
        if not self.withhold:
            return super().push_update(stream)
        header = stream[0].header
        assert self.join_request is not None
        with self.fuzzer.membership:
            super().leave(pb.LeaveRequest(envelope=serde.envelope(header.envelope.run_id, 0, self.party), reason="fuzz"))
            super().join(self.join_request)
        return pb.PushReply(envelope=header.envelope, accepted=True, message="withheld by the fuzz party")

    def leave(self, request: pb.LeaveRequest) -> pb.LeaveReply:
        """Leave mutants, then the real Leave."""
        self.fuzzer.fuzz_leave(request, self.party, count=max(1, self.fuzzer.per_leave // 4))
        return super().leave(request)


def _client(config: Config, index: int, client_id: str, transport: GrpcTransport) -> FederatedClient:
    trainer = LocalTrainer.from_config(config, client_dataset(config, index))
    return FederatedClient(client_id, transport, trainer, ClientStages.from_config(config), seed=config.run.seed, chunk_size=4096)


def fuzz_config(mode: str, *, rounds: int, overrides: Iterable[str] = ()) -> Config:
    """The smoke preset sized for a fuzz run: plain (2 honest + zz-fuzz) or secagg+ (4 honest + zz-fuzz)."""
    from secure_fl.config import load_preset

    honest = 2 if mode == "plain" else 4
    base = [
        f"run.num_clients={honest + 1}", f"run.clients_per_round={honest + 1}", f"run.rounds={rounds}",
        "run.round_timeout=120", "run.join_timeout=120", "client.local_steps=2", "transport.poll_interval=0.05",
    ]
    if mode != "plain":
        base += [f"secure.mode='{mode}'", "secure.params.phase_timeout=60"]
    return load_preset("smoke").with_overrides([*base, *overrides])


def run_fuzz(config: Config, run_dir: Path, *, messages: int, seed: int = 0) -> dict[str, Any]:
    """Run one fuzzed federation; return the tally and the oracles (see the module docstring)."""
    honest = config.run.num_clients - 1
    rounds = config.run.rounds
    phases = 1 if config.secure.mode == "plain" else 4
    pushes = rounds * ((honest * phases) + 1)  # zz-fuzz answers one phase per round
    per_push = max(1, int(messages * 0.8) // pushes)
    per_join = max(1, int(messages * 0.1) // (honest + 1))
    per_leave = max(4, int(messages * 0.05) // (honest + 1))
    pull_budget = max(0, messages - per_push * pushes - (per_join + per_leave + per_leave // 4) * (honest + 1))
    tally = Tally()
    server = FederatedServer(config, run_dir)
    grpc_server = GrpcServer.from_config(server.coordinator, "127.0.0.1:0", config.transport).start()
    rounds_thread = BackgroundRun(server)
    fuzzer = Fuzzer(grpc_server.address, server, seed=seed, tally=tally, per_push=per_push, per_pull=10,
                    pull_budget=pull_budget, per_join=per_join, per_leave=per_leave, num_parties=honest + 1)
    transports = [FuzzTransport(grpc_server.address, fuzzer, f"client-{i}") for i in range(honest)]
    transports.append(FuzzTransport(grpc_server.address, fuzzer, FUZZ_ID, withhold=True))
    clients = [_client(config, i, tr.party, tr) for i, tr in enumerate(transports)]
    failures: dict[str, str] = {}

    def run(client: FederatedClient) -> None:
        try:
            client.run(connect_timeout=60)
        except Exception as exc:  # noqa: BLE001 - recorded: oracle (c)
            failures[client.client_id] = f"{type(exc).__name__}: {exc}"

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(c,), name=c.client_id, daemon=True) for c in clients]
    for th in threads:
        th.start()
    server_alive = True
    deadline = started + 600
    while any(th.is_alive() for th in threads[:honest]) and time.monotonic() < deadline:
        server_alive = server_alive and (rounds_thread.is_alive() or server.coordinator.finished)
        time.sleep(0.1)
    rounds_thread.join(120)
    hung = rounds_thread.is_alive() or any(th.is_alive() for th in threads[:honest])
    server.coordinator.finish("fuzz over")
    for th in threads:
        th.join(30)
    grpc_server.stop(grace=0)
    fuzzer.close()
    seconds = time.monotonic() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run_dir / "metrics.jsonl").exists() else []
    contributors = [sorted(set(r.get("selected", [])) - set(r.get("dropped", []))) for r in records]
    honest_ids = [f"client-{i}" for i in range(honest)]
    rounds_ok = sum(1 for r, c in zip(records, contributors) if r.get("status") == "ok" and c == honest_ids)
    summary = tally.summary()
    summary["evidence"] = tally.evidence[:5]
    summary.update({
        "mode": config.secure.mode, "seed": seed, "rounds": rounds, "honest_clients": honest,
        "honest_rounds_ok": rounds_ok, "fuzz_party_contributed": any(FUZZ_ID in c for c in contributors),
        "honest_failures": {k: v for k, v in failures.items() if k != FUZZ_ID},
        "honest_rounds_trained": [c.rounds_trained for c in clients[:honest]],
        "server_alive": server_alive and not hung, "seconds": round(seconds, 2),
    })
    return summary
