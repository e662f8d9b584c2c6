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


def test_robust_benchmark_runs_and_reads_flowers_json(tmp_path: Path) -> None:
    flower = tmp_path / "flower.jsonl"
    flower.write_text(
        "\n".join(json.dumps({"seconds": {"legacy_aggregate_krum": k, "msgapi_Krum.aggregate_train": m,
                                          "legacy_aggregate_median": 1.0}}) for k, m in ((2.0, 3.0), (4.0, 1.5)))
        + "\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "robust.py"), "-n", "11", "-d", "2000", "-f", "2", "--repeat", "1",
         "--flower-json", str(flower)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    records = {r["rule"]: r for r in map(json.loads, done.stdout.strip().splitlines())}
    assert set(records) == {"krum", "multi-krum", "median", "trimmed-mean", "bulyan", "norm-bound", "centered-clip"}
    assert all(r["N"] == 11 and r["d"] == 2000 and r["seconds"] >= r["best_s"] > 0 for r in records.values())
    assert records["krum"]["flower_s"] == 1.5  # the fastest Flower layer over all its runs
    assert records["krum"]["ratio"] > 0
    assert "ratio" not in records["bulyan"] and records["median"]["flower_s"] == 1.0
