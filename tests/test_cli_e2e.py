"""End-to-end tests of the console scripts, run as real subprocesses.

``secure-fl simulate`` writes a complete run directory whose adapter reloads with plain
transformers/peft and reproduces the server's accuracy; ``secure-fl-server`` and
``secure-fl-client`` processes federate over loopback gRPC (with partition ids and with a local
``--data`` file); bad input ends with one clear line and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent
SIMULATE_TIMEOUT = 240
FEDERATION_TIMEOUT = 180
QUICK_TIMEOUT = 60
SMOKE_KEYS = ("round", "clients", "accuracy", "loss", "bytes_up", "bytes_down", "seconds")
TWO_CLIENTS = ("--set", "run.num_clients=2", "--set", "run.clients_per_round=2")


def _script(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"console script {name} is not installed next to {sys.executable}"
    return str(path)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def _run(name: str, *args: str, timeout: float = QUICK_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a console script to completion (killed on timeout by subprocess.run)."""
    return subprocess.run(
        [_script(name), *args], capture_output=True, text=True, timeout=timeout, env=_env(), stdin=subprocess.DEVNULL
    )


def _describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr[-6000:]}"


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    assert path.exists(), f"{path} missing"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------- process groups
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path

    @property
    def stdout(self) -> str:
        return self.out.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(encoding="utf-8", errors="replace")

    def describe(self) -> str:
        return (
            f"=== {self.name}: exit {self.popen.returncode}\n--- stdout ---\n{self.stdout}\n"
            f"--- stderr (tail) ---\n{self.stderr[-6000:]}"
        )


class Procs:
    """Background processes writing to files (no pipes: nothing can block on a full buffer)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []

    def start(self, name: str, script: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        out, err = self.log_dir / f"{name}.out", self.log_dir / f"{name}.err"
        with out.open("wb") as out_handle, err.open("wb") as err_handle:
            popen = subprocess.Popen(
                [_script(script), *args], stdout=out_handle, stderr=err_handle, stdin=subprocess.DEVNULL,
                env={**_env(), **(env or {})},
            )
        proc = Proc(name, popen, out, err)
        self.procs.append(proc)
        return proc

    def wait_all(self, timeout: float) -> None:
        """Wait until every process exited; fail (with all logs) if any is still running at the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p.popen.poll() is not None for p in self.procs):
                return
            # A process that already failed makes the others wait for nothing: stop early.
            if any(p.popen.returncode not in (None, 0) for p in self.procs):
                break
            time.sleep(0.25)
        if any(p.popen.returncode not in (None, 0) for p in self.procs):
            self.kill_all()
            pytest.fail("a process failed:\n" + self.describe())
        running = [p.name for p in self.procs if p.popen.poll() is None]
        if running:
            self.kill_all()
            pytest.fail(f"still running after {timeout:.0f} s: {running}\n" + self.describe())

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
        for proc in self.procs:
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def describe(self) -> str:
        return "\n".join(p.describe() for p in self.procs)

    def assert_all_ok(self) -> None:
        bad = [p.name for p in self.procs if p.popen.returncode != 0]
        assert not bad, f"non-zero exit: {bad}\n" + self.describe()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    group = Procs(tmp_path / "logs")
    try:
        yield group
    finally:
        group.kill_all()


# --------------------------------------------------------------------------------- simulate
def _predict_accuracy(run_dir: Path) -> tuple[float, tuple[str, ...], tuple[str, ...]]:
    """Reload ``run_dir/adapter`` with plain transformers + peft and score the held-out split."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from secure_fl.config import Config
    from secure_fl.data.sources import load_splits

    adapter = run_dir / "adapter"
    info = json.loads((adapter / "secure_fl.json").read_text(encoding="utf-8"))
    base_path = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    assert base_path == "../base_model", base_path  # portable: relative to the adapter directory
    assert (adapter / base_path).resolve() == (run_dir / "base_model").resolve()
    base = AutoModelForSequenceClassification.from_pretrained(str(adapter / base_path), num_labels=4)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))

    test = load_splits(Config.from_toml(run_dir / "config.toml"))[1]
    assert len(test) > 0
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(test), 32):
            texts = list(test.texts[start : start + 32])
            batch = tokenizer(texts, truncation=True, max_length=info["max_length"], padding=True, return_tensors="pt")
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            predicted = logits.argmax(-1).numpy()
            correct += int((predicted == test.labels[start : start + 32]).sum())
    return correct / len(test), tuple(info["label_names"]), test.label_names


@dataclass
class SimulatedRun:
    out: Path
    proc: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SimulatedRun:
    """One ``secure-fl simulate --preset smoke`` run shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("simulate") / "run"
    proc = _run("secure-fl", "simulate", "--preset", "smoke", "--out", str(out), timeout=SIMULATE_TIMEOUT)
    assert proc.returncode == 0, _describe(proc)
    return SimulatedRun(out, proc)


def test_simulate_writes_the_run_directory(smoke_run: SimulatedRun) -> None:
    out, proc = smoke_run.out, smoke_run.proc
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert [line.split(" |")[0] for line in lines if line.startswith("round ")] == ["round 1/2", "round 2/2"], _describe(proc)
    assert lines[-2].startswith("done in"), _describe(proc)
    assert lines[-1].startswith("privacy: epsilon at delta=1e-05: rdp inf, prv inf (no differential privacy)"), _describe(proc)
    assert lines[-1].endswith(str(out / "report" / "privacy_report.html")), _describe(proc)

    with (out / "config.toml").open("rb") as handle:
        assert tomllib.load(handle)["model"]["name"] == "tiny-bert"
    records = _metrics(out)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        missing = [k for k in SMOKE_KEYS if k not in record]
        assert not missing, f"metrics line lacks {missing}: {record}"
        assert isinstance(record["accuracy"], float) and 0.0 <= record["accuracy"] <= 1.0, record
        assert record["clients"] == 4, record
        assert record["bytes_up"] > 0 and record["bytes_down"] > 0, record
        assert math.isfinite(record["loss"]) and record["seconds"] >= 0, record
    for n in (1, 2):
        assert (out / "checkpoints" / f"round-{n:04d}.safetensors").is_file()
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "secure_fl.json").is_file()
    assert (out / "base_model" / "config.json").is_file()
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert [e["round"] for e in ledger] == [1, 2]
    assert all(e["mechanism"] == "none" and e["epsilon"] == {"rdp": None, "prv": None} for e in ledger)
    assert (out / "report" / "privacy_report.json").is_file() and (out / "report" / "privacy_report.html").is_file()


def test_adapter_reloads_with_plain_peft_and_matches_server_accuracy(smoke_run: SimulatedRun) -> None:
    """Reload the way a user would, with plain peft/transformers: the server scored this adapter."""
    accuracy, saved_labels, test_labels = _predict_accuracy(smoke_run.out)
    assert saved_labels == test_labels
    assert accuracy == pytest.approx(_metrics(smoke_run.out)[-1]["accuracy"], abs=1e-6)


def test_load_adapter_returns_the_test_label_names(smoke_run: SimulatedRun) -> None:
    from secure_fl.config import Config
    from secure_fl.data.sources import load_splits
    from secure_fl.models import load_adapter

    test = load_splits(Config.from_toml(smoke_run.out / "config.toml"))[1]
    model, tokenizer, labels = load_adapter(smoke_run.out / "adapter")
    assert labels == test.label_names
    assert not model.training and tokenizer is not None


def test_simulate_overrides_reach_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run1"
    proc = _run(
        "secure-fl", "simulate", "--preset", "smoke", "--set", "run.rounds=1", "--set", "client.local_steps=2",
        "--out", str(out), timeout=SIMULATE_TIMEOUT,
    )  # fmt: skip
    assert proc.returncode == 0, _describe(proc)
    records = _metrics(out)
    assert len(records) == 1 and records[0]["round"] == 1, records
    assert [line for line in proc.stdout.splitlines() if line.startswith("round ")][0].startswith("round 1/1")
    with (out / "config.toml").open("rb") as handle:
        resolved = tomllib.load(handle)
    assert resolved["run"]["rounds"] == 1 and resolved["client"]["local_steps"] == 2


# ------------------------------------------------------------------------ server + clients
def _federate(procs: Procs, out: Path, clients: Sequence[tuple[str, Sequence[str]]], common: Sequence[str]) -> list[Proc]:
    """Server and clients over mutual TLS, with bundles from ``secure-fl provision`` (the binaries' default)."""
    pki = out.parent / f"{out.name}-pki"
    made = _run("secure-fl", "provision", "--out", str(pki), "--parties", ",".join(cid for cid, _ in clients))
    assert made.returncode == 0, _describe(made)
    address = f"127.0.0.1:{_free_port()}"
    procs.start(
        "server", "secure-fl-server", "--preset", "smoke", *common, "--address", address, "--out", str(out), "--linger", "5",
        "--tls", str(pki / "server"),
    )
    started = [
        procs.start(cid, "secure-fl-client", "--server", address, "--preset", "smoke", *common, "--client-id", cid,
                    "--tls", str(pki / "parties" / cid), "--server-name", "localhost", *extra)
        for cid, extra in clients
    ]
    procs.wait_all(FEDERATION_TIMEOUT)
    procs.assert_all_ok()
    return started


def test_server_and_two_clients_over_grpc(tmp_path: Path, procs: Procs) -> None:
    out = tmp_path / "server-run"
    clients = _federate(procs, out, [("client-0", ()), ("client-1", ())], TWO_CLIENTS)
    records = _metrics(out)
    assert [r["round"] for r in records] == [1, 2], procs.describe()
    assert all(r["clients"] == 2 and r["status"] == "ok" for r in records), records
    for client in clients:
        assert "trained rounds [1, 2]" in client.stdout, procs.describe()
    assert (out / "adapter" / "adapter_config.json").is_file()
    # mutual TLS (the binaries' default): recorded, and the report raises no plaintext warning
    report = json.loads((out / "report" / "privacy_report.json").read_text(encoding="utf-8"))
    assert report["run"]["transport"] == "grpc"
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["transport_security"] == "mtls"
    assert not {"no-tls", "no-client-auth"} & {w["code"] for w in report["warnings"]}
    observer = next(row for row in report["threat_model"] if row["party"] == "network observer")
    assert observer["protected_by"].startswith("TLS with party certificates"), observer


#: Every PEFT rule with the binaries: (server and client settings, each client's extra flags).
RULES_OVER_GRPC = {
    "ffa-lora": (("--set", "peft.rule='ffa-lora'"), ((), ())),
    "fed-sb": (("--set", "peft.rule='fed-sb'"), ((), ())),
    "lora-fair": (("--set", "peft.rule='lora-fair'"), ((), ())),
    # stacked capacity 8 = ranks 2 + 6; alpha / r = 2 on every party (the clients' --lora-rank keeps it)
    "flora": (("--set", "peft.rule='flora'", "--set", "peft.r=8", "--set", "peft.alpha=16.0"),
              (("--lora-rank", "2"), ("--lora-rank", "6"))),
    "fedit-max-rank": (("--set", "peft.rule_params.max_rank=4"), (("--lora-rank", "2"), ())),
}


@pytest.mark.parametrize("rule", sorted(RULES_OVER_GRPC))
def test_every_peft_rule_federates_with_the_binaries(rule: str, tmp_path: Path, procs: Procs) -> None:
    settings, extras = RULES_OVER_GRPC[rule]
    out = tmp_path / "server-run"
    clients = _federate(procs, out, [(f"client-{i}", extra) for i, extra in enumerate(extras)], (*TWO_CLIENTS, *settings))
    records = _metrics(out)
    assert [(r["round"], r["clients"], r["status"]) for r in records] == [(1, 2, "ok"), (2, 2, "ok")], procs.describe()
    assert all(math.isfinite(r["accuracy"]) for r in records), records
    for client in clients:
        assert "trained rounds [1, 2]" in client.stdout, procs.describe()
    accuracy, _, _ = _predict_accuracy(out)  # the saved adapter reloads with plain peft and predicts as evaluated
    assert accuracy == records[-1]["accuracy"], procs.describe()
    if rule == "flora":  # the released stack holds both clients' ranks: 2 + 6 of its 8 columns
        from safetensors.numpy import load_file

        stack = load_file(str(sorted((out / "checkpoints").glob("round-*.safetensors"))[-1]))
        b = stack[next(k for k in sorted(stack) if "lora_B" in k)]
        assert int((np.abs(b).sum(axis=0) > 0).sum()) == 8


def test_client_with_local_data_file(tmp_path: Path, procs: Procs) -> None:
    from secure_fl.data import make_synthetic

    local = make_synthetic(40, num_labels=4, seed=7)
    names = list(local.label_names)
    data_file = tmp_path / "hospital-a.jsonl"
    data_file.write_text(
        "".join(
            json.dumps({"text": text, "label": names[int(label)]}) + "\n" for text, label in zip(local.texts, local.labels)
        ),
        encoding="utf-8",
    )
    label_override = "data.label_names=" + json.dumps(names)  # a TOML array of strings
    common = (*TWO_CLIENTS, "--set", "run.rounds=1", "--set", label_override)
    out = tmp_path / "file-run"
    clients = _federate(procs, out, [("client-0", ()), ("hospital-a", ("--data", str(data_file)))], common)
    records = _metrics(out)
    assert len(records) == 1 and records[0]["clients"] == 2 and records[0]["status"] == "ok", records
    hospital = clients[1]
    assert "hospital-a: 40 local examples" in hospital.stdout, procs.describe()
    assert "trained rounds [1]" in hospital.stdout, procs.describe()
    with (out / "adapter" / "secure_fl.json").open(encoding="utf-8") as handle:
        assert json.load(handle)["label_names"] == names


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("secure-fl", ["simulate", "--preset", "smoke", "--set", "peft.rank=4"], ["peft.rank", "did you mean 'r'"]),
        ("secure-fl", ["simulate", "--config", "/nonexistent.toml"], ["/nonexistent.toml"]),
        ("secure-fl", ["simulate", "--preset", "nope"], ["available", "smoke", "bbc-news"]),
        ("secure-fl-client", ["--insecure", "--server", "127.0.0.1:1", "--preset", "smoke", "--client-id", "alice"],
         ["--data", "alice"]),
        ("secure-fl-server", ["--preset", "smoke", "--address", "127.0.0.1:0", "--out", "/tmp/never"], ["--tls", "--insecure"]),
        ("secure-fl-client", ["--server", "127.0.0.1:1", "--preset", "smoke", "--client-id", "c-0"], ["--tls", "--insecure"]),
        ("secure-fl", ["simulate", "--preset", "smoke", "--set", "secure.mode=magic"], ["secure.mode", "plain"]),
    ],
    ids=["unknown-key-alias", "missing-config", "unknown-preset", "client-id-without-index", "server-without-tls",
         "client-without-tls", "bad-secure-mode"],
)
def test_bad_input_is_one_clear_line(script: str, args: list[str], expected: list[str]) -> None:
    proc = _run(script, *args)
    assert proc.returncode == 2, _describe(proc)
    assert "Traceback" not in proc.stderr, _describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, _describe(proc)
    for fragment in expected:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"


# ------------------------------------------------------------------------- presets, config
def test_presets_and_config_commands() -> None:
    proc = _run("secure-fl", "presets")
    assert proc.returncode == 0, _describe(proc)
    assert {"bbc-news", "smoke"} <= set(proc.stdout.split()), _describe(proc)

    proc = _run("secure-fl", "config", "--preset", "smoke")
    assert proc.returncode == 0, _describe(proc)
    config = tomllib.loads(proc.stdout)
    assert config["model"]["name"] == "tiny-bert" and config["run"]["rounds"] == 2
