"""Throughput of one process against two torchrun processes on the CPU (issue 8).

    python bench/dist_scaling.py [--rounds 3] [--count 192] [--model resnet18] [--batch-size 16]

Run from the repo root. Every measurement is a whole command on the same folder (bench/_data/small_<count>,
real photo crops from make_photos.py), alternating round after round so that drift of the machine hits all
configurations alike:

    1p x 1t   python -m gradcam_cli explain ...                         OMP_NUM_THREADS=1
    1p x Nt   python -m gradcam_cli explain ...                         OMP_NUM_THREADS=<cores>
    2p x 1t   torchrun --standalone --nproc-per-node 2 -m gradcam_cli explain ...   OMP_NUM_THREADS=1 per rank

All with --weights none (random init), --workers 0 (decode in the process itself), the given batch size, CPU.
Three numbers per run: images/s of the run itself from run.json (for torchrun: all images over rank 0's time
from the start of its loop to the end of the merge), the mean of each process's images/s on its own share
(run.json's `ranks`), and the whole command's wall time (start-up, torch import, rendezvous included).
Prints a Markdown table of medians and the load average, which on a shared machine says how much the
numbers can be trusted: another busy process makes a 2-thread process wait for its starved thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from make_photos import build_small, describe

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "_out" / "dist"


def configs(cores: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    py = [sys.executable]
    return {
        "1 process x 1 thread": ([*py, "-m", "gradcam_cli"], {"OMP_NUM_THREADS": "1"}),
        f"1 process x {cores} threads": ([*py, "-m", "gradcam_cli"], {"OMP_NUM_THREADS": str(cores)}),
        "2 processes x 1 thread (torchrun)": (
            [*py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "gradcam_cli"],
            {"OMP_NUM_THREADS": "1"},
        ),
    }


def run_once(prefix: list[str], env_extra: dict[str, str], args: list[str], out: Path) -> tuple[float, float, float]:
    """(images/s of the run, wall seconds of the whole command, images/s of each process on its own share)."""
    if out.exists():
        shutil.rmtree(out)
    env = {**os.environ, **env_extra, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run([*prefix, "explain", *args, "-o", str(out)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(prefix)}\n{proc.stderr[-2000:]}")
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    ips = float(run["images_per_second"])
    per_process = statistics.mean(r["images_per_second"] for r in run["ranks"]) if "ranks" in run else ips
    return ips, wall, per_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=192)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=16)
    opts = parser.parse_args()
    folder = build_small(opts.count)
    cores = os.cpu_count() or 1
    args = [str(folder), "--model", opts.model, "--weights", "none", "--workers", "0", "--device", "cpu", "-q"]
    args += ["--batch-size", str(opts.batch_size)]
    table = configs(cores)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in table}
    loads = [os.getloadavg()[0]]
    for r in range(opts.rounds):
        for i, (name, (prefix, env)) in enumerate(table.items()):
            ips, wall, per_process = run_once(prefix, env, args, OUT / f"c{i}")
            results[name].append((ips, wall, per_process))
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}: {name}: {ips:.1f} img/s in the run, {wall:.1f} s whole command", flush=True)
    base = statistics.median(v[0] for v in results["1 process x 1 thread"])
    print()
    print(f"{describe(folder)}; {opts.model}, --weights none, batch {opts.batch_size}, --workers 0, CPU, {cores} cores")
    print(f"medians of {opts.rounds} rounds; 1-minute load average during the runs: {min(loads):.1f}-{max(loads):.1f}")
    print()
    print("| configuration | images/s (run) | vs 1 x 1 | images/s per process | whole command, s |")
    print("|---|---|---|---|---|")
    for name, values in results.items():
        ips, wall, per_process = (statistics.median(v[k] for v in values) for k in range(3))
        print(f"| {name} | {ips:.1f} | {ips / base:.2f}x | {per_process:.1f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
