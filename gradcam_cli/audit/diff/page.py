"""DIFF_OUT/diff.html: one self-contained page (data, CSS and JavaScript inline, works from file://) with, for each
pair, A's overlay, B's overlay and a picture of where their maps differ, sortable by similarity and filterable to
flips and to pairs below a threshold. Pictures are small files next to it (DIFF_OUT/thumbnails/), made in
parallel, as the report does."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from gradcam_cli.audit.diff.pairs import REDUCED, Pair
from gradcam_cli.audit.diff.similarity import difference_picture
from gradcam_cli.audit.report import inline_page, make_thumbnail
from gradcam_cli.out import names
from gradcam_cli.out.files import atomic_write

if TYPE_CHECKING:
    from gradcam_cli.audit.diff.compare import DiffResult

THUMB = 200
ASSETS = Path(__file__).with_name("assets")


def _difference(pair: Pair, dir_a: Path, dir_b: Path, target: Path) -> bool:
    """The red/blue difference picture of a pair's heatmaps, at most THUMB px; True when written."""
    assert pair.a is not None and pair.b is not None
    try:
        maps = []
        for folder, row in ((dir_a, pair.a), (dir_b, pair.b)):
            with Image.open(folder / row["heatmap"]) as im:
                size = im.size
                small = im.convert("L")
                small.thumbnail((REDUCED, REDUCED), Image.Resampling.BOX)
                maps.append(np.asarray(small, dtype=np.float64))
        if maps[0].shape != maps[1].shape:
            maps[1] = np.asarray(Image.fromarray(maps[1]).resize(maps[0].shape[::-1]), dtype=np.float64)
        picture = Image.fromarray(difference_picture(maps[0], maps[1]))
        scale = THUMB / max(size)
        picture = picture.resize(
            (max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), Image.Resampling.BILINEAR
        )
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, buf.getvalue())
        return True
    except (OSError, KeyError, ValueError):
        return False


def _records(result: DiffResult) -> tuple[list[dict[str, Any]], list[tuple[str, Path, Pair]]]:
    """One record per pair for the page, and the pictures to make: (kind, target file, pair)."""
    records: list[dict[str, Any]] = []
    jobs: list[tuple[str, Path, Pair]] = []
    out = result.folder
    for i, p in enumerate(result.pairs):
        rec: dict[str, Any] = {
            "path": p.path,
            "slot": p.slot,
            "status": p.status,
            "pred_a": (p.a or {}).get("pred_label", ""),
            "pred_b": (p.b or {}).get("pred_label", ""),
            "flipped": None,
            **{k: round(v, 6) for k, v in p.values.items()},
        }
        if p.a is not None and p.b is not None and p.a.get("pred_index") and p.b.get("pred_index"):
            rec["flipped"] = p.a["pred_index"] != p.b["pred_index"]
        for kind, row in (("ta", p.a), ("tb", p.b)):
            overlay = (row or {}).get("overlay", "")
            rec[kind] = f"{names.THUMBNAILS}/{kind[1]}/{overlay}.jpg" if overlay else ""
            if overlay:
                jobs.append((kind, out / rec[kind], p))
        both = p.a is not None and p.b is not None and p.a.get("heatmap") and p.b.get("heatmap")
        rec["td"] = f"{names.THUMBNAILS}/delta/{i:06d}.png" if both else ""
        if both:
            jobs.append(("td", out / rec["td"], p))
        records.append(rec)
    return records, jobs


def write_page(result: DiffResult, dir_a: Path, dir_b: Path, threads: int = 2) -> Path:
    """Write DIFF_OUT/diff.html and its thumbnails; returns the page's path."""
    records, jobs = _records(result)

    def make(job: tuple[str, Path, Pair]) -> bool:
        kind, target, pair = job
        if kind == "td":
            return _difference(pair, dir_a, dir_b, target)
        folder, row = (dir_a, pair.a) if kind == "ta" else (dir_b, pair.b)
        return make_thumbnail(folder / (row or {})["overlay"], target, THUMB)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gradcam-diff-page") as pool:
        made = list(pool.map(make, jobs))
    failed = {str(job[1]) for job, ok in zip(jobs, made, strict=True) if not ok}
    for rec in records:
        for key in ("ta", "tb", "td"):
            if rec[key] and str(result.folder / rec[key]) in failed:
                rec[key] = ""
    title = f"gradcam diff: {Path(result.summary['a']).name} vs {Path(result.summary['b']).name}"
    path = result.folder / names.DIFF_REPORT
    page = inline_page(ASSETS, "diff", title, {"summary": result.summary, "rows": records})
    atomic_write(path, page.encode("utf-8"))
    return path
