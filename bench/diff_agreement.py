"""How far other methods and `--amp bf16` are from float32 Grad-CAM, measured with `gradcam diff`.

Explains sample_images with the demo model (configs/efficientnet_lite0.yaml, CPU) once per variant, saving npy/,
diffs each against plain `gradcam` and prints a markdown table of the mean and 10th percentile of each
similarity, for docs/diff.md and the README.

    python bench/diff_agreement.py [--variants gradcampp,scorecam,bf16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from gradcam_cli import diff, explain, load_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "efficientnet_lite0.yaml"
IMAGES = ROOT / "sample_images"
VARIANTS: dict[str, dict[str, object]] = {
    "gradcampp": {"method": "gradcampp"},
    "xgradcam": {"method": "xgradcam"},
    "hirescam": {"method": "hirescam"},
    "layercam": {"method": "layercam"},
    "scorecam": {"method": "scorecam", "chunk_size": 128},
    "ablationcam": {"method": "ablationcam", "chunk_size": 256},
    "bf16": {"amp": "bf16"},
}


def run(out: Path, **overrides: object) -> float:
    settings = load_settings(CONFIG, workers=0, quiet=True, save=["heatmap", "overlay", "npy"])
    t0 = time.perf_counter()
    explain([IMAGES], out, settings.replace(**overrides))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agreement") as tmp:
        root = Path(tmp)
        run(root / "gradcam")
        rows = []
        for name in args.variants.split(","):
            seconds = run(root / name, **VARIANTS[name])
            s = diff(root / "gradcam", root / name, root / f"d_{name}").summary
            sim, flips = s["similarity"], s["flips"]
            label = "gradcam --amp bf16" if name == "bf16" else name
            rows.append(
                f"| {label} | {sim['spearman']['mean']:.3f} ({sim['spearman']['p10']:.3f}) "
                f"| {sim['ssim']['mean']:.3f} ({sim['ssim']['p10']:.3f}) | {sim['iou']['mean']:.3f} "
                f"({sim['iou']['p10']:.3f}) | {sim['peak_shift']['mean']:.3f} | {flips['flipped']}/{flips['images']} "
                f"| {seconds:.1f} |"
            )
        print("| vs gradcam (float32) | Spearman mean (p10) | SSIM mean (p10) | IoU top 20% mean (p10) "
              "| peak shift (of the diagonal) | top-1 flips | run seconds |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
