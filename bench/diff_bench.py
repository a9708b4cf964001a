"""How long `gradcam diff` takes on 10,000 image pairs (the goal: within a minute on 2 CPU cores).

Makes two explain-shaped output folders without a model (predictions.csv, run.json and one 8-bit heatmap PNG
per row at a typical photo size, the second run's maps a perturbed copy of the first's, a few top-1 flips),
then times `gradcam diff A B` in a fresh process, as a user runs it, once from the heatmaps and once from npy/.

    python bench/diff_bench.py [--pairs 10000] [--size 320x240] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

HEADER = [
    "path", "status", "error", "pred_index", "pred_label", "pred_prob", "target_index", "target_label",
    "target_prob", "method", "layer", "cam_max", "peak_x", "peak_y", "heatmap", "overlay",
]  # fmt: skip


def make_run(out: Path, n: int, size: tuple[int, int], seed: int, base: np.ndarray | None, npy: bool) -> np.ndarray:
    """An explain-shaped folder of n rows; maps are `base` (7x7 grids) plus noise when given. Returns the grids."""
    rng = np.random.default_rng(seed)
    grids = rng.random((n, 7, 7)) if base is None else np.clip(base + rng.normal(0, 0.15, base.shape), 0, None)
    (out / "heatmaps").mkdir(parents=True)
    if npy:
        (out / "npy").mkdir()
    rows = []

    def write(i: int) -> list[str]:
        rel = f"c{i % 100:02d}/img{i:05d}.jpg"
        grid = grids[i]
        heat = Image.fromarray(np.uint8(255 * grid / max(grid.max(), 1e-9))).resize(size, Image.Resampling.BILINEAR)
        (out / "heatmaps" / rel).parent.mkdir(exist_ok=True)
        heat.save(out / "heatmaps" / f"{rel}.png")
        if npy:
            (out / "npy" / rel).parent.mkdir(exist_ok=True)
            np.save(out / "npy" / f"{rel}.npy", grid.astype(np.float32))
        peak = np.unravel_index(int(np.argmax(grid)), grid.shape)
        pred = i % 10 if seed == 0 or i % 50 else (i + 1) % 10  # 2% flips in the second run
        px, py = int((peak[1] + 0.5) * size[0] / 7), int((peak[0] + 0.5) * size[1] / 7)
        label = f"class {pred}"
        head = [rel, "ok", "", str(pred), label, "0.9", str(pred), label, "0.9", "gradcam", "layer4", "1.0"]
        return [*head, str(px), str(py), f"heatmaps/{rel}.png", ""]

    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(write, range(n)))
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        writer.writerows(rows)
    (out / "run.json").write_text(json.dumps({"model": "synthetic", "method": "gradcam", "seed": seed}))
    return grids


def timed_diff(a: Path, b: Path, target: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gradcam_cli", "diff", str(a), str(b), "-o", str(target), "-q"])
    seconds = time.perf_counter() - t0
    if done.returncode not in (0, 1, 3):
        raise SystemExit(f"gradcam diff failed with exit {done.returncode}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--size", default="320x240", help="heatmap size WxH (the original photos' size)")
    parser.add_argument("--keep", type=Path, help="make the folders here and keep them")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    root = args.keep or Path(tempfile.mkdtemp(prefix="diffbench"))
    try:
        t0 = time.perf_counter()
        base = make_run(root / "a", args.pairs, size, 0, None, npy=True)  # type: ignore[arg-type]
        make_run(root / "b", args.pairs, size, 1, base, npy=True)  # type: ignore[arg-type]
        print(f"made 2 x {args.pairs} rows at {size[0]}x{size[1]} in {time.perf_counter() - t0:.1f} s")
        npy_s = timed_diff(root / "a", root / "b", root / "d_npy")
        for run in ("a", "b"):  # the same folders without npy/: the heatmap path
            shutil.rmtree(root / run / "npy")
        heat_s = timed_diff(root / "a", root / "b", root / "d_heat")
        summary = json.loads((root / "d_heat" / "diff.json").read_text())
        print(f"gradcam diff, {args.pairs} pairs from heatmaps/: {heat_s:.1f} s ({args.pairs / heat_s:.0f} pairs/s)")
        print(f"gradcam diff, {args.pairs} pairs from npy/:      {npy_s:.1f} s ({args.pairs / npy_s:.0f} pairs/s)")
        print(f"heatmaps/npy time ratio {heat_s / npy_s:.2f}; flips found {summary['flips']['flipped']}")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
