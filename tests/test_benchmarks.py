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


def test_he_benchmark_runs() -> None:
    # d = 4095: with the weight, one full 4096-slot BFV ciphertext (a half-empty one doubles bytes per value)
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "he.py"), "--n", "3", "--d", "4095", "--scheme", "all", "--seed", "1"],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    records = {r["scheme"]: r for r in lines if "scheme" in r}
    assert sorted(records) == ["flare", "ours-bfv", "ours-ckks"]
    for r in records.values():
        assert r["n"] == 3 and r["d"] == 4095 and r["upload_bytes"] > 0
        assert r["bytes_per_param"] == round(r["upload_bytes"] / 4095, 3)
        assert r["encrypt_s"] > 0 and r["aggregate_s"] > 0 and r["decrypt_s"] > 0
        assert r["max_abs_err_rel_clip"] < 1e-4 and r["max_abs_err_rel_clip"] == r["max_abs_err"] / 8.0
    bfv = records["ours-bfv"]
    assert bfv["bytes_per_param"] <= 16
    assert {"per_slot", "field_bits", "plain_modulus_bits"} <= set(bfv["plan"])
    ratios = lines[-1]["ratios"]
    assert set(ratios) == {"ours-bfv", "ours-ckks"}
    assert ratios["ours-bfv"]["bytes_per_param"] == round(bfv["bytes_per_param"] / records["flare"]["bytes_per_param"], 4)


def test_load_benchmark_runs(tmp_path: Path) -> None:
    record = tmp_path / "load.jsonl"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--parties", "4", "--rounds", "1", "--client-procs", "2",
         "--round-timeout", "60", "--timeout", "240", "--record", str(record)],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(record.read_text(encoding="utf-8")) == result
    assert result["benchmark"] == "load" and result["transport_security"] == "mtls" and result["secure_mode"] == "secagg+"
    assert result["rounds_ok"] == 1 and result["clients_per_round"] == [4] and result["parties_trained_all_rounds"] == 4
    assert result["server_exit"] == 0 and result["parties_failed"] == 0
    assert result["server_peak_rss_mb"] > 0 and len(result["server_rss_mb_after_round"]) == 1
    assert result["health_ms"]["checks"] > 0 and result["health_ms"]["failures"] == {}
    assert result["bytes_up_per_party_round"] > 0 and result["bytes_down_per_party_round"] > 0
