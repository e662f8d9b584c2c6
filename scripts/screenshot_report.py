"""Render a privacy report in headless Chromium and check that it fits a 1280 px window.

The report page has no scripts (by design), so the layout is checked from screenshots alone:

* at 1280 px wide (scrollbars hidden) no content may touch the right edge of the window: a table
  that overflows the page is cut there;
* at a wide window the page's content, centred by its ``max-width``, must be narrower than
  1280 px minus margins: an overflowing table sticks out to the right of the page body.

Usage::

    python scripts/screenshot_report.py --simulate            # smoke run in a temp dir, then check
    python scripts/screenshot_report.py --run runs/my-run     # report of an existing run
    python scripts/screenshot_report.py --html page.html --out shots/

Exit status 0 when the layout fits, 1 when not (the problems are printed), 2 when no browser is
found. The screenshots are kept in ``--out`` (default: a temporary directory, printed) to look at.
Needs Chromium (Debian: ``apt-get install chromium``) and Pillow.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

WINDOW = 1280
WIDE = 2200
MARGIN = 16  # px of blank space required between the content and the window's edges
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium(explicit: str | None = None) -> str | None:
    """The browser binary: ``explicit`` if given, else the first Chromium found on ``PATH``."""
    if explicit:
        return explicit
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


def screenshot(browser: str, page: Path, png: Path, width: int, height: int) -> Path:
    """Save a headless screenshot of ``page`` at ``width`` x ``height`` (scrollbars hidden)."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
                f"--screenshot={png}", page.resolve().as_uri(),
            ],
            capture_output=True, text=True, timeout=120,
        )
    if done.returncode != 0 or not png.is_file():
        raise RuntimeError(f"{browser} failed ({done.returncode}): {done.stderr[-2000:]}")
    return png


def content_columns(png: Path) -> tuple[int, int] | None:
    """First and last pixel column holding anything but the white page background."""
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    used = np.flatnonzero((pixels < 250).any(axis=2).any(axis=0))
    return (int(used[0]), int(used[-1])) if used.size else None


def check_layout(browser: str, page: Path, out_dir: Path, height: int = 8000) -> list[str]:
    """Screenshot ``page`` at `WINDOW` and `WIDE` pixels wide; return the layout problems found."""
    problems = []
    narrow = content_columns(screenshot(browser, page, out_dir / f"report-{WINDOW}.png", WINDOW, height))
    if narrow is None:
        return [f"the page rendered blank at {WINDOW} px"]
    if narrow[1] >= WINDOW - MARGIN:
        problems.append(f"at {WINDOW} px content reaches column {narrow[1]}: it overflows the window")
    wide = content_columns(screenshot(browser, page, out_dir / f"report-{WIDE}.png", WIDE, height))
    if wide is None:
        return [*problems, f"the page rendered blank at {WIDE} px"]
    if wide[1] - wide[0] + 1 > WINDOW - 2 * MARGIN:
        problems.append(
            f"at {WIDE} px the content is {wide[1] - wide[0] + 1} px wide (columns {wide[0]}-{wide[1]}): "
            f"more than a {WINDOW} px window holds"
        )
    return problems


def simulate_run(out: Path) -> Path:
    """Run the smoke preset into ``out`` and return its report page."""
    cli = Path(sys.executable).with_name("secure-fl")
    command = [str(cli)] if cli.exists() else [sys.executable, "-m", "secure_fl.cli"]
    subprocess.run([*command, "simulate", "--preset", "smoke", "--out", str(out)], check=True, timeout=600)
    return out / "report" / "privacy_report.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--html", type=Path, help="a report page to check")
    source.add_argument("--run", type=Path, help="a run directory; checks its report/privacy_report.html")
    source.add_argument("--simulate", action="store_true", help="run the smoke preset first and check its report")
    parser.add_argument("--out", type=Path, help="where to keep the screenshots (default: a temp dir)")
    parser.add_argument("--browser", help="Chromium binary (default: found on PATH)")
    parser.add_argument("--height", type=int, default=8000, help="window height in px (default 8000)")
    args = parser.parse_args(argv)

    browser = find_chromium(args.browser)
    if browser is None:
        print("no Chromium found (install it, e.g. apt-get install chromium, or pass --browser)", file=sys.stderr)
        return 2
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="report-shots-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.simulate:
        page = simulate_run(out_dir / "run")
    elif args.run is not None:
        page = args.run / "report" / "privacy_report.html"
    else:
        page = args.html
    problems = check_layout(browser, page, out_dir, args.height)
    print(f"screenshots of {page} in {out_dir}")
    for problem in problems:
        print(f"layout problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
