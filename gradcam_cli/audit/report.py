"""`gradcam report OUT`: one self-contained static page, OUT/report.html, that works from file://.

The page holds its data inline (the summary and one record per predictions row, as JSON in a
`<script type="application/json">`), its CSS and its JavaScript: no server, no network, no library. Images
stay files next to it: thumbnails (OUT/thumbnails/original/<rel>.jpg and OUT/thumbnails/overlay/<as in
overlays/>) are made here once, in parallel, and reused while their source is older; full-size overlays are
the ones explain wrote. What keeps it responsive at 10,000 images: the gallery is rendered in pages of 120
cards appended as the end of the list scrolls into view, thumbnails are small JPEGs with loading="lazy", and
filtering or sorting works on the in-memory records, re-rendering only the first page.

No torch: Pillow for thumbnails, the standard library for the rest.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from gradcam_cli.audit.groups import Groups
from gradcam_cli.audit.metrics import ACCURACY, COLUMNS, columns_in, measured_header
from gradcam_cli.audit.summary import groups_for, recorded_min_count, summarize
from gradcam_cli.audit.truth import Truth, resolve_truth
from gradcam_cli.errors import GradcamError
from gradcam_cli.out import names
from gradcam_cli.out.files import atomic_write
from gradcam_cli.out.folder import OutputFolder

THUMB_DIR = names.THUMBNAILS
THUMB_QUALITY = 80
OVERLAYS_PREFIX = names.OVERLAYS + "/"
LogFn = Callable[[str], None]


def _source_of(rel: str, roots: Sequence[str]) -> Path | None:
    """The input file a predictions path came from: `root/rel` for a folder root, the root itself for a file."""
    for root in roots:
        r = Path(root)
        if r.is_dir():
            candidate = r / rel
            if candidate.is_file():
                return candidate
        elif r.is_file() and r.name == rel:
            return r
    return None


def make_thumbnail(source: Path, target: Path, size: int) -> bool:
    """A JPEG of `source` whose longest side is at most `size` (EXIF orientation applied); True when written.

    Skipped when `target` is newer than `source`, so re-running the report only makes what changed. JPEG
    sources are decoded at reduced scale (Image.draft), which is most of the speed at large sizes.
    """
    try:
        if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
            return True
        with Image.open(source) as opened:
            opened.draft("RGB", (size, size))
            opened.seek(0)
            im: Image.Image = ImageOps.exif_transpose(opened)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            im = im.convert("RGB")
            im.thumbnail((size, size), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=THUMB_QUALITY)
        atomic_write(target, buf.getvalue())
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _records(
    rows: Sequence[Mapping[str, str]], header: Sequence[str], truth: Truth, groups: Groups | None = None
) -> list[dict[str, Any]]:
    """One compact record per row for the page (short keys keep 10,000 rows at a few MB); `g` is the row's
    group per attribute (with groups)."""
    metric_cols = [c.name for c in columns_in(header)]
    truth_names: dict[str, str | None] = {}
    if truth.known:
        truth_names = {row["path"]: truth.label_for(row["path"]) for row in rows}
    records = []
    for i, row in enumerate(rows):
        metrics: dict[str, float] = {}
        for col in metric_cols:
            text = row.get(col, "")
            if text not in ("", None):
                with contextlib.suppress(ValueError):
                    metrics[col] = float(text)
        overlay = row.get("overlay", "")
        records.append(
            {
                "i": i,
                "p": row.get("path", ""),
                "s": row.get("status", ""),
                "e": row.get("error", ""),
                "pi": row.get("pred_index", ""),
                "pl": row.get("pred_label", ""),
                "pp": _num(row.get("pred_prob")),
                "ti": row.get("target_index", ""),
                "tl": row.get("target_label", ""),
                "tp": _num(row.get("target_prob")),
                "l": row.get("layer", ""),
                "o": overlay,
                "to": _overlay_thumbnail(overlay),
                "ti_": "",
                "gt": truth_names.get(row.get("path", "")),
                "m": metrics,
                **({"g": groups.of(row.get("path", ""))} if groups is not None else {}),
            }
        )
    return records


def _overlay_thumbnail(overlay: str) -> str:
    """Where the thumbnail of an overlay (`overlays/<rel>...jpg`) goes, or "" when the row has none."""
    if not overlay.startswith(OVERLAYS_PREFIX):
        return ""
    return f"{THUMB_DIR}/overlay/{overlay[len(OVERLAYS_PREFIX) :]}"


def _num(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def report(
    out: str | Path,
    truth: str | Truth = "auto",
    title: str | None = None,
    thumb_size: int = 256,
    low_confidence: float = 0.5,
    log: LogFn | None = None,
    threads: int | None = None,
    groups: str | Groups | None = None,
    group_min_count: int | None = None,
) -> Path:
    """Write OUT/report.html (and its thumbnails) for the explain output folder `out`; returns the page's path.

    `groups` and `group_min_count` as for `audit` (default: what run.json recorded): a per-group table and a
    group filter."""
    log = log or (lambda message: None)
    if not 16 <= thumb_size <= 1024:
        raise GradcamError(f"--thumb-size: expected 16 to 1024 pixels, got {thumb_size}")
    if not 0.0 < low_confidence <= 1.0:
        raise GradcamError(f"--low-confidence: expected a probability in (0, 1], got {low_confidence}")
    folder = OutputFolder(out)
    out_dir = folder.path
    header, rows, run = folder.read()
    header = measured_header(header, run)
    labels = [str(x) for x in run.get("labels") or []]
    roots = [str(r) for r in run.get("input_roots") or []]
    if isinstance(truth, str):
        truth = resolve_truth(truth, roots, labels, (r["path"] for r in rows))
    groups = groups_for(groups, run, [r["path"] for r in rows])
    min_count = group_min_count or recorded_min_count(run)
    summary = summarize(header, rows, truth, labels, worst=10, run=run, groups=groups, group_min_count=min_count)
    records = _records(rows, header, truth, groups)

    thumbnails = _thumbnails(records, roots, out_dir, thumb_size, threads, log)

    page_title = title or f"gradcam report: {run.get('model') or 'model'} on {out_dir.resolve().name}"
    payload = {
        "title": page_title,
        "summary": summary,
        "rows": records,
        "metrics": [c.name for c in columns_in(header)],
        "metricInfo": {c.name: {"lower": c.lower_is_better, "ranked": c.ranked, "help": c.help} for c in COLUMNS},
        "groupKeys": {ACCURACY: ACCURACY, **{c.name: c.summary_key for c in columns_in(header)}},
        "lowConfidence": low_confidence,
        "truthKnown": truth.known,
    }
    html = inline_page(ASSETS, "report", page_title, payload)
    path = folder.file(names.REPORT)
    atomic_write(path, html.encode("utf-8"))
    log(f"report: {len(records)} rows, {thumbnails} thumbnails -> {path}")
    return path


def _thumbnails(
    records: list[dict[str, Any]], roots: Sequence[str], out_dir: Path, size: int, threads: int | None, log: LogFn
) -> int:
    """Make each record's thumbnails, one per original image and one per overlay, on a thread pool (Pillow
    releases the GIL), and point the records at them (`ti_`, `to`; "" where one could not be made). Returns how
    many were attempted."""
    jobs: list[tuple[Path, Path, dict[str, Any], str]] = []
    originals: dict[str, str] = {}
    for rec in records:
        rel = rec["p"]
        if rel not in originals:
            source = _source_of(rel, roots)
            originals[rel] = f"{THUMB_DIR}/original/{rel}.jpg" if source is not None else ""
            if source is not None:
                jobs.append((source, out_dir / originals[rel], rec, "ti_"))
        if rec["to"]:
            jobs.append((out_dir / rec["o"], out_dir / rec["to"], rec, "to"))
    for rec in records:
        rec["ti_"] = originals.get(rec["p"], "")
    workers = threads or min(8, (os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gradcam-thumb") as pool:
        made = list(pool.map(lambda job: make_thumbnail(job[0], job[1], size), jobs))
    failed = {(str(job[1])) for job, ok in zip(jobs, made, strict=True) if not ok}
    for rec in records:
        for key in ("to", "ti_"):
            if rec[key] and str(out_dir / rec[key]) in failed:
                rec[key] = ""
    missing = sum(1 for v in originals.values() if not v)
    if missing:
        log(f"report: {missing} original image(s) not found under the run's inputs; their cards show the overlay only")
    return len(jobs)


def _script_json(data: Any) -> str:
    """JSON safe inside <script>: no '<' (so no '</script>'), and U+2028/2029 escaped."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _escape_html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


ASSETS = Path(__file__).with_name("assets")


def inline_page(assets: Path, name: str, title: str, payload: Mapping[str, Any]) -> str:
    """The template `name`.html of `assets` with its CSS (`name`.css), JS (`name`.js) and data inlined: one
    file, nothing to fetch. report.html and diff.html are both made so."""
    template = (assets / f"{name}.html").read_text(encoding="utf-8")
    css = (assets / f"{name}.css").read_text(encoding="utf-8")
    js = (assets / f"{name}.js").read_text(encoding="utf-8")
    parts = {"TITLE": _escape_html(title), "CSS": css, "JS": js, "DATA": _script_json(payload)}
    # one pass, so that a placeholder-like string inside the data or the title is never substituted again
    return re.sub(r"__(TITLE|CSS|JS|DATA)__", lambda m: parts[m.group(1)], template)
