"""How the HTML report behaves at scale: build time, page size, load, and a filter and a sort over every row.

    .venv/bin/python bench/report_scale.py --rows 10000

A synthetic explain folder (no model: tiny originals and overlays, random metric values) is reported and
opened in headless Chromium (Debian's `chromium`, or $CHROMIUM), driven through the Chrome DevTools protocol
by tests/headless.py. Prints one line of figures; nothing is asserted (tests/test_report.py checks behaviour).
"""

from __future__ import annotations

import argparse
import os
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None:
        print("no chromium binary on PATH (apt-get install chromium, or set $CHROMIUM)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = synthetic_out(root, args.rows)
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
    print(
        f"{args.rows:,}-row report: build {build_s:.1f} s ({os.cpu_count()} CPUs), report.html {size_mb:.1f} MB, "
        f"load event {load_s:.2f} s, ready at {ready_ms:.0f} ms, {cards} cards rendered, filter {filter_ms:.0f} ms, "
        f"sort {sort_ms:.0f} ms; {shown}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
