"""`gradcam report`: the page and its thumbnails, then the page in a real headless chromium.

Browser checks (Debian's chromium; skipped with the reason only when no chromium binary exists): the page
loads from file:// without a console error or a failed resource load, the gallery shows every row, each
filter leaves exactly the expected cards, sorting orders them, a click opens the full-size overlay, the
screenshot is not blank, and a 300-row gallery grows to every row as it is scrolled.
A slow test measures a 10,000-row report (build time, page load, filter and sort times).
"""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from audit_models import make_world, synthetic_out
from headless import Browser, card_paths, find_chromium, open_page
from helpers import invoke, rows_of
from PIL import Image

from gradcam_cli.audit.report import report as build_report

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (.ci/run installs Debian's chromium; or set $CHROMIUM)"
)


def page_data(html: str) -> dict[str, Any]:
    found = re.findall(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    assert len(found) == 1
    return json.loads(found[0])


@pytest.fixture(scope="module")
def report_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The colour world (4 squares, truth in folder names) plus an undecodable file and an awkward file name,
    explained with pointing/energy/deletion, then `gradcam report` grouped by the first folder (cat/, dog/)."""
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
    result = invoke(
        "report", out, "--title", "audit </script><b>x</b>", "--groups", "folders:1", "--group-min-count", "2", "-q"
    )
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
    # the same page as the fixture's (the browser test may run after this one)
    assert invoke("report", report_out, "--groups", "folders:1", "--group-min-count", "2", "-q").exit_code == 0
    assert thumb.stat().st_mtime_ns == before
    for args in (["--thumb-size", "4"], ["--low-confidence", "2"]):
        result = invoke("report", report_out, *args)
        assert result.exit_code == 2 and result.stderr.startswith("Error:") and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------- the browser


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
        assert only("f-group", json.dumps(["folder1", "dog"], separators=(",", ":"))) == [
            p for p in by_path if p.startswith("dog/")
        ]
        assert only("f-group", json.dumps(["folder1", "cat"], separators=(",", ":"))) == [
            p for p in by_path if p.startswith("cat/")
        ]
        set_control(br, "t-lowenergy", "0.5")
        assert only("f-lowenergy", True) == ["cat/b.png"]
        # "worse than" a metric: deletion is lower-is-better, so the rows above the number
        cut = sorted(float(r["deletion_auc"]) for r in rows if r["deletion_auc"])[1]
        set_control(br, "t-metric", str(cut))
        worse = [p for p, r in by_path.items() if r["deletion_auc"] and float(r["deletion_auc"]) > cut]
        assert worse and only("f-metric", "deletion_auc") == worse
        set_control(br, "t-metric", "")
        options = br.evaluate("[...document.getElementById('f-metric').options].map((o) => o.value)")
        assert options == ["", "deletion_auc", "pointing_hit", "energy_in_box"]  # the ranked columns measured
        assert len(card_paths(br)) == len(rows)  # every filter off again

        # the per-group table: one per attribute, a row per group, the gaps' two groups marked
        groups = br.evaluate(
            "[...document.querySelectorAll('#groups table')].map((t) => [t.dataset.attribute, "
            "[...t.querySelectorAll('tbody tr[data-group]')].map((r) => r.dataset.group)])"
        )
        assert groups == [["folder1", ["cat", "dog"]]]
        assert br.evaluate("document.getElementById('groups-box').hidden") is False
        marked = br.evaluate("document.querySelectorAll('#groups td.gap-low, #groups td.gap-high').length")
        gaps = page_data((report_out / "report.html").read_text(encoding="utf-8"))["summary"]["groups"]
        assert marked == 2 * sum(1 for g in gaps["attributes"]["folder1"]["gaps"].values() if g)
        assert br.evaluate("document.querySelectorAll('#groups tr.gaps td.largest').length") >= 1

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
    """10,000 rows: the report builds, the page loads without errors, the gallery renders a page of cards (not
    every row) and a filter and a sort over every row work. How long each takes: bench/report_scale.py."""
    n = 10_000
    out = synthetic_out(tmp_path, n)
    build_report(out)
    assert CHROMIUM is not None
    with Browser(CHROMIUM, tmp_path / "profile") as br:
        open_page(br, out / "report.html")
        assert len(card_paths(br)) < 500
        set_control(br, "f-missed", True)
        set_control(br, "sort", "m.deletion_auc")
        shown = br.evaluate("document.getElementById('count').textContent")
        assert br.console_errors() == []
    assert f"of {n} matching" not in shown  # the filter applied
