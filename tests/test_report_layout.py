"""The HTML privacy report is readable: fits a 1280 px window, legible charts, version, threat model.

The browser check renders real pages in headless Chromium through ``scripts/screenshot_report.py``
and is skipped where ``/usr/bin/chromium`` is not installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from privacy.audit import build_report
from privacy.audit.html import render_html
from privacy.audit.plots import PLOT_FONT, clients_figure
from tests.test_audit_html import assert_self_contained, sample_report

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = ROOT / "scripts" / "screenshot_report.py"


def _stress_report() -> dict[str, Any]:
    """A report with long unbreakable values in every table (client ids, plug-ins, parameters)."""
    report = sample_report(clients=["client-0", "client-with-a-long-id-" + "x" * 120])
    report["stages"]["attack"]["plugin"] = "user_pkg." + "z" * 100 + ".MyAttack"
    report["stages"]["attack"]["params"] = {"path": "/data/" + "y" * 250, "ids": list(range(80))}
    report["run"]["run_dir"] = "/tmp/" + "d" * 250
    report["warnings"].append({"code": "long", "severity": "info", "message": "q" * 300})
    return report


def test_participation_chart_text_is_as_large_as_the_page_text() -> None:
    clients = sample_report()["clients"]
    fig = clients_figure(clients)
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend is not None
    texts = [*ax.get_yticklabels(), *ax.get_xticklabels(), ax.xaxis.label, *legend.get_texts()]
    assert texts and min(float(t.get_fontsize()) for t in texts) >= PLOT_FONT >= 10


def test_stage_parameters_wrap_one_per_line_and_headers_are_short() -> None:
    report = sample_report()
    report["stages"]["secure"]["params"] = {"bucket_size": 1, "key_custody": None, "mode": "plain",
                                            "server_sees_individual_updates": True}
    page = render_html(report)
    stages = page.split(">Pipeline stages<", 1)[1].split("</section>", 1)[0]
    assert "<div><code>server_sees_individual_updates = true</code></div>" in stages
    assert "<div><code>key_custody = null</code></div>" in stages
    headers = re.findall(r"<th>([^<]*)</th>", stages)
    assert headers == ["stage", "name", "plug-in class", "origin", "params"]
    assert "th { white-space: nowrap; }" in page  # headers stay on one line; long cells wrap instead
    assert_self_contained(page)


def test_report_names_the_secure_fl_version() -> None:
    report = build_report(run={"run_id": "r"}, config={}, metrics=[], ledger=[])
    assert report["generator"] == {"name": "secure-fl", "version": metadata.version("secure-fl")}
    assert f"secure-fl {metadata.version('secure-fl')}" in render_html(report)
    pinned = build_report(run={}, config={}, metrics=[], ledger=[], version="9.9.9")
    assert pinned["generator"]["version"] == "9.9.9" and "secure-fl 9.9.9" in render_html(pinned)


def test_threat_model_says_what_the_server_sees_in_the_clear() -> None:
    plain = {"secure": {"name": "plain", "params": {"server_sees_individual_updates": True, "bucket_size": 1}}}
    report = build_report(run={"stages": plain}, config={}, metrics=[], ledger=[])
    sees = " ".join(row["sees"] for row in report["threat_model"] if row["party"] == "server")
    assert "example count" in sees and "training loss" in sees and "local evaluation metrics" in sees
    assert "in the clear" in sees
    assert "example count (its aggregation weight" in render_html(report)
    # a mode that hides updates: clients send no metrics or weight in the clear, and the report says so
    masked = {"secure": {"name": "masked", "params": {"server_sees_individual_updates": False, "bucket_size": 4}}}
    report = build_report(run={"stages": masked}, config={}, metrics=[], ledger=[])
    sees = " ".join(row["sees"] for row in report["threat_model"] if row["party"] == "server")
    assert "no loss, no evaluation metrics and no weight in the clear" in sees
    assert "example count (its aggregation weight" not in render_html(report)


def test_privacy_module_does_not_import_secure_fl() -> None:
    code = "import sys, privacy.audit.html, privacy.audit.report; print(any(m.startswith('secure_fl') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)")
def test_report_fits_a_1280px_window_in_a_real_browser(tmp_path: Path) -> None:
    from secure_fl.simulation import simulate
    from tests.conftest import smoke_config

    result = simulate(smoke_config(), tmp_path / "run", progress=False)
    assert result.report_html is not None
    stress = tmp_path / "stress.html"
    stress.write_text(render_html(_stress_report()), encoding="utf-8")
    for name, page in (("real", result.report_html), ("stress", stress)):
        shots = tmp_path / f"shots-{name}"
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--html", str(page), "--out", str(shots), "--browser", str(CHROMIUM),
             "--height", "4000"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
        assert (shots / "report-1280.png").is_file() and (shots / "report-2200.png").is_file()
