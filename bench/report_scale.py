"""How the HTML report behaves at scale: build time, page size, load, and a filter and a sort over every row.

    .venv/bin/python bench/report_scale.py --rows 10000

A synthetic explain folder (no model: tiny originals and overlays, random metric values) is reported and
opened in headless Chromium (Debian's `chromium`, or $CHROMIUM), driven through the Chrome DevTools protocol
by tests/headless.py. Prints one line of figures per round and writes them to bench/results_report.md; nothing
is asserted (tests/test_report.py checks the behaviour).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from audit_models import synthetic_out
from headless import Browser, card_paths, find_chromium, open_page

from gradcam_cli.api import report

TIMED_CHANGE = (
    "(() => {{ const t = performance.now(); const e = document.getElementById({id!r}); e.{prop} = {value};"
    " e.dispatchEvent(new Event('change')); return performance.now() - t; }})()"
)


ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results_report.md")
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("no chromium binary on PATH (apt-get install chromium, or set $CHROMIUM)", file=sys.stderr)
        return 1
    lines = [measure(chromium, args.rows) for _ in range(args.rounds)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    args.results.write_text(
        "# The HTML report at scale\n\n"
        f"Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, git {commit.strip()}, "
        f"{os.cpu_count()} CPUs, {platform.platform()}, load average at the start {load}, {chromium}\n\n"
        f"Command: `.venv/bin/python bench/report_scale.py --rows {args.rows} --rounds {args.rounds}`\n\n"
        + "".join(f"- {line}\n" for line in lines),
        encoding="utf-8",
    )
    return 0


def measure(chromium: str, rows: int) -> str:
    """One round: build the report of a fresh synthetic folder of `rows` rows and drive it; one line of figures."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = synthetic_out(root, rows)
        t0 = time.perf_counter()
        report(out)
        build_s = time.perf_counter() - t0
        size_mb = (out / "report.html").stat().st_size / 1e6
        with Browser(chromium, root / "profile") as br:
            load_s = open_page(br, out / "report.html")
            ready_ms = br.evaluate("performance.now()")
            cards = len(card_paths(br))
            filter_ms = br.evaluate(TIMED_CHANGE.format(id="f-missed", prop="checked", value="true"))
            sort_ms = br.evaluate(TIMED_CHANGE.format(id="sort", prop="value", value="'m.deletion_auc'"))
            shown = br.evaluate("document.getElementById('count').textContent")
    line = (
        f"{rows:,}-row report: build {build_s:.1f} s, report.html {size_mb:.1f} MB, load event {load_s:.2f} s, "
        f"ready at {ready_ms:.0f} ms, {cards} cards rendered, filter {filter_ms:.0f} ms, sort {sort_ms:.0f} ms; {shown}"
    )
    print(line)
    return line


if __name__ == "__main__":
    sys.exit(main())
