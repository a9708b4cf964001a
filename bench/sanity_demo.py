"""The sanity checks on the demo model: mean randomization and random_logit per method, and what they cost.

    .venv/bin/python bench/sanity_demo.py                          # every method, sample_images/, CPU
    .venv/bin/python bench/sanity_demo.py --methods gradcam,guided-backprop --out bench/_out/sanity.md

One `gradcam explain sample_images -c configs/efficientnet_lite0.yaml --metrics randomization,random_logit`
process per method (ImageNet-trained EfficientNet-Lite0, layer `_avg_pooling:input`, the predicted class, head
randomization, seed 0), on the CPU. The table gives the means over the images' maps of the two columns, and
from run.json's `stage_seconds` the seconds of `compute` (the run's own forward and backward, the maps) and
of each metric pass, with the pass's seconds divided by `compute`; then `--cascade-methods` once more with
`--randomization cascade`: the number of steps, the mean of the head step and of the last step (every block
random), and the seconds. Score-CAM, whose 1280 masked forwards per
map take minutes per image on a CPU, runs on the first `--slow-limit` images only.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradcam_cli.cam.methods import BUILT_IN_METHODS  # noqa: E402

SLOW = {"scorecam"}
METRICS = ("randomization", "random_logit")


def run_method(method: str, out: Path, limit: int | None, cascade: bool = False) -> dict[str, object]:
    """One explain process; returns the means, the image count, the stage seconds and, for a cascade, the
    number of steps and the mean of the curves' last step (the whole model random)."""
    command = [
        sys.executable, "-m", "gradcam_cli", "explain", str(ROOT / "sample_images"), "-o", str(out),
        "-c", str(ROOT / "configs" / "efficientnet_lite0.yaml"), "--method", method, "--device", "cpu",
        "--metrics", ",".join(METRICS), "-q",
    ]  # fmt: skip
    if limit is not None:
        command += ["--limit", str(limit)]
    if cascade:
        command += ["--randomization", "cascade"]
    subprocess.run(command, check=True, cwd=ROOT)
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
    stages = json.loads((out / "run.json").read_text(encoding="utf-8"))["stage_seconds"]
    means = {m: statistics.fmean(float(r[m]) for r in rows if r[m] != "") for m in METRICS}
    found = {"method": method, "maps": len(rows), "stages": stages, **means}
    if cascade:
        curves = [np.load(out / "randomization" / f"{r['path']}.npy") for r in rows]
        found["steps"] = len(curves[0])
        found["last"] = float(np.nanmean([c[-1] for c in curves]))
    return found


def table(results: list[dict[str, object]]) -> list[str]:
    lines = [
        "| method | maps | mean randomization | mean random_logit | compute s | metric:randomization s (x compute) "
        "| metric:random_logit s (x compute) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stages = r["stages"]
        assert isinstance(stages, dict)
        compute = float(stages["compute"])
        rnd, rlg = float(stages["metric:randomization"]), float(stages["metric:random_logit"])
        lines.append(
            f"| {r['method']} | {r['maps']} | {float(r['randomization']):.3f} | {float(r['random_logit']):.3f} "  # type: ignore[arg-type]
            f"| {compute:.2f} | {rnd:.2f} ({rnd / compute:.2f}x) | {rlg:.2f} ({rlg / compute:.2f}x) |"
        )
    return lines


def cascade_table(results: list[dict[str, object]]) -> list[str]:
    lines = [
        "| method | maps | steps | mean randomization (head step) | mean of the last step (all blocks random) "
        "| compute s | metric:randomization s (x compute) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        stages = r["stages"]
        assert isinstance(stages, dict)
        compute, rnd = float(stages["compute"]), float(stages["metric:randomization"])
        lines.append(
            f"| {r['method']} | {r['maps']} | {r['steps']} | {float(r['randomization']):.3f} "  # type: ignore[arg-type]
            f"| {float(r['last']):.3f} | {compute:.2f} | {rnd:.2f} ({rnd / compute:.1f}x) |"  # type: ignore[arg-type]
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(BUILT_IN_METHODS))
    parser.add_argument("--slow-limit", type=int, default=2, help="images for Score-CAM")
    parser.add_argument("--cascade-methods", default="gradcam,guided-backprop", help="also run these in cascade")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results_sanity.md")
    args = parser.parse_args()
    scratch = ROOT / "bench" / "_out" / "sanity"
    results = []
    for method in args.methods.split(","):
        limit = args.slow_limit if method in SLOW else None
        results.append(run_method(method, scratch / method, limit))
        print(table(results)[-1], flush=True)
    cascades = []
    for method in filter(None, args.cascade_methods.split(",")):
        cascades.append(run_method(method, scratch / f"{method}-cascade", None, cascade=True))
        print(cascade_table(cascades)[-1], flush=True)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    import torch

    text = [
        "# Sanity checks on the demo model: randomization and random logit",
        "",
        f"Date: {date}; {platform.machine()} CPU, {os.cpu_count()} cores ({platform.platform()}), torch "
        f"{torch.__version__}, Python {platform.python_version()}; load average at the end "
        f"{os.getloadavg()[0]:.2f} (other processes shared the cores: the seconds are indicative).",
        "",
        "```sh",
        f".venv/bin/python bench/sanity_demo.py --methods {args.methods} --slow-limit {args.slow_limit} "
        f"--cascade-methods {args.cascade_methods}",
        "```",
        "",
        "ImageNet-trained EfficientNet-Lite0 (configs/efficientnet_lite0.yaml: layer `_avg_pooling:input`, 224 px, "
        "the predicted class), the images of sample_images/ (Score-CAM: the first "
        f"{args.slow_limit}), `--metrics randomization,random_logit`, head randomization (the head is `_fc`), "
        "seed 0, CPU. Means over the maps; seconds from run.json's `stage_seconds` (`compute`: the run's own "
        "forward, backward and maps).",
        "",
        *table(results),
        "",
        "`--randomization cascade` (the same images; after the head, one block at a time down to the stem):",
        "",
        *cascade_table(cascades),
        "",
    ]
    args.out.write_text("\n".join(text), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
