"""The HTML privacy audit page is self-contained, shows the key numbers and escapes every report string."""

from __future__ import annotations

import base64
import copy
import re
from typing import Any

from privacy.audit.html import render_html

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
UNBOUNDED = "No differential-privacy guarantee: epsilon is unbounded in every round."


def sample_report(*, dp: bool = True, clients: list[str] | None = None) -> dict[str, Any]:
    """A full report dict in the ``secure-fl/privacy-report/v1`` schema (finite epsilons if ``dp``)."""
    ids = clients if clients is not None else ["client-0", "client-1", "client-2"]
    rounds = 3

    def eps(r: int) -> dict[str, float | None]:
        return {"rdp": 0.7 * r + 0.0014, "prv": 0.6 * r + 0.0123} if dp else {"rdp": None, "prv": None}

    return {
        "schema": "secure-fl/privacy-report/v1",
        "generated_at": "2026-11-24T04:00:00Z",
        "run": {
            "run_id": "run-42", "run_dir": "/tmp/runs/run-42", "rounds_planned": 3, "rounds_completed": 3,
            "rounds_failed": 0, "clients": ids, "final_accuracy": 0.8125,
        },
        "stages": {
            "secure": {"name": "plain", "plugin": "protocols.secagg.plain.PlainAggregation", "builtin": True,
                       "params": {}},
            "defense": {"name": "norm-clip", "plugin": "robustness.defenses.NormClip", "builtin": True,
                        "params": {"max_norm": 5.0}},
            "rule": {"name": "fedavg", "plugin": "robustness.rules.FedAvg", "builtin": True, "params": {}},
            "privacy": {"name": "central" if dp else "none", "plugin": "privacy.mechanisms.central.Central",
                        "builtin": True, "params": {"noise_multiplier": 1.1}},
            "attack": {"name": "my-attack", "plugin": "user_pkg.attacks.MyAttack", "builtin": False,
                       "params": {"scale": [1, 2]}},
        },
        "threat_model": [
            {"party": "server", "sees": "each client's individual update", "protected_by": "nothing: secure.mode = plain"},
            {"party": "anyone with the final model", "sees": "the released adapter", "protected_by": "central DP"},
        ],
        "mechanism": {
            "mode": "central" if dp else "none",
            "guarantee": "client-level (epsilon, delta)-DP" if dp else "none",
            "noise_multiplier": 1.1 if dp else None, "clip_norm": 1.0 if dp else None,
            "sample_rate": 1.0 if dp else None, "delta": 1e-5, "accountants": ["rdp", "prv"],
        },
        "epsilon": {
            "final": eps(rounds),
            "by_round": [{"round": r, "epsilon": eps(r)} for r in range(1, rounds + 1)],
        },
        "clients": [
            {"client_id": cid, "rounds_selected": 3, "rounds_contributed": 3 - (i % 2) - (i == 2),
             "rounds_dropped": i % 2, "rounds_excluded": int(i == 2), "epsilon": eps(rounds)}
            for i, cid in enumerate(ids)
        ],
        "exclusions": [{"round": 2, "client_id": ids[-1], "defense": "norm-clip"}] if ids else [],
        "accuracy": [{"round": 1, "accuracy": None}, {"round": 2, "accuracy": 0.75}, {"round": 3, "accuracy": 0.8125}],
        "warnings": [
            {"code": "secagg-plain", "severity": "high", "message": "The server sees every individual update."},
            {"code": "small-cohort", "severity": "medium", "message": "Only 3 clients per round."},
            {"code": "note", "severity": "info", "message": "Accountants agree within 10%."},
        ],
    }


def images(page: str) -> list[bytes]:
    """The decoded bytes of every embedded PNG data URI in ``page``."""
    return [base64.b64decode(data, validate=True) for data in IMG_RE.findall(page)]


def assert_self_contained(page: str) -> None:
    """A page that starts right, loads nothing from outside and runs no script."""
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") == len(images(page))


def test_page_with_finite_epsilon_has_plots_and_numbers() -> None:
    page = render_html(sample_report())
    assert_self_contained(page)
    pngs = images(page)
    assert len(pngs) >= 3  # epsilon, clients, accuracy
    assert all(png.startswith(PNG_SIGNATURE) for png in pngs)
    assert all(re.search(r'<img src="data:image/png;base64,[^"]+" alt="[^"]+">', m.group(0))
               for m in re.finditer(r"<img [^>]*>", page))
    # final epsilon per accountant, 4 decimals, in the summary and the tables
    assert "rdp 2.1014" in page and "prv 1.8123" in page
    assert "δ = 1e-05" in page
    assert "3/3" in page and "0.8125" in page
    assert UNBOUNDED not in page
    # sections in the documented order
    order = ["Privacy audit report", "Warnings", "Threat model", "Mechanism and parameters", "Pipeline stages",
             "Epsilon over rounds", "Clients", "Exclusions", "Accuracy over rounds"]
    positions = [page.index(f">{title}<") for title in order]
    assert positions == sorted(positions)
    # warnings: severity visible, high ones in the red box
    assert 'class="high-box"' in page and "sev-high" in page and "sev-medium" in page and "sev-info" in page
    high_box = page.split('class="high-box"', 1)[1].split("</div>", 1)[0]
    assert "secagg-plain" in high_box and "small-cohort" not in high_box
    # stages: plug-in classes, built-in vs user, one "key = compact JSON" per parameter
    assert "user_pkg.attacks.MyAttack" in page and "user plug-in" in page and "built-in" in page
    assert "<div><code>scale = [1,2]</code></div>" in page
    # mechanism: lists joined, None as a dash not needed here
    assert "rdp, prv" in page
    assert "No client was excluded by a defense." not in page


def test_page_without_dp_says_unbounded_and_has_no_epsilon_plot() -> None:
    page = render_html(sample_report(dp=False))
    assert_self_contained(page)
    assert UNBOUNDED in page
    assert "∞ (no guarantee)" in page
    assert "—" in page  # noise_multiplier etc. are None
    epsilon_section = page.split(">Epsilon over rounds<", 1)[1].split("</section>", 1)[0]
    assert "data:image/png" not in epsilon_section
    pngs = images(page)
    assert len(pngs) == 2  # clients and accuracy only
    assert all(png.startswith(PNG_SIGNATURE) for png in pngs)


def test_report_strings_are_escaped() -> None:
    evil = "<script>alert(1)</script>"
    report = sample_report(clients=["client-0", evil, 'x" onmouseover="alert(2)', "$\\frac{$_"])
    report["stages"]["attack"]["plugin"] = "user_pkg.<b>Bold</b>"
    report["stages"]["attack"]["name"] = "<b>bold-name</b>"
    report["warnings"].append({"code": "<i>c</i>", "severity": "<img src=x>", "message": evil})
    report["threat_model"][0]["party"] = "<b>server</b>"
    report["run"]["run_id"] = evil
    page = render_html(report)
    assert_self_contained(page)
    assert evil not in page and "<b>" not in page and "<i>" not in page and "<img src=x>" not in page
    assert 'x" onmouseover' not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "user_pkg.&lt;b&gt;Bold&lt;/b&gt;" in page
    assert "&lt;b&gt;bold-name&lt;/b&gt;" in page
    # the only tags are the page's own
    tags = set(re.findall(r"<\s*/?\s*([a-zA-Z0-9!]+)", page))
    assert tags <= {"!DOCTYPE", "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code",
                    "section", "div", "ul", "li", "span", "table", "thead", "tbody", "tr", "th", "td", "img",
                    "figure", "figcaption"}


def test_missing_optional_sections_still_render() -> None:
    report = sample_report(clients=[])
    for key in ("accuracy", "threat_model", "stages"):
        del report[key]
    report["exclusions"] = []
    report["warnings"] = []
    report["run"]["final_accuracy"] = None
    page = render_html(report)
    assert_self_contained(page)
    assert "No warnings." in page
    assert "No client was excluded by a defense." in page
    assert ">Accuracy over rounds<" not in page and ">Threat model<" not in page
    assert len(images(page)) == 1  # the epsilon plot only
    # a bare report with only the schema renders too
    bare = render_html({"schema": "secure-fl/privacy-report/v1"})
    assert_self_contained(bare)
    assert "Privacy audit report" in bare and not images(bare)


def test_many_clients_plot_is_capped_and_said_so() -> None:
    report = sample_report(clients=[f"c{i}" for i in range(75)])
    report["accuracy"] = []
    page = render_html(report)
    assert "first 60 of 75 clients" in page
    assert "c74" in page  # the table still lists everyone
    assert len(images(page)) == 2


def test_malformed_values_do_not_crash() -> None:
    report: dict[str, Any] = copy.deepcopy(sample_report())
    report["epsilon"]["by_round"][0]["epsilon"] = {"rdp": float("inf"), "prv": "n/a"}
    report["clients"][0]["rounds_dropped"] = None
    report["clients"][1] = "not-a-mapping"
    report["mechanism"]["extra"] = {"nested": [1, None]}
    page = render_html(report)
    assert_self_contained(page)
    assert "∞ (no guarantee)" in page
    assert '{&quot;nested&quot;:[1,null]}' in page
