"""SecAgg+ over real gRPC on loopback: 8 ``secure-fl-client`` processes, buckets of 4, two clients
SIGKILLed in different phases (issue 9).

The server runs in this process (the round engine in a thread behind a real `GrpcServer` on
127.0.0.1), so an injected fault can kill a client at an exact point: the coordinator's
``open_phase`` is wrapped, and just before ``share-keys`` opens one client process of bucket 0 gets
SIGKILL, and just before ``masked-input`` opens one of bucket 1. Each victim has answered every
earlier phase and cannot answer this one; the server learns of it only when the phase's deadline
passes (``[secure.params] phase_timeout`` for share-keys, ``run.round_timeout`` for masked-input). One drop per bucket of 4 is what the default (k, t) tolerates.

Checked: the round completes; ``metrics.jsonl`` and the ledger say who dropped in which phase; each
bucket's unmasked sum is the weighted sum of exactly its survivors' updates, and the released
adapter is the start plus their weighted mean. The updates are recomputed independently in this
process (training is seeded per round and client, so the same trainer gives the same update),
and agree within the quantisation step.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from protocols.secagg import BucketSum, Phase
from protocols.secagg import secaggplus_stages as st
from secure_fl.client.trainer import LocalTrainer, derive_seed
from secure_fl.config import Config
from secure_fl.data.sources import client_dataset
from secure_fl.errors import SecureFLError
from secure_fl.server.engine import RunResult
from tests.conftest import smoke_config
from tests.test_cli_e2e import Proc, Procs

CLIENTS = 8
BUCKET_SIZE = 4
#: Every phase's deadline, and what each killed client costs (the server waits it out once per
#: kill). The masked-input phase trains: 7 clients on 2 cores answered within 2 s of it opening.
PHASE_TIMEOUT = 12.0
#: The deadline of the phases that do not train (small messages: answered in milliseconds).
KEY_PHASE_TIMEOUT = 5.0
#: Bound on the federation: 8 client processes start (about 10 s of CPU each, mostly importing
#: torch and transformers), join, run one round and exit. Generous: the cores may be shared.
RUN_TIMEOUT = 240.0
#: Phase -> the bucket one of whose clients (the first by id) is killed just before it opens.
KILL_AT = {st.SHARE_KEYS: 0, st.MASKED_INPUT: 1}
#: The quantisation step of the default secagg+ settings (clip_range 8, precision 2^-12).
STEP = 2.0**-12

OVERRIDES = (
    f"run.num_clients={CLIENTS}",
    f"run.clients_per_round={CLIENTS}",
    "run.rounds=1",
    f"run.round_timeout={PHASE_TIMEOUT}",
    f"run.join_timeout={RUN_TIMEOUT - 40}",
    "run.require_full_cohort=true",
    "secure.mode='secagg+'",
    f"secure.bucket_size={BUCKET_SIZE}",
    f"secure.params.phase_timeout={KEY_PHASE_TIMEOUT}",
    "data.partition='dirichlet'",  # unequal example counts, so the masked weights matter
    "data.alpha=1.0",
    "transport.poll_interval=0.2",
    "transport.connect_timeout=60",
)


@pytest.fixture
def procs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Procs]:
    """The client processes, all killed after the test, whatever happened.

    Nine processes (8 clients and this one, the server) share the cores, so each runs torch on one
    thread: with a thread per core each they spin against each other, and a 10-step training of
    the tiny model takes seconds instead of a fraction of one.
    """
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    group = Procs(tmp_path / "logs")
    try:
        yield group
    finally:
        group.kill_all()
        torch.set_num_threads(threads)


@dataclass
class Federation:
    """What one run with injected kills left behind."""

    result: RunResult
    clients: dict[str, Proc]
    bucket_of: dict[str, int] = field(default_factory=dict)  # from the advertise-keys payloads
    killed: dict[str, str] = field(default_factory=dict)  # phase -> the client killed just before it
    buckets: list[BucketSum] = field(default_factory=list)  # what the protocol handed the pipeline
    timeline: list[tuple[str, float]] = field(default_factory=list)  # phase openings, seconds from start

    @property
    def survivors(self) -> list[str]:
        return sorted(set(self.clients) - set(self.killed.values()))


def _federate(running: Any, config: Config, procs: Procs) -> Federation:
    """Start the clients against ``running``, kill one per phase of `KILL_AT`, wait for the run and the exits."""
    coordinator, pipeline = running.server.coordinator, running.server.pipeline
    clients: dict[str, Proc] = {}
    bucket_of: dict[str, int] = {}
    killed: dict[str, str] = {}
    buckets: list[BucketSum] = []
    timeline: list[tuple[str, float]] = []
    began = time.monotonic()

    def describe() -> str:
        return f"phases opened at {timeline}; killed {killed}\n" + procs.describe()

    open_phase = coordinator.open_phase

    def open_phase_with_kills(phase: Phase, timeout: float) -> Any:
        """Injected fault: SIGKILL a client of the chosen bucket before ``phase`` is offered to it."""
        timeline.append((phase.name, round(time.monotonic() - began, 1)))
        if phase.name == st.ADVERTISE_KEYS:
            bucket_of.update({c: int(phase.payloads[c].blobs[st.BUCKET]) for c in phase.participants})
        if phase.name in KILL_AT:
            victim = min(c for c in phase.participants if bucket_of[c] == KILL_AT[phase.name])
            killed[phase.name] = victim  # first, so the watcher below never takes the kill for a crash
            clients[victim].popen.send_signal(signal.SIGKILL)
            clients[victim].popen.wait(timeout=10)
        return open_phase(phase, timeout)

    aggregate_buckets = pipeline.aggregate_buckets

    def recording_aggregate(global_state: Mapping[str, np.ndarray], sums: Sequence[BucketSum], **kwargs: Any) -> Any:
        """Observation only: keep the bucket sums the protocol unmasked."""
        buckets.extend(sums)
        return aggregate_buckets(global_state, sums, **kwargs)

    coordinator.open_phase = open_phase_with_kills
    pipeline.aggregate_buckets = recording_aggregate

    common = ("--preset", "smoke", *(arg for o in OVERRIDES for arg in ("--set", o)))
    for i in range(CLIENTS):
        cid = f"client-{i}"
        clients[cid] = procs.start(cid, "secure-fl-client", "--insecure", "--server", running.address, *common, "--client-id", cid)

    deadline = began + RUN_TIMEOUT
    while running.rounds.is_alive() and time.monotonic() < deadline:
        crashed = [c for c, p in clients.items() if p.popen.poll() not in (None, 0) and c not in killed.values()]
        if crashed:
            pytest.fail(f"client(s) {crashed} failed:\n" + describe())
        time.sleep(0.2)
    if running.rounds.is_alive():
        pytest.fail(f"the run did not finish within {RUN_TIMEOUT:.0f} s\n" + describe())
    try:
        result = running.result(timeout=1)
    except SecureFLError as exc:  # e.g. a client that never joined: say so, with every log
        pytest.fail(f"the run failed: {type(exc).__name__}: {exc}\n" + describe())
    federation = Federation(result, clients, bucket_of, killed, buckets, timeline)
    for cid in federation.survivors:  # the run is over: each survivor learns so at its next poll and exits
        try:
            clients[cid].popen.wait(timeout=max(10.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cid} did not exit after the run finished\n" + describe())
    bad = [c for c in federation.survivors if clients[c].popen.returncode != 0]
    assert not bad, f"non-zero exit: {bad}\n" + describe()
    assert all("trained rounds [1]" in clients[c].stdout for c in federation.survivors), describe()
    return federation


def _recompute_updates(
    config: Config, start: Mapping[str, np.ndarray], plan: Mapping[str, float], ids: Sequence[str]
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """Each client's round-1 update and weight, trained here as its own process trained it."""
    updates: dict[str, dict[str, np.ndarray]] = {}
    weights: dict[str, float] = {}
    adapted = None
    for cid in ids:
        trainer = LocalTrainer.from_config(config, client_dataset(config, int(cid.rsplit("-", 1)[1])), adapted=adapted)
        adapted = trainer.adapted
        delta, _ = trainer.train(dict(start), plan, seed=derive_seed(config.run.seed, 1, cid))
        updates[cid] = {k: np.asarray(v, dtype=np.float64) for k, v in delta.items()}
        weights[cid] = float(trainer.num_examples)
    return updates, weights


def _weighted_mean(
    updates: Mapping[str, Mapping[str, np.ndarray]], weights: Mapping[str, float], ids: Sequence[str]
) -> dict[str, np.ndarray]:
    total = sum(weights[c] for c in ids)
    return {k: sum(weights[c] * updates[c][k] for c in ids) / total for k in updates[ids[0]]}


@pytest.mark.timeout(RUN_TIMEOUT + 90)
def test_eight_client_processes_two_killed_in_different_phases(grpc_server, procs: Procs) -> None:
    config = smoke_config(*OVERRIDES)
    running = grpc_server(config)
    start = {k: v.copy() for k, v in running.server.global_state.items()}
    run = _federate(running, config, procs)
    killed, bucket_of, survivors = run.killed, run.bucket_of, run.survivors
    dropped = sorted(killed.values())

    # --- the faults happened where they were injected: one kill per phase, in different buckets
    assert sorted(killed) == sorted(KILL_AT), killed
    assert sorted(bucket_of) == sorted(run.clients)
    assert sorted(bucket_of.values()) == [0] * BUCKET_SIZE + [1] * BUCKET_SIZE, bucket_of
    for phase, victim in killed.items():
        assert run.clients[victim].popen.returncode == -signal.SIGKILL
        assert bucket_of[victim] == KILL_AT[phase]

    # --- metrics.jsonl: the round completed, and says who dropped in which phase
    lines = (run.result.run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert len(records) == 1 and records == run.result.metrics
    record = records[0]
    assert record["status"] == "ok", record.get("reason")
    assert record["selected"] == sorted(run.clients) and record["cohort"] == CLIENTS
    assert record["dropped"] == dropped and record["clients"] == CLIENTS - 2
    assert record["buckets"] == 2
    assert [p["phase"] for p in record["phases"]] == list(st.PHASES)
    phases = {p["phase"]: p for p in record["phases"]}
    assert {name: p["dropped"] for name, p in phases.items()} == {
        st.ADVERTISE_KEYS: [], st.SHARE_KEYS: [killed[st.SHARE_KEYS]],
        st.MASKED_INPUT: [killed[st.MASKED_INPUT]], st.UNMASK: [],
    }
    # the share-keys victim is not even asked for a masked input; both are left out of unmask
    assert [phases[name]["participants"] for name in st.PHASES] == [8, 8, 7, 6]
    assert [phases[name]["answered"] for name in st.PHASES] == [8, 7, 6, 6]
    assert all(p["bytes_up"] > 0 and p["bytes_down"] > 0 for p in record["phases"])
    assert 0.0 <= record["accuracy"] <= 1.0 and np.isfinite(record["loss"])
    ledger = [json.loads(line) for line in (run.result.run_dir / "ledger.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(e["contributors"], e["dropouts"]) for e in ledger] == [(survivors, dropped)]

    # --- correct sums: each bucket's unmasked sum is the weighted sum of exactly its survivors
    plan = {**running.server.plan(), "cohort_size": float(CLIENTS), "bucket_size": float(BUCKET_SIZE)}
    updates, weights = _recompute_updates(config, start, plan, sorted(run.clients))
    assert len(set(weights.values())) > 1, "the Dirichlet split should give unequal weights"
    assert len(run.buckets) == 2
    for index, bucket in enumerate(sorted(run.buckets, key=lambda b: bucket_of[b.members[0]])):
        members = sorted(c for c in survivors if bucket_of[c] == index)
        assert list(bucket.members) == members and len(members) == BUCKET_SIZE - 1
        assert bucket.weight == sum(weights[c] for c in members)  # the weights travelled masked: exact
        for name in updates[members[0]]:
            expected = sum(weights[c] * updates[c][name] for c in members)
            # stochastic rounding moves each coordinate by less than one step, times the weight
            got = np.asarray(bucket.total[name]).reshape(expected.shape)
            np.testing.assert_allclose(got, expected, rtol=0, atol=bucket.weight * STEP, err_msg=name)

    # --- the released adapter is the start plus the survivors' weighted mean update
    after = load_file(str(run.result.run_dir / "checkpoints" / "round-0001.safetensors"))
    mean = _weighted_mean(updates, weights, survivors)
    for name, delta in mean.items():
        np.testing.assert_allclose(after[name], start[name] + delta, rtol=0, atol=STEP + 1e-6, err_msg=name)
        np.testing.assert_array_equal(run.result.global_state[name], after[name])
    assert all(np.isfinite(value).all() for value in after.values())
    # the check has power: a sum that also counted a killed client would be far outside the tolerance
    for victim in dropped:
        wrong = _weighted_mean(updates, weights, sorted([*survivors, victim]))
        assert max(float(np.abs(wrong[k] - mean[k]).max()) for k in mean) > 10 * STEP
