"""The benchmark's processes on a CUDA GPU, alternated in one run: what device decoding is worth there.

    python bench/gpu_bench.py [--copies 8] [--rounds 3] [--models resnet50] [--batch-size 32] [--workers 8]

Folder: bench/_data/photos (bench/make_photos.py) copied `--copies` times (480 photos by default, 400-1600 px,
JPEG and PNG). Processes, each timed whole, alternated E A B B1 B2 C per round, medians printed as a Markdown
table (and written to bench/results_gpu.md):

- E: `import torch, torchvision` and a first CUDA allocation (start-up and CUDA context), subtracted from the others;
- A: bench/plain_inference.py on the GPU (Pillow decode + resize in `--workers` DataLoader workers, pinned
  batches, no gradients, a CSV): the floor;
- B: `gradcam explain --device cuda` (defaults: JPEGs decoded by nvJPEG, overlays blended and JPEG-encoded on
  the GPU), heatmaps + overlays + CSV;
- B1: the same with `--decode workers` (Pillow decodes every photo in the workers, as on the CPU);
- B2: B with `--amp bf16`;
- C: bench/pgc_script.py on the GPU (pytorch-grad-cam, one process, as a user writes it). Skipped, with a note
  in the results, when pytorch-grad-cam or OpenCV cannot be imported (a GPU machine without the test extras
  and no network: `make gpu-wheels` here, then carry `.whl`, see bench/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = sys.executable
# what run.json says about how the device paths ran
RUN_JSON_KEYS = (
    "device",
    "amp",
    "decode",
    "device_decoded",
    "decode_device_error",
    "overlay_jpeg",
    "overlay_jpeg_device_error",
    "overlay_jpeg_pillow_fallback",
    "wall_seconds",
    "stage_seconds",
)


def build_folder(copies: int) -> Path:
    photos = BENCH / "_data" / "photos"
    if not photos.is_dir():
        subprocess.run([PY, str(BENCH / "make_photos.py")], cwd=REPO, check=True)
    folder = BENCH / "_data" / f"photos_x{copies}"
    if not folder.is_dir():
        for k in range(copies):
            shutil.copytree(photos, folder / f"copy{k}")
    return folder


def timed(argv: list[str], log: Path) -> float:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=False)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"exit {proc.returncode} from {' '.join(argv)}:\n{log.read_text(errors='replace')[-2000:]}")
    return wall


def explain_argv(folder: Path, out: Path, model: str, args: argparse.Namespace, *extra: str) -> list[str]:
    """`gradcam explain` on the GPU with the run's batch size and workers, plus `extra` flags."""
    return [
        PY,
        "-m",
        "gradcam_cli",
        "explain",
        str(folder),
        "-o",
        str(out),
        "--model",
        model,
        "--weights",
        "none",
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--workers",
        str(args.workers),
        "--quiet",
        *extra,
    ]


def missing_for_c() -> str | None:
    """Why process C cannot run here (pytorch-grad-cam or OpenCV not importable), or None when it can."""
    probe = subprocess.run(
        [PY, "-c", "import cv2, pytorch_grad_cam"], cwd=REPO, capture_output=True, text=True, check=False
    )
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {probe.returncode}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--results", type=Path, default=BENCH / "results_gpu.md")
    parser.add_argument("--device", default="cuda", help="cpu only to check that the script runs to the end")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu_bench.py needs a CUDA GPU")
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none (a --device cpu smoke run)"
    folder = build_folder(args.copies)
    n = sum(1 for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    out = BENCH / "_out" / "gpu"
    lines = [
        "# gradcam-cli on a GPU",
        "",
        f"GPU: {gpu}; CPU cores: {os.cpu_count()}; torch {torch.__version__}; Python {platform.python_version()}",
        f"Folder: {n} photos (bench/_data/photos x {args.copies}); batch {args.batch_size}; "
        f"{args.workers} DataLoader workers for A, B and B1; {args.rounds} rounds, medians; work = process - E.",
        "",
    ]
    skip_c = missing_for_c()
    if skip_c is not None:
        lines += [f"C (pytorch-grad-cam) skipped: {skip_c}.", ""]
    for model in args.models.split(","):
        common = ["--batch-size", str(args.batch_size)]
        start_up = f"import torch, torchvision; x = torch.zeros(1, device='{args.device}')"
        if args.device == "cuda":
            start_up += "; torch.cuda.synchronize()"
        procs = {
            "E": [PY, "-c", start_up],
            "A": [
                PY,
                "bench/plain_inference.py",
                str(folder),
                str(out / model / "A"),
                "--model",
                model,
                *common,
                "--workers",
                str(args.workers),
                "--device",
                args.device,
            ],
            "B": explain_argv(folder, out / model / "B", model, args),
            "B1": explain_argv(folder, out / model / "B1", model, args, "--decode", "workers"),
            "B2": explain_argv(folder, out / model / "B2", model, args, "--amp", "bf16"),
            "C": [
                PY,
                "bench/pgc_script.py",
                str(folder),
                str(out / model / "C"),
                "--model",
                model,
                *common,
                "--device",
                args.device,
            ],
        }
        if skip_c is not None:
            del procs["C"]
        times: dict[str, list[float]] = {k: [] for k in procs}
        for r in range(args.rounds):
            for name, argv in procs.items():
                if name != "E":
                    shutil.rmtree(out / model / name, ignore_errors=True)
                times[name].append(timed(argv, out / "logs" / f"{model}_{name}_{r}.log"))
                print(f"{model} round {r + 1} {name}: {times[name][-1]:.2f} s", flush=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        work = {k: med[k] - med["E"] for k in procs if k != "E"}
        lines += [f"## {model}", "", "| process | median s | work s | img/s (work) | rounds |", "|---|---|---|---|---|"]
        for k, v in times.items():
            w = work.get(k)
            lines.append(
                f"| {k} | {med[k]:.2f} | {'-' if w is None else f'{w:.2f}'} | "
                f"{'-' if w is None else f'{n / w:.0f}'} | {' '.join(f'{t:.2f}' for t in v)} |"
            )
        lines += ["", "| ratio (work) | value |", "|---|---|"]
        for a, b in (("B", "A"), ("B1", "A"), ("B1", "B"), ("B2", "B"), ("C", "B"), ("C", "A")):
            if a in work and b in work:
                lines.append(f"| {a}/{b} | {work[a] / work[b]:.2f} |")
        lines.append("")
        for name in ("B", "B2"):
            run_json = out / model / name / "run.json"
            if run_json.exists():
                manifest = json.loads(run_json.read_text(encoding="utf-8"))
                shown = {k: manifest[k] for k in RUN_JSON_KEYS if k in manifest}
                lines += [f"{name}'s run.json (last round):", "", "```json", json.dumps(shown, indent=1), "```", ""]
    text = "\n".join(lines)
    print(text)
    args.results.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
