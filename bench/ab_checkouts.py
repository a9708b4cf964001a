"""The same `gradcam explain` on two versions of the code, alternated round by round: did a change move speed?

    .venv/bin/python bench/ab_checkouts.py fe5f86d --rounds 10 --model resnet18

REV is checked out into bench/_out/ab/<rev> (a git worktree) and run from there, with the editable install of
this checkout taken out of its import path; the working tree is the other side. Both run on
bench/_data/photos (bench/make_photos.py) with the bench's settings (batch 16, CPU, 2 workers, random weights),
in alternating order (old, new, then new, old, ...). Prints the medians of the process wall time and of
run.json's wall, render and compute seconds, and the median of the per-round new/old ratios of run.json's wall.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "bench" / "_data" / "photos"
LAUNCHER = """import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, {src!r})
sys.argv = ["gradcam"] + sys.argv[1:]
runpy.run_module("gradcam_cli", run_name="__main__")
"""


def checkout(rev: str) -> Path:
    """A worktree of `rev` under bench/_out/ab, and a launcher that runs its gradcam_cli."""
    where = ROOT / "bench" / "_out" / "ab" / rev
    if not where.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(where), rev], cwd=ROOT, check=True)
    (where / "run_here.py").write_text(LAUNCHER.format(src=str(where)), encoding="utf-8")
    return where


def run(launcher: list[str], out: Path, model: str) -> tuple[float, float, float, float]:
    """(process wall s, run.json wall s, render s, compute s) of one explain."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["explain", str(PHOTOS), "-o", str(out), "--model", model, "--weights", "none", "--batch-size", "16"]
    args += ["--device", "cpu", "--workers", "2", "--quiet"]
    t0 = time.perf_counter()
    subprocess.run([*launcher, *args], cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    stages = json.loads((out / "run.json").read_text(encoding="utf-8"))
    return wall, stages["wall_seconds"], stages["stage_seconds"]["render"], stages["stage_seconds"]["compute"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the other version: a commit, tag or branch")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    if not PHOTOS.is_dir():
        print(f"no {PHOTOS}: run bench/make_photos.py (or make bench) first", file=sys.stderr)
        return 1
    old = checkout(args.rev)
    launchers = {"old": [sys.executable, str(old / "run_here.py")], "new": [sys.executable, "-m", "gradcam_cli"]}
    results: dict[str, list[tuple[float, float, float, float]]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            results[name].append(run(launchers[name], ROOT / "bench" / "_out" / "ab" / f"out_{name}", args.model))
    for name, rows in results.items():
        wall, run_wall, render, compute = (statistics.median(c) for c in zip(*rows, strict=True))
        label = args.rev if name == "old" else "working tree"
        print(f"{label}: process {wall:.2f} s, run {run_wall:.3f} s, render {render:.3f} s, compute {compute:.3f} s")
    ratios = [n[1] / o[1] for o, n in zip(results["old"], results["new"], strict=True)]
    print(f"{args.model}, {args.rounds} rounds: new/old run wall, median of rounds {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
