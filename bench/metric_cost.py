"""What each audit metric costs next to the explanation itself, per image, measured in one run of this script.

    .venv/bin/python bench/metric_cost.py                      # writes bench/results_metrics.md
    .venv/bin/python bench/metric_cost.py --out /tmp/costs.md --device cuda

For every name in `gradcam_cli.audit.metrics.METRIC_NAMES`, one `gradcam explain sample_images` with the demo
model (configs/efficientnet_lite0.yaml: EfficientNet-Lite0, ImageNet weights, 224 px), the 10 photos in one
batch, `--metrics <name>` and otherwise default settings (`pointing` and `energy` with
sample_images/boxes.csv). From each run's run.json `stage_seconds`: `metric:<name>` (that metric's pass) and
`compute` (the explaining forward + backward of the same batch), so every ratio is within one process. A metric
whose pass is not in this build records no `metric:<name>` stage and is reported as not measured.

run.json keeps stage times to the millisecond. `compute` is the batch's first pass through the model (cold), and on
a loaded machine it moves from run to run: the table gives the ratio to the same run's `compute` and to the
median `compute` of all the runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradcam_cli.audit.metrics import ANNOTATED_METRICS, METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "sample_images"
CONFIG = ROOT / "configs" / "efficientnet_lite0.yaml"
BOXES = IMAGES / "boxes.csv"


def explain_args(metric: str, out: Path, device: str, batch: int) -> list[str]:
    """The `gradcam explain` command line of one metric's run."""
    args = [sys.executable, "-m", "gradcam_cli", "explain", str(IMAGES), "-o", str(out), "-c", str(CONFIG)]
    args += ["--device", device, "--batch-size", str(batch), "--metrics", metric, "-q"]
    if metric in ANNOTATED_METRICS:
        args += ["--boxes", str(BOXES)]
    return args


def measure(metric: str, workdir: Path, device: str, batch: int) -> dict[str, float | int | None]:
    """One run: the metric's pass seconds (None when its stage is absent), `compute` seconds, images done."""
    out = workdir / metric
    done = subprocess.run(explain_args(metric, out, device, batch), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"{metric}: exit {done.returncode}: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return {"metric_s": None, "compute_s": None, "images": 0}
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    stages = run.get("stage_seconds", {})
    images = sum(1 for _ in (out / "predictions.csv").open(encoding="utf-8")) - 1
    return {"metric_s": stages.get(f"metric:{metric}"), "compute_s": stages.get("compute"), "images": images}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def table(results: dict[str, dict[str, float | int | None]]) -> list[str]:
    """One row per metric: the pass, per image, and against the explanation of the same run and the median one."""
    computes = [float(r["compute_s"]) for r in results.values() if r["compute_s"]]
    typical = median(computes) if computes else 0.0
    lines = [
        "| `--metrics` | metric pass (s) | s / image | explain, same run (s) | x explain (same run) "
        "| x explain (median run) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for metric, r in results.items():
        seconds, compute, images = r["metric_s"], r["compute_s"], r["images"]
        if seconds is None or compute is None or not images:
            lines.append(f"| `{metric}` | not measured | | | | |")
            continue
        same = f"{seconds / compute:.2f}" if compute > 0 else "n/a"
        med = f"{seconds / typical:.2f}" if typical > 0 else "n/a"
        lines.append(f"| `{metric}` | {seconds:.3f} | {seconds / images:.4f} | {compute:.3f} | {same} | {med} |")
    if computes:
        lines += [
            "",
            f"The explaining forward + backward (`compute`) of the {len(computes)} runs: min {min(computes):.3f} s, "
            f"median {typical:.3f} s, max {max(computes):.3f} s.",
        ]
    return lines


def report(results: dict[str, dict[str, float | int | None]], device: str, batch: int, load: str) -> str:
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = [
        "# What each audit metric costs",
        "",
        f"Measured {today} by `bench/metric_cost.py` in one run, on {platform.machine()} with "
        f"{os.cpu_count()} CPU cores (device `{device}`), torch {torch.__version__}. This is a shared 2-core VM: "
        f"other jobs ran at the same time (load average {load} at the start, "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} at the end), so every second here is inflated and "
        "noisy; the ratios are the figures to read, and even they move with the load.",
        "",
        f"EfficientNet-Lite0 (configs/efficientnet_lite0.yaml, 224 px), the {IMAGES.name} photos in one batch of "
        f"{batch}, one target per image, one `gradcam explain --metrics <name>` per row with default settings "
        "(`--steps 20`, `--baseline blur`, `--sensitivity-samples 10`; `pointing`/`energy` with "
        "sample_images/boxes.csv). Seconds are run.json `stage_seconds`: `metric:<name>` for the pass, "
        "`compute` for the explaining forward + backward; x explain is their ratio, against the same run's "
        "`compute` and against the median `compute` of all the runs (steadier under a changing load). `compute` is "
        "the process's first, cold pass through the model.",
        "",
    ]
    tail = [
        "",
        "not measured: the metric's pass is not in the build that ran the script (no `metric:<name>` stage). "
        "run.json rounds stages to the millisecond, so the cheapest passes are at its resolution.",
        "",
    ]
    return "\n".join(head + table(results) + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=10, help="images per batch (10: sample_images in one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_metrics.md")
    args = parser.parse_args()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    results: dict[str, dict[str, float | int | None]] = {}
    with tempfile.TemporaryDirectory(prefix="metric_cost_") as tmp:
        for metric in METRIC_NAMES:
            results[metric] = measure(metric, Path(tmp), args.device, args.batch)
            print(metric, results[metric], flush=True)
    text = report(results, args.device, args.batch, load)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
