"""Benchmarks stay runnable: each runs at a tiny size and prints JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_transport_benchmark_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "transport.py"), "--mb", "3", "--chunk-kib", "256"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["bench"] == "transport_push" and record["chunks"] == 12 and record["mb_per_s"] > 0


def test_quantize_benchmark_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quantize.py"), "--dim", "1000", "--clients", "4"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["dim"] == 1000 and record["ratio_to_float32"] <= 1.0


def test_secagg_benchmark_runs() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "secagg.py"), "--n", "8", "--d", "1000", "--k", "0",
         "--dropout", "0.125"],
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["bench"] == "secagg+" and record["N"] == 8 and record["d"] == 1000 and record["dropped"] == 1
    assert record["k"] == 7 and record["t"] == 4  # k = 0: the complete graph, t = floor(0.5 * 7) + 1
    assert set(record["server_phase_s"]) >= {"advertise-keys", "share-keys", "masked-input", "unmask"}
    assert record["client_s"]["max"] >= record["client_s"]["mean"] > 0 and record["plain_sum_s"] > 0
    assert record["upload_bytes"] <= record["float32_bytes"] == 4000
    assert record["max_abs_err_vs_mean"] < 1e-4
