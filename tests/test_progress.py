"""The console progress display: readable sizes, no bar in piped logs, any round status."""

from __future__ import annotations

import io
from typing import Any

import pytest

from tqdm import std

from secure_fl import progress
from secure_fl.progress import ProgressObserver, format_record, format_size


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _record(**changes: Any) -> dict[str, Any]:
    record = {"round": 1, "status": "ok", "clients": 4, "cohort": 4, "accuracy": 0.5, "loss": None,
              "train_loss": None, "bytes_up": 22928, "bytes_down": 23424, "seconds": 0.28, "dropped": []}
    return {**record, **changes}


def test_sizes_below_one_megabyte_are_shown_in_kilobytes() -> None:
    line = format_record(_record(), 2)
    assert "up 22.9 kB" in line and "down 23.4 kB" in line and "0.00 MB" not in line
    assert "up 3.50 MB" in format_record(_record(bytes_up=3_500_000), 2)
    assert (format_size(512), format_size(999_999), format_size(1_000_000)) == ("512 B", "1000.0 kB", "1.00 MB")


def test_interrupted_and_sparse_records_format() -> None:
    line = format_record({"round": 3, "status": "interrupted", "reason": "Ctrl-C"}, 5)
    assert line == "round 3/5 | INTERRUPTED: Ctrl-C"
    assert "FAILED: too few" in format_record(_record(status="failed", reason="too few"), 5)


def test_no_bar_when_stderr_is_piped(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(progress, "tqdm", std.tqdm)  # a console, not a notebook
    piped = io.StringIO()
    monkeypatch.setattr("sys.stderr", piped)
    observer = ProgressObserver(2)
    observer.on_round_start(1, ["a", "b"])
    observer.on_update("a", 1)
    observer.on_round_end(_record())
    assert piped.getvalue() == ""  # no bar, no carriage returns in the log
    assert "round 1/2 | clients 4/4" in capsys.readouterr().out  # the metrics line still comes


def test_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "tqdm", std.tqdm)
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    observer = ProgressObserver(2)
    observer.on_round_start(1, ["a", "b"])
    assert observer._bar is not None
    observer.on_update("a", 1)
    observer.on_round_end(_record())
    assert "round 1/2" in terminal.getvalue()


def test_piped_simulate_prints_no_bar(tmp_path) -> None:
    """End to end, with the tqdm class the CLI really gets (tqdm.auto is not tqdm.std outside notebooks)."""
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [str(bin_dir / "secure-fl"), "simulate", "--preset", "smoke", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "client/s" not in done.stderr and "\r" not in done.stderr, done.stderr[-500:]
    assert "round 2/2 | clients 4/4" in done.stdout
