"""What `--fsync` costs: the same run with and without it, as a user starts it (a fresh `gradcam` process).

    .venv/bin/python bench/fsync_cost.py                      # 256 images of 96x96, resnet18 (random weights)
    .venv/bin/python bench/fsync_cost.py --images 1000 --rounds 5 --model toy --out bench/_out/fsync

With `--fsync` every output file and its folder are synced before the CSV row naming them, and the CSV after
each batch, so the cost is a few fsync(2) per image: it depends on the disk (and its cache) far more than on
the CPU. The runs alternate, round after round, so that a burst of load from other processes spreads over
both; the median wall time per mode is reported with the file system OUT is on. `--model toy` uses the tiny
model of tests/toy_models.py, which makes the writes (and so the fsyncs) the whole cost: an upper bound of
the relative cost. The load average is printed: on a shared machine every figure moves with it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, count: int, side: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        path = folder / f"part{i % 8}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, quality=90)


def file_system(path: Path) -> str:
    """The type of the file system `path` is on (from /proc/mounts: the longest mount point above it)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text(encoding="utf-8").splitlines():
            _dev, mount, fstype = line.split()[:3]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def run(images: Path, out: Path, model: list[str], fsync: bool) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "gradcam_cli", "explain", str(images), "-o", str(out), *model, "-q"]
    cmd += ["--device", "cpu", "--batch-size", "16", "--save", "heatmap,overlay,npy"]
    if fsync:
        cmd.append("--fsync")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=("resnet18", "toy"), default="resnet18")
    parser.add_argument("--out", type=Path, help="Where OUT goes (its disk is what is measured). [default: /tmp]")
    args = parser.parse_args()
    if args.model == "toy":
        cfg = Path(tempfile.mkdtemp()) / "toy.yaml"
        cfg.write_text("input_size: [24, 40]\nmean: [0, 0, 0]\nstd: [1, 1, 1]\n", encoding="utf-8")
        model = ["--model", "toy_models:probe", "-c", str(cfg), "--workers", "0"]
    else:
        model = ["--model", "resnet18", "--weights", "none", "--workers", "2"]
    work = Path(tempfile.mkdtemp(prefix="fsync_cost_"))
    out = (args.out or work) / "out"
    out.parent.mkdir(parents=True, exist_ok=True)
    make_images(work / "in", args.images, args.side)
    run(work / "in", out, model, False)  # warm-up: page cache, imports
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for fsync in (False, True):
            seconds[fsync].append(run(work / "in", out, model, fsync))
    files = sum(1 for p in out.rglob("*") if p.is_file())
    plain, synced = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(f"# --fsync cost: {args.images} images of {args.side}x{args.side}, {args.model}, batch 16, 3 files each")
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, {os.cpu_count()} CPUs,")
    print(f"load average {os.getloadavg()[0]:.2f}, OUT on {file_system(out.resolve())} ({files} files per run)")
    print()
    print("| mode | median s (rounds) | img/s | vs. default |")
    print("|---|---:|---:|---:|")
    for name, value, key in (("default", plain, False), ("--fsync", synced, True)):
        rounds = ", ".join(f"{s:.2f}" for s in seconds[key])
        print(f"| {name} | {value:.2f} ({rounds}) | {args.images / value:.1f} | {value / plain:.2f}x |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
