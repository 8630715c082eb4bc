#!/usr/bin/env python
"""Render an evaluation report.html in headless Chromium and check what the browser built.

    python scripts/check_report_html.py REPORT_DIR [--screenshot OUT.png]

The page is loaded with ``#sort=cider-0:asc``, so its script must run and sort the gallery by
CIDEr-D, worst first. The DOM Chromium dumps must then hold the metric table (one row per
section), the gallery cards in ascending CIDEr-D order, the sort controls, and the marker the
script sets when it finished; no element may point at an external URL. Exit 0 when all checks
pass, 1 when one fails, 2 when Chromium or the report is missing (install Chromium with
``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
SORT_HASH = "#sort=cider-0:asc"
TIMEOUT_S = 120


class DomSummary(HTMLParser):
    """Collects what the checks need from the dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.body: dict[str, str | None] = {}
        self.gallery: dict[str, str | None] = {}
        self.cards: list[dict[str, str | None]] = []
        self.metric_rows = 0
        self.external: list[str] = []
        self.images = 0
        self._table: str | None = None
        self._in_body = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"] or "")
        for key in ("src", "href", "action", "poster"):
            value = (a.get(key) or "").strip().lower()
            if value.startswith(("http:", "https:", "//", "ftp:")):
                self.external.append(f"<{tag} {key}={a.get(key)}>")
        if tag == "body":
            self.body = a
        elif tag == "table":
            self._table = a.get("id")
        elif tag == "tr" and self._table == "metrics":
            self.metric_rows += 1
        elif tag == "figure" and "card" in (a.get("class") or "").split():
            self.cards.append(a)
        elif tag == "img":
            self.images += 1
        if a.get("id") == "gallery":
            self.gallery = a

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None


def chromium_command(url: str, user_dir: str, *extra: str) -> list[str]:
    return [CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", *extra, url]


def dump_dom(html_file: Path) -> str:
    """The DOM after the page's scripts ran, as Chromium serialises it."""
    url = html_file.resolve().as_uri() + SORT_HASH
    with tempfile.TemporaryDirectory(prefix="captioner-chromium-") as user_dir:
        proc = subprocess.run(
            chromium_command(url, user_dir, "--dump-dom"),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    if proc.returncode != 0 or "<html" not in proc.stdout:
        raise RuntimeError(f"chromium failed (exit {proc.returncode}): {proc.stderr[-1500:]}")
    return proc.stdout


def screenshot(html_file: Path, out: Path) -> None:
    """Save a 1280x2000 screenshot of the page (unsorted)."""
    with tempfile.TemporaryDirectory(prefix="captioner-chromium-") as user_dir:
        proc = subprocess.run(
            chromium_command(
                html_file.resolve().as_uri(),
                user_dir,
                f"--screenshot={out.resolve()}",
                "--window-size=1280,2000",
                "--hide-scrollbars",
            ),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(
            f"chromium screenshot failed (exit {proc.returncode}): {proc.stderr[-1500:]}"
        )


def check_dom(dom: str) -> list[str]:
    """Every failed check, as a message ([] when the page is fine)."""
    summary = DomSummary()
    summary.feed(dom)
    problems = []
    if summary.body.get("data-ready") != "1":
        problems.append("the page script did not finish (no data-ready on <body>)")
    if summary.metric_rows < 2:
        problems.append(
            f"table#metrics has {summary.metric_rows} rows; expected a header and one per section"
        )
    for needed in ("gallery", "sort-key", "sort-asc", "sort-desc"):
        if needed not in summary.ids:
            problems.append(f"no element with id {needed!r}")
    if not summary.cards:
        problems.append("the gallery has no .card elements")
    if summary.gallery.get("data-sorted") != "data-cider-0:asc":
        problems.append(
            f"gallery not sorted by the script (data-sorted={summary.gallery.get('data-sorted')!r})"
        )
    scores = [float(c.get("data-cider-0") or "nan") for c in summary.cards]
    if scores != sorted(scores):
        problems.append("gallery cards are not in ascending CIDEr-D order after sorting")
    if summary.external:
        problems.append(f"external references: {', '.join(summary.external[:5])}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report_dir", type=Path, help="folder holding report.html")
    parser.add_argument("--screenshot", type=Path, metavar="OUT.png", help="also save a screenshot")
    args = parser.parse_args(argv)
    page = args.report_dir / "report.html"
    if not os.access(CHROMIUM, os.X_OK):
        print(
            f"{CHROMIUM} not found: install it with `apt-get install -y chromium`", file=sys.stderr
        )
        return 2
    if not page.is_file():
        print(
            f"{page} not found: run `captioner evaluate --out {args.report_dir}` first",
            file=sys.stderr,
        )
        return 2
    try:
        problems = check_dom(dump_dom(page))
        if args.screenshot:
            screenshot(page, args.screenshot)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"FAIL: {exc}", file=sys.stderr)
        return 1
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    if not problems:
        print(
            f"OK: {page} renders; metric table, sorted gallery and script checked"
            + (f"; screenshot {args.screenshot}" if args.screenshot else "")
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
