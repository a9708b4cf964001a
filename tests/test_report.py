"""`gradcam report`: the page and its thumbnails, then the page in a real headless chromium.

Browser checks (Debian's chromium; skipped with the reason only when no chromium binary exists): the page
loads from file:// without a console error or a failed resource load, the gallery shows every row, each
filter leaves exactly the expected cards, sorting orders them, a click opens the full-size overlay, the
screenshot is not blank, and a 300-row gallery grows to every row as it is scrolled.
A slow test measures a 10,000-row report (build time, page load, filter and sort times).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from audit_models import make_world
from click.testing import CliRunner, Result
from headless import Browser, find_chromium
from outputs import rows_of
from PIL import Image

from gradcam_cli.audit.report import build_report
from gradcam_cli.cli import main

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (.ci/run installs Debian's chromium; or set $CHROMIUM)"
)


def invoke(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def page_data(html: str) -> dict[str, Any]:
    found = re.findall(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    assert len(found) == 1
    return json.loads(found[0])


@pytest.fixture(scope="module")
def report_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The colour world (4 squares, truth in folder names) plus an undecodable file and an awkward file name,
    explained with pointing/energy/deletion, then `gradcam report`."""
    world = make_world(tmp_path_factory.mktemp("report"))
    images = world["images"]
    (images / "dog" / "broken.png").write_bytes(b"not an image")
    weird = images / "cat" / 'odd <b>&"name".png'
    weird.write_bytes((images / "cat" / "a.png").read_bytes())
    out = world["root"] / "out"
    result = invoke(
        "explain", images, "-o", out, "-c", world["cfg"], "--metrics", "pointing,energy,deletion", "--steps", "3",
        "--boxes", world["boxes"], "--masks", world["masks"],
    )  # fmt: skip
    assert result.exit_code == 1, result.output  # the broken file
    result = invoke("report", out, "--title", "audit </script><b>x</b>", "-q")
    assert result.exit_code == 0, result.output
    return out


def test_report_is_one_self_contained_file_with_thumbnails(report_out: Path) -> None:
    html = (report_out / "report.html").read_text(encoding="utf-8")
    # nothing fetched from anywhere: no external script, stylesheet or URL
    assert not re.search(r"<script[^>]+src=|<link[^>]+stylesheet|https?://", html)
    assert html.count("</script>") == 2  # the data and the code; the title's "</script>" is escaped
    assert "<title>audit &lt;/script&gt;&lt;b&gt;x&lt;/b&gt;</title>" in html
    data = page_data(html)
    rows = rows_of(report_out)
    assert [r["p"] for r in data["rows"]] == [r["path"] for r in rows]
    assert 'cat/odd <b>&"name".png' in [r["p"] for r in data["rows"]]  # survives the JSON-in-HTML escaping
    assert data["summary"]["counts"]["error"] == 1 and data["truthKnown"] is True
    for rec in data["rows"]:
        if rec["s"] == "ok":
            for key in ("ti_", "to"):  # original and overlay thumbnails, as files next to the page
                thumb = Image.open(report_out / rec[key])
                assert thumb.format == "JPEG" and max(thumb.size) <= 256
        else:
            assert rec["to"] == "" and rec["ti_"] == ""  # the broken file has neither
    assert Image.open(report_out / "thumbnails/original/cat/a.png.jpg").size == (120, 90)  # never enlarged


def test_report_reuses_thumbnails_and_checks_options(report_out: Path) -> None:
    thumb = report_out / "thumbnails/overlay/cat/a.png.jpg"
    before = thumb.stat().st_mtime_ns
    assert invoke("report", report_out, "-q").exit_code == 0
    assert thumb.stat().st_mtime_ns == before
    for args in (["--thumb-size", "4"], ["--low-confidence", "2"]):
        result = invoke("report", report_out, *args)
        assert result.exit_code == 2 and result.stderr.startswith("Error:") and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------- the browser


def card_paths(br: Browser) -> list[str]:
    return br.evaluate("Array.from(document.querySelectorAll('#gallery .card')).map(c => c.dataset.path)")


def open_page(br: Browser, page: Path) -> float:
    seconds = br.navigate(page.as_uri())
    try:
        br.wait_for("document.body.dataset.ready === '1'")
    except Exception as exc:
        raise AssertionError(f"the page never got ready: {br.console_errors()}") from exc
    # the thumbnails in view have loaded (or failed, which console_errors would show)
    br.wait_for(
        "Array.from(document.images).filter(i => i.getBoundingClientRect().top < innerHeight).every(i => i.complete)"
    )
    return seconds


def set_control(br: Browser, element_id: str, value: Any) -> None:
    """Set a checkbox/select/input as a user would and fire its change event."""
    prop = "checked" if isinstance(value, bool) else "value"
    br.evaluate(
        f"(() => {{ const e = document.getElementById({element_id!r}); e.{prop} = {json.dumps(value)};"
        " e.dispatchEvent(new Event('change')); })()"
    )


@needs_chromium
def test_report_in_headless_chromium(report_out: Path, tmp_path: Path) -> None:
    rows = rows_of(report_out)
    assert CHROMIUM is not None
    with Browser(CHROMIUM, tmp_path / "profile") as br:
        open_page(br, report_out / "report.html")
        assert br.console_errors() == [], br.console_errors()

        # every row has its card, in the CSV's (path) order
        assert card_paths(br) == [r["path"] for r in rows]
        assert br.evaluate("document.getElementById('count').textContent").startswith(f"showing {len(rows)} of")

        def only(element_id: str, value: Any) -> list[str]:
            set_control(br, element_id, value)
            shown = card_paths(br)
            set_control(br, element_id, False if isinstance(value, bool) else "")
            return shown

        by_path = {r["path"]: r for r in rows}
        assert (
            only("f-missed", True) == [p for p, r in by_path.items() if r.get("pointing_hit") == "0"] == ["cat/b.png"]
        )
        misclassified = only("f-misclassified", True)
        assert misclassified == ["cat/b.png", "dog/d.png"]  # green cat -> dog, blue dog -> bird
        assert only("f-status", "error") == ["dog/broken.png"]
        set_control(br, "t-lowenergy", "0.5")
        assert only("f-lowenergy", True) == ["cat/b.png"]
        assert len(card_paths(br)) == len(rows)  # every filter off again

        # sort by deletion AUC, highest first; rows without the metric go last
        set_control(br, "sort", "m.deletion_auc")
        br.evaluate("document.getElementById('sort-dir').click()")
        ordered = [p for p in card_paths(br) if by_path[p]["deletion_auc"]]
        assert ordered == sorted(ordered, key=lambda p: -float(by_path[p]["deletion_auc"]))
        assert card_paths(br)[-1] == "dog/broken.png"

        # a click opens the full-size overlay
        br.evaluate("document.querySelector('.card[data-path=\"cat/a.png\"]').click()")
        br.wait_for("!document.getElementById('lightbox').hidden && document.getElementById('lb-img').complete")
        assert br.evaluate("document.getElementById('lb-img').naturalWidth") == 120
        assert br.evaluate("decodeURIComponent(document.getElementById('lb-img').src)").endswith(
            "overlays/cat/a.png.jpg"
        )
        br.evaluate("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'}))")
        assert br.evaluate("document.getElementById('lightbox').hidden") is True

        shot = Image.open(io.BytesIO(br.screenshot())).convert("RGB")
        assert br.console_errors() == [], br.console_errors()
    shot.save(tmp_path / "report.png")
    pixels = np.asarray(shot)
    assert shot.size == (1280, 900)
    assert pixels.std() > 20, "the screenshot is (nearly) one flat colour"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "too few colours for a page with photos"


def synthetic_out(root: Path, n: int, metrics: bool = True) -> Path:
    """An explain-shaped folder without running a model: n rows, tiny originals and overlays, a run.json."""
    out, src = root / "out", root / "src"
    (out / "overlays").mkdir(parents=True)
    src.mkdir()
    rng = np.random.default_rng(0)
    overlay = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(overlay, format="JPEG")
    original = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(original, format="PNG")
    header = ["path", "status", "error", "pred_index", "pred_label", "pred_prob", "target_index", "target_label"]
    header += ["target_prob", "method", "layer", "cam_max", "peak_x", "peak_y", "heatmap", "overlay"]
    if metrics:
        header += ["deletion_auc", "insertion_auc", "pointing_hit", "energy_in_box"]
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i in range(n):
            rel = f"c{i % 50:02d}/img{i:05d}.png"
            (src / rel).parent.mkdir(exist_ok=True)
            (src / rel).write_bytes(original.getvalue())
            (out / "overlays" / rel).parent.mkdir(exist_ok=True)
            (out / "overlays" / f"{rel}.jpg").write_bytes(overlay.getvalue())
            p = float(rng.uniform(0.05, 1.0))
            row = [rel, "ok", "", i % 7, f"class {i % 7}", f"{p:.6f}", i % 7, f"class {i % 7}", f"{p:.6f}"]
            row += ["gradcam", "layer4", "1.0", 3, 4, "", f"overlays/{rel}.jpg"]
            if metrics:
                deletion, insertion, hit, energy = rng.uniform(), rng.uniform(), rng.uniform() < 0.7, rng.uniform()
                row += [f"{deletion:.6f}", f"{insertion:.6f}", int(hit), f"{energy:.6f}"]
            writer.writerow(row)
    run = {"model": "synthetic", "input_roots": [str(src)], "labels": [f"class {k}" for k in range(7)]}
    (out / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return out


@needs_chromium
def test_gallery_grows_to_every_row_as_it_scrolls(tmp_path: Path) -> None:
    out = synthetic_out(tmp_path, 300)
    build_report(out)
    assert CHROMIUM is not None
    with Browser(CHROMIUM, tmp_path / "profile") as br:
        open_page(br, out / "report.html")
        first = len(card_paths(br))
        assert 0 < first < 300  # paged: not everything at once
        for _ in range(100):
            if len(card_paths(br)) == 300:
                break
            br.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            time.sleep(0.05)
        paths = card_paths(br)
        assert paths == sorted(r["path"] for r in rows_of(out))
        # a filter starts the paging again, over the matching rows only
        set_control(br, "f-missed", True)
        expected = sorted(r["path"] for r in rows_of(out) if r["pointing_hit"] == "0")
        for _ in range(100):
            if len(card_paths(br)) == len(expected):
                break
            br.evaluate("window.scrollTo(0, document.body.scrollHeight)")
            time.sleep(0.05)
        assert card_paths(br) == expected
        assert br.console_errors() == [], br.console_errors()


@pytest.mark.slow
@needs_chromium
def test_report_at_10000_rows(tmp_path: Path) -> None:
    """Measured (printed with -s): building the report with its 20,000 thumbnails, page load, the gallery ready,
    a filter and a sort over every row."""
    n = 10_000
    out = synthetic_out(tmp_path, n)
    t0 = time.perf_counter()
    build_report(out)
    build_s = time.perf_counter() - t0
    size_mb = (out / "report.html").stat().st_size / 1e6
    assert CHROMIUM is not None
    with Browser(CHROMIUM, tmp_path / "profile") as br:
        load_s = open_page(br, out / "report.html")
        ready_ms = br.evaluate("performance.now()")
        assert len(card_paths(br)) < 500
        filter_ms = br.evaluate(
            "(() => { const t = performance.now(); const e = document.getElementById('f-missed'); e.checked = true;"
            " e.dispatchEvent(new Event('change')); return performance.now() - t; })()"
        )
        sort_ms = br.evaluate(
            "(() => { const t = performance.now(); const e = document.getElementById('sort');"
            " e.value = 'm.deletion_auc'; e.dispatchEvent(new Event('change')); return performance.now() - t; })()"
        )
        shown = br.evaluate("document.getElementById('count').textContent")
        assert br.console_errors() == []
    print(
        f"\n10,000-row report: build {build_s:.1f} s ({os.cpu_count()} CPUs), "
        f"report.html {size_mb:.1f} MB, load event {load_s:.2f} s, ready at {ready_ms:.0f} ms, "
        f"filter {filter_ms:.0f} ms, sort {sort_ms:.0f} ms; {shown}"
    )
    assert f"of {n} matching" not in shown  # the filter applied
    assert load_s < 10 and filter_ms < 2000 and sort_ms < 2000
