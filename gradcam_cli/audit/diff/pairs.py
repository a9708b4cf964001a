"""Which rows of two explain outputs are compared, and how each pair is measured.

Rows pair by image path, then by slot: the k-th row of an image in A with its k-th row in B (the rows of one
image come in the order of its targets and layers, so two runs with the same `--target` and `--layer` pair map
for map; with `--target pred` each run's map of its own prediction, which is what "does it still look at the
same thing" asks). An image or slot present in one run only, or an error row in either, is its own diff row,
never dropped.

The maps: npy/ when both rows have it at the same grid (the CAM before upsampling), else the heatmap PNGs
(original size, 8-bit) reduced by an integer box filter to at most REDUCED pixels on the long side, since
similarities at that size hardly move while decoding and ranking full-size maps would cost 10-100x more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from gradcam_cli.audit.diff.similarity import spearman, ssim, top_iou
from gradcam_cli.out.names import npy_for

REDUCED = 64
Record = Mapping[str, str]

COMPARED, ONLY_A, ONLY_B = "compared", "only_in_a", "only_in_b"
ERROR_A, ERROR_B, ERROR_BOTH = "error_in_a", "error_in_b", "error_in_both"
STATUSES: tuple[str, ...] = (COMPARED, ONLY_A, ONLY_B, ERROR_A, ERROR_B, ERROR_BOTH)


@dataclass
class Pair:
    """One diff row: an image slot with its row in A and/or B, and what was measured on it."""

    path: str
    slot: int
    status: str
    a: Record | None
    b: Record | None
    values: dict[str, float] = field(default_factory=dict)  # spearman, ssim, iou, peak_shift_px, peak_shift
    source: str = ""  # where the maps came from: npy, heatmaps, or "" (none to compare)
    note: str = ""


def pair_rows(rows_a: Sequence[Record], rows_b: Sequence[Record]) -> list[Pair]:
    """Every image slot of either run, in A's order then B's new images (see the module docstring)."""
    by_a: dict[str, list[Record]] = {}
    by_b: dict[str, list[Record]] = {}
    for row in rows_a:
        by_a.setdefault(row.get("path", ""), []).append(row)
    for row in rows_b:
        by_b.setdefault(row.get("path", ""), []).append(row)
    pairs: list[Pair] = []
    for path in [*by_a, *(p for p in by_b if p not in by_a)]:
        ra, rb = by_a.get(path, []), by_b.get(path, [])
        for slot in range(max(len(ra), len(rb))):
            a = ra[slot] if slot < len(ra) else None
            b = rb[slot] if slot < len(rb) else None
            pairs.append(Pair(path, slot, _status(a, b), a, b))
    return pairs


def _status(a: Record | None, b: Record | None) -> str:
    if a is None:
        return ONLY_B
    if b is None:
        return ONLY_A
    failed_a, failed_b = a.get("status") == "error", b.get("status") == "error"
    if failed_a and failed_b:
        return ERROR_BOTH
    if failed_a or failed_b:
        return ERROR_A if failed_a else ERROR_B
    return COMPARED


def measure(pair: Pair, dir_a: Path, dir_b: Path, top: float) -> Pair:
    """Fill `pair.values` from the two rows and their map files; a missing or unreadable file leaves the map
    measures empty and says why in `pair.note` (the row is still compared on its predictions)."""
    if pair.status != COMPARED or pair.a is None or pair.b is None:
        return pair
    if pair.a.get("status") != "ok" or pair.b.get("status") != "ok":
        pair.note = "no map in A" if pair.a.get("status") != "ok" else "no map in B"
        return pair
    try:
        maps, diagonal = _maps(pair, dir_a, dir_b)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        pair.note = f"cannot read a map: {exc}"[:200]
        return pair
    shift = _peak_shift(pair.a, pair.b)
    if shift is not None:
        pair.values["peak_shift_px"] = shift
        if diagonal:
            pair.values["peak_shift"] = shift / diagonal
    if maps is None:
        pair.note = "neither npy/ nor heatmaps/ in both runs: predictions only"
        return pair
    ma, mb = maps
    rho = spearman(ma, mb)
    if not math.isnan(rho):
        pair.values["spearman"] = rho
    pair.values["ssim"] = ssim(ma, mb)
    pair.values["iou"] = top_iou(ma, mb, top)
    return pair


def _peak_shift(a: Record, b: Record) -> float | None:
    """Distance in original pixels between the two maps' peaks (the CSV's peak_x, peak_y)."""
    try:
        return math.hypot(int(a["peak_x"]) - int(b["peak_x"]), int(a["peak_y"]) - int(b["peak_y"]))
    except (KeyError, ValueError):
        return None


def _maps(pair: Pair, dir_a: Path, dir_b: Path) -> tuple[tuple[np.ndarray, np.ndarray] | None, float | None]:
    """((map A, map B) or None, the original image's diagonal in pixels or None)."""
    assert pair.a is not None and pair.b is not None
    heat_a, heat_b = pair.a.get("heatmap", ""), pair.b.get("heatmap", "")
    npy_a, npy_b = npy_for(pair.a), npy_for(pair.b)
    if npy_a and npy_b and (dir_a / npy_a).is_file() and (dir_b / npy_b).is_file():
        ma, mb = np.load(dir_a / npy_a, allow_pickle=False), np.load(dir_b / npy_b, allow_pickle=False)
        if ma.ndim == 2 and ma.shape == mb.shape:
            pair.source = "npy"
            return (ma, mb), _diagonal(dir_a, pair.a)
    if heat_a and heat_b:
        ga, size = _reduced_heatmap(dir_a / heat_a)
        gb, _ = _reduced_heatmap(dir_b / heat_b)
        if gb.shape != ga.shape:  # another preprocessing: compare at A's grid
            resized = Image.fromarray(gb).resize((ga.shape[1], ga.shape[0]), Image.Resampling.BILINEAR)
            gb = np.asarray(resized)
        pair.source = "heatmaps"
        return (ga, gb), math.hypot(*size)
    return None, _diagonal(dir_a, pair.a)


def _reduced_heatmap(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    """(the heatmap reduced to at most REDUCED px on its long side, as uint8 (h, w); its original (w, h))."""
    with Image.open(path) as im:
        size = im.size
        gray = im.convert("L")
    factor = math.ceil(max(size) / REDUCED)
    if factor > 1:
        gray = gray.reduce(factor)
    return np.asarray(gray), size


def _diagonal(folder: Path, row: Record) -> float | None:
    """The original image's diagonal, from the size of a picture the run wrote for it (header only)."""
    for key in ("heatmap", "overlay"):
        rel = row.get(key, "")
        if rel and (folder / rel).is_file():
            with Image.open(folder / rel) as im:
                return math.hypot(*im.size)
    return None
