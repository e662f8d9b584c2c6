"""Crash safety: SIGKILL the real ``secure-fl-server`` process mid-run, then ``--resume RUN_DIR``.

Each server process is started with ``SECURE_FL_CRASH_AT=POINT:ROUND`` (see
`secure_fl.server.faults`), which SIGKILLs it at that point, or killed from outside at whatever
instant a file appears. The client processes live through every crash: they retry while the
server is down and rejoin the resumed one (it no longer knows them). The checks: the run ends
with each round released exactly once, the ledger holds one line per round, its epsilon is what
an uninterrupted run of the same rounds spends, and a deterministic run (plain aggregation, no
noise) ends with the same adapter and reputations as one that was never killed.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from privacy.accounting import create_accountant
from privacy.ledger import event_of
from tests.test_cli_e2e import Proc, Procs, _describe, _free_port, _metrics, _run, procs  # noqa: F401 (fixture)

#: The clients outlive every server restart: they keep retrying this long.
CONNECT = ("--set", "transport.connect_timeout=90", "--set", "transport.poll_interval=0.2",
           "--set", "client.local_steps=2")
#: Bound on each server process (start, rejoin, its rounds) and on the whole federation.
STEP_TIMEOUT = 150.0


def _ledger(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text(encoding="utf-8").splitlines() if line]


def _ended(run_dir: Path) -> dict[int, dict]:
    """Round -> its last metrics record that is not an interrupted one."""
    return {r["round"]: r for r in _metrics(run_dir) if r.get("status") != "interrupted"}


class Federation:
    """One run: PKI, clients that outlive the server, and server processes started one after another."""

    def __init__(self, procs: Procs, out: Path, settings: Sequence[str], clients: int) -> None:
        self.procs, self.out, self.settings = procs, out, tuple(settings)
        self.pki = out.parent / f"{out.name}-pki"
        self.ids = [f"client-{i}" for i in range(clients)]
        made = _run("secure-fl", "provision", "--out", str(self.pki), "--parties", ",".join(self.ids))
        assert made.returncode == 0, _describe(made)
        self.address = f"127.0.0.1:{_free_port()}"
        self.servers: list[Proc] = []
        self.clients: list[Proc] = []
        self.killed: list[Proc] = []

    def server(self, crash_at: str | None, *, resume: bool) -> Proc:
        env = {"SECURE_FL_CRASH_AT": crash_at} if crash_at else {}
        where = ("--resume", str(self.out)) if resume else ("--preset", "smoke", *self.settings, "--out", str(self.out))
        proc = self.procs.start(f"server-{len(self.servers)}", "secure-fl-server", *where, "--address", self.address,
                                "--linger", "5", "--tls", str(self.pki / "server"), env=env)
        self.servers.append(proc)
        return proc

    def start_clients(self) -> None:
        for cid in self.ids:
            self.clients.append(self.procs.start(
                cid, "secure-fl-client", "--server", self.address, "--preset", "smoke", *self.settings, "--client-id", cid,
                "--tls", str(self.pki / "parties" / cid), "--server-name", "localhost"))

    def wait_killed(self, server: Proc) -> None:
        """The server died of SIGKILL (not of an error of its own) within the step's bound."""
        try:
            server.popen.wait(timeout=STEP_TIMEOUT)
        except Exception:
            pytest.fail("the server was not killed at its crash point:\n" + self.procs.describe())
        assert server.popen.returncode == -signal.SIGKILL, self.procs.describe()
        self.procs.procs.remove(server)  # a killed server is expected, not a failed process
        self.killed.append(server)

    def finish(self) -> None:
        self.procs.wait_all(STEP_TIMEOUT)
        self.procs.assert_all_ok()

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.killed) + "\n" + self.procs.describe()


def _kill_when(run: Federation, server: Proc, path: Path, lines: int) -> None:
    """SIGKILL ``server`` from outside as soon as ``path`` has ``lines`` lines: some instant of the next round."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline and server.popen.poll() is None:
        if path.exists() and len(path.read_text(encoding="utf-8").splitlines()) >= lines:
            server.popen.send_signal(signal.SIGKILL)
            server.popen.wait(timeout=30)
            run.procs.procs.remove(server)
            run.killed.append(server)
            return
        time.sleep(0.05)
    pytest.fail(f"{path} never reached {lines} line(s) while the server ran")


#: secagg+ with distributed DP (clients add the noise), 4 of 5 parties a round, 4 rounds.
SECURE = ("--set", "run.rounds=4", "--set", "run.num_clients=5", "--set", "run.clients_per_round=4", "--set", "secure.mode='secagg+'",
          "--set", "privacy.mode='distributed'", "--set", "privacy.params.noise_multiplier=1.0",
          "--set", "run.round_timeout=60", *CONNECT)


def test_secagg_run_survives_sigkill_at_every_point(tmp_path: Path, procs: Procs) -> None:
    run = Federation(procs, tmp_path / "run", SECURE, clients=5)
    crashes = ["before-aggregation:1", "after-ledger:2", "checkpoint-write:3", "before-ledger:3", "after-checkpoint:3"]
    first = run.server(crashes[0], resume=False)
    run.start_clients()
    run.wait_killed(first)
    for crash in crashes[1:]:
        run.wait_killed(run.server(crash, resume=True))
    run.server(None, resume=True)
    run.finish()

    ledger = _ledger(run.out)
    assert [line["round"] for line in ledger] == [1, 2, 3, 4], run.describe()
    ended = _ended(run.out)
    assert sorted(ended) == [1, 2, 3, 4] and all(r["status"] == "ok" for r in ended.values()), ended
    assert len([r for r in _metrics(run.out) if r.get("status") == "ok"]) == 4  # no round counted twice
    assert "recovered" in ended[3] and ended[3]["epsilon"] == ledger[2]["epsilon"]  # killed before its metrics line
    # epsilon: the four releases composed once each, as in a run that was never killed
    events = [event_of(line) for line in ledger]
    assert all(e == events[0] for e in events), events
    for name, spent in ledger[-1]["epsilon"].items():
        accountant = create_accountant(name)
        for event in events:
            accountant.compose(event)
        assert spent == pytest.approx(accountant.epsilon(ledger[-1]["delta"]), rel=1e-12), name
    report = json.loads((run.out / "report" / "privacy_report.json").read_text(encoding="utf-8"))
    assert report["run"]["rounds_completed"] == 4 and report["run"]["interrupted"] is False
    assert len(report["run"]["resumes"]) == 5
    info = json.loads((run.out / "run.json").read_text(encoding="utf-8"))
    actions = [a for resume in info["resumes"] for a in resume["actions"]]
    assert [r["next_round"] for r in info["resumes"]] == [1, 3, 3, 3, 4], info["resumes"]
    assert any("promoted the pending checkpoint of round 2" in a for a in actions), actions
    assert any("deleted round-0003.tmp" in a for a in actions), actions
    assert any("deleted the pending checkpoint of round 3" in a for a in actions), actions
    assert any("wrote the metrics line of round 3" in a for a in actions), actions
    assert info["interrupted"] is False and info["transport_security"] == "mtls"
    assert not list((run.out / "checkpoints").glob("*.pending")) and not list((run.out / "checkpoints").glob("*.tmp"))
    for client in run.clients:  # every party rejoined each resumed server and saw the run to its end
        assert "joining again" in client.stderr, run.describe()


#: Deterministic (plain sums, no noise, every party every round): a resumed run must equal an unbroken one.
PLAIN = ("--set", "run.rounds=3", "--set", "robustness.reputation=true", "--set", "robustness.reputation_warmup=0",
         *CONNECT)


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(sorted((run_dir / "checkpoints").glob("round-*.safetensors"))[-1]))


def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, procs: Procs) -> None:
    reference = Federation(procs, tmp_path / "reference", PLAIN, clients=4)
    reference.server(None, resume=False)
    reference.start_clients()
    reference.finish()

    run = Federation(Procs(tmp_path / "logs-killed"), tmp_path / "run", PLAIN, clients=4)
    try:
        first = run.server(None, resume=False)
        run.start_clients()
        _kill_when(run, first, run.out / "metrics.jsonl", 1)  # kill -9 from outside, somewhere in round 2
        run.wait_killed(run.server("after-ledger:2", resume=True))
        run.server(None, resume=True)
        run.finish()
    finally:
        run.procs.kill_all()

    assert [line["round"] for line in _ledger(run.out)] == [1, 2, 3]
    ended, expected = _ended(run.out), _ended(reference.out)
    assert sorted(ended) == [1, 2, 3] and all(r["status"] == "ok" for r in ended.values()), ended
    for number in (1, 2, 3):
        assert ended[number]["accuracy"] == expected[number]["accuracy"], (number, ended[number], expected[number])
    final, wanted = _final(run.out), _final(reference.out)
    assert sorted(final) == sorted(wanted)
    for name in wanted:  # global adapter and plug-in state, bit for bit
        assert np.array_equal(final[name], wanted[name]), name
    reputation = json.loads((run.out / "reputation.json").read_text(encoding="utf-8"))
    unbroken = json.loads((reference.out / "reputation.json").read_text(encoding="utf-8"))
    assert reputation["round"] == 3 and {k: v for k, v in reputation.items() if k != "run_id"} == {
        k: v for k, v in unbroken.items() if k != "run_id"}
    done = _run("secure-fl-server", "--resume", str(reference.out), "--address", "127.0.0.1:0", "--insecure")
    assert done.returncode != 0 and "is complete: all 3 rounds ended" in done.stderr, _describe(done)


def test_resume_refusals_are_one_clear_line(tmp_path: Path) -> None:
    empty = _run("secure-fl-server", "--resume", str(tmp_path / "nothing"), "--address", "127.0.0.1:0", "--insecure")
    assert empty.returncode != 0 and "holds no run to resume" in empty.stderr, _describe(empty)
    mixed = _run("secure-fl-server", "--resume", str(tmp_path), "--preset", "smoke", "--address", "127.0.0.1:0",
                 "--insecure")
    assert mixed.returncode == 2 and "drop --preset" in mixed.stderr, _describe(mixed)
    neither = _run("secure-fl-server", "--address", "127.0.0.1:0", "--insecure")
    assert neither.returncode == 2 and "--resume RUN_DIR" in neither.stderr, _describe(neither)


# ------------------------------------------------------------------ in-process pieces of a resume
def test_a_rejoin_closes_the_round_session_so_its_secrets_are_never_reused(tmp_path: Path) -> None:
    from tests.conftest import smoke_config
    from tests.harness import in_process_parties

    _, clients = in_process_parties(smoke_config("secure.mode='secagg+'"), tmp_path / "run", {})
    client = clients[0]
    before = client._session(1)  # the session of round 1, holding its key pairs and mask seeds
    client.leave("test")  # free the id, as a restarted server has forgotten it
    client.join()  # what a client does when a restarted server no longer knows it
    assert client._round_session is None
    assert client._session(1) is not before  # round 1 run again gets a new session: new keys


def test_each_resume_draws_cohorts_from_a_new_stream(tmp_path: Path) -> None:
    import secure_fl
    from secure_fl.server.engine import FederatedServer
    from secure_fl.server.resume import recover
    from tests.conftest import smoke_config

    config = smoke_config("run.rounds=3")
    secure_fl.simulate(config, tmp_path, progress=False, callbacks=[lambda record: record["round"] == 1])
    saved = recover(tmp_path)
    assert saved.next_round == 2 and saved.checkpoint is not None
    original = saved.checkpoint.rng().random(8)  # what the unbroken run would draw next
    draws = []
    for _ in range(2):
        plan = recover(tmp_path)
        server = FederatedServer(plan.config, tmp_path, transport="in-process", resume=plan)
        draws.append(server.rng.random(8))
    assert not np.array_equal(draws[0], original) and not np.array_equal(draws[1], original)
    assert not np.array_equal(draws[0], draws[1])  # the second resume does not repeat the first one's cohorts
    info = json.loads((tmp_path / "run.json").read_text(encoding="utf-8"))
    assert [r["next_round"] for r in info["resumes"]] == [2, 2]
    with pytest.raises(Exception, match="differs from it"):
        FederatedServer(smoke_config("run.rounds=4"), tmp_path, transport="in-process", resume=recover(tmp_path))
