"""How far `--amp bf16` (or fp16) maps are from float32 ones, for every method: per image, after normalisation.

    python bench/amp_fidelity.py [--config configs/efficientnet_lite0.yaml] [--amp bf16] [--device cpu]
                                 [--methods gradcam,scorecam] [--limit N] [--results FILE]

`gradcam explain` runs twice per method on the same images (sample_images by default), once in float32 and
once with `--amp`, saving the raw layer-resolution maps (`--save npy`). Each map is then made what a heatmap
is before rounding (bilinear upsampling to the model input, min-max to [0, 1]: `render.heatmap`'s
`upsample_normalize`) and the two versions of an image are compared by

- Spearman's rank correlation of their pixels (ties get their average rank): does the order of "more
  evidence here than there" survive;
- the largest absolute difference of a pixel, in units of the map's range (0 = the same map, 1 = a pixel
  went from the least to the most evidence).

Prints, per method, the median and worst image of each, the images whose top-1 class changed (their maps
explain another class, so they are left out of the map columns), and both runs' times (on a CPU bf16 says
nothing about a GPU's speed), as a Markdown table; `--results` appends it to a file. `--model NAME` uses a
torchvision model with random weights instead of the config (for a machine without the demo packages).
`--reuse` compares the outputs of an earlier run instead of running again. Scratch: bench/_out/amp_fidelity.
"""

from __future__ import annotations

import argparse
import csv
import platform
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a flat array, tied values sharing the mean of their ranks (Spearman's convention)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends - 1) / 2.0
    out = np.empty(len(values), dtype=np.float64)
    out[order] = np.repeat(mean_rank, ends - starts)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the ranks; 1.0 when both maps are constant (nothing to order), 0.0 when one is."""
    ra, rb = ranks(a.ravel()), ranks(b.ravel())
    sa, sb = ra.std(), rb.std()
    if sa == 0 or sb == 0:
        return 1.0 if sa == sb else 0.0
    return float(((ra - ra.mean()) * (rb - rb.mean())).mean() / (sa * sb))


def normalised(npy: Path, size: tuple[int, int]) -> np.ndarray:
    """The raw map as a heatmap is before rounding: upsampled to `size` and min-max normalised to [0, 1]."""
    import torch

    from gradcam_cli.render.heatmap import upsample_normalize

    cam = torch.from_numpy(np.load(npy)).float()
    return upsample_normalize(cam, size, (0.0, 0.0, float(size[1]), float(size[0]))).numpy()


def run(out: Path, args: argparse.Namespace, method: str, amp: str) -> float | None:
    """`explain` into `out` with `amp`; its seconds, or None when `--reuse` found the outputs there."""
    from gradcam_cli import explain, load_settings

    if args.reuse and (out / "predictions.csv").is_file():
        return None
    shutil.rmtree(out, ignore_errors=True)
    flags = {"model": args.model, "weights": "none"} if args.model else {}
    config = None if args.model else args.config
    settings = load_settings(
        config, method=method, amp=amp, device=args.device, save="npy", workers=0, limit=args.limit, **flags
    )
    t0 = time.perf_counter()
    explain([args.folder], out, settings)
    return time.perf_counter() - t0


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def rows_of(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        return {row["path"]: row for row in csv.DictReader(fh) if row["status"] == "ok"}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        return f"{names[0]}, {len(names)} logical cores" if names else platform.machine()
    except OSError:
        return platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "efficientnet_lite0.yaml"))
    parser.add_argument("--folder", type=Path, default=REPO / "sample_images")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="", help="comma-separated; default every built-in method")
    parser.add_argument("--limit", type=int, default=None, help="at most N images")
    parser.add_argument("--size", type=int, default=224, help="side of the square the maps are compared at")
    parser.add_argument("--results", type=Path, default=None, help="append the table to this file")
    parser.add_argument("--model", default="", help="a torchvision model, random weights, instead of --config")
    parser.add_argument("--reuse", action="store_true", help="compare the outputs of an earlier run")
    args = parser.parse_args()
    import torch

    from gradcam_cli import __version__
    from gradcam_cli.config import METHOD_NAMES
    from gradcam_cli.errors import GradcamError

    methods = [m for m in args.methods.split(",") if m] or list(METHOD_NAMES)
    what = f"model {args.model} (random weights)" if args.model else f"config {Path(args.config).name}"
    scratch = BENCH / "_out" / "amp_fidelity" / f"{args.model or Path(args.config).stem}_{args.device}"
    lines = [
        f"### --amp {args.amp} vs float32, {args.device} ({device_name(args.device)})",
        "",
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}; torch {torch.__version__}; gradcam-cli "
        f"{__version__}; {what}; images {args.folder.name}"
        f"{'' if args.limit is None else f' (first {args.limit})'}; maps compared at {args.size}x{args.size} "
        "after upsampling and min-max normalisation.",
        "",
        "| method | images | Spearman median | Spearman worst | max abs diff median | max abs diff worst | "
        "top-1 changed (left out) | s float32 | s amp |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    size = (args.size, args.size)
    for method in methods:
        runs = {}
        took = {}
        try:
            for amp in ("none", args.amp):
                out = scratch / f"{method}_{amp}"
                took[amp] = run(out, args, method, amp)
                runs[amp] = (out, rows_of(out))
        except GradcamError as exc:  # the method cannot explain this model's layer (cam without GAP + Linear)
            lines.append(f"| {method} | not run: {str(exc).split(';')[0]} | | | | | | | |")
            print(lines[-1], flush=True)
            continue
        (full_out, full_rows), (amp_out, amp_rows) = runs["none"], runs[args.amp]
        rhos, diffs, changed = [], [], 0
        for path, row in full_rows.items():
            other = amp_rows.get(path)
            if other is None:
                continue
            if row["target_index"] != other["target_index"]:  # a near tie flipped: another class explained
                changed += 1
                continue
            a = normalised(full_out / "npy" / f"{path}.npy", size)
            b = normalised(amp_out / "npy" / f"{path}.npy", size)
            rhos.append(spearman(a, b))
            diffs.append(float(np.abs(a - b).max()))
        n = len(rhos)
        lines.append(
            f"| {method} | {n} | {statistics.median(rhos):.4f} | {min(rhos):.4f} | {statistics.median(diffs):.3f} | "
            f"{max(diffs):.3f} | {changed} | {seconds(took['none'])} | {seconds(took[args.amp])} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.results is not None:
        with open(args.results, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
