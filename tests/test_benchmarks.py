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
