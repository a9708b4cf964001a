"""Byte-for-byte output check for refactors: run a fixed set of commands, write the sha256 of every output file.

    .venv/bin/python bench/golden_outputs.py --work /tmp/golden/before --digest /tmp/before.json   # on the old code
    .venv/bin/python bench/golden_outputs.py --work /tmp/golden/after --digest /tmp/after.json     # on the new code
    .venv/bin/python bench/golden_outputs.py --compare /tmp/before.json /tmp/after.json

The commands go through the `gradcam` CLI only (the contract), so the same script runs on any version. Files
that hold times (run.json, summary.json, report.html) are digested after removing their clock fields; every
other file (heatmaps, overlays, npy, guided pictures, thumbnails, the CSVs) is digested as it is. `--work`
must be the same path for both runs: run.json records the input roots. About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# run.json / summary.json keys that carry times or throughput, at any depth
CLOCK_KEYS = {
    "started",
    "finished",
    "generated",
    "wall_seconds",
    "images_per_second",
    "stage_seconds",
    "stage_images_per_second",
    "merge_seconds",
}
R18 = ["--model", "resnet18", "--weights", "none", "--batch-size", "4", "-q"]
DEMO = ["-c", "configs/efficientnet_lite0.yaml", "-q"]


def commands(work: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) per run; each run writes work/<name>."""
    photos, labelled, mixed = work / "in" / "photos", work / "in" / "labelled", work / "in" / "mixed"
    out = {name: str(work / name) for name in NAMES}
    explain = [str(BIN / "gradcam"), "explain"]
    four = [str(photos), "--limit", "4"]
    runs: list[tuple[str, list[str]]] = [
        ("demo", [*explain, "sample_images", "-o", out["demo"], *DEMO]),
        (
            "r18_topk",
            [*explain, str(photos), "-o", out["r18_topk"], *R18, "--target", "topk:2", "--save", "heatmap,overlay,npy"],
        ),
        (
            "r18_gradcampp",
            [
                *explain,
                *four,
                "-o",
                out["r18_gradcampp"],
                *R18,
                "--method",
                "gradcampp",
                "--target",
                "pred",
                "--target",
                "3",
            ],
        ),
        (
            "r18_xgradcam",
            [*explain, *four, "-o", out["r18_xgradcam"], *R18, "--method", "xgradcam", "--preprocess", "crop"],
        ),
        ("r18_hirescam", [*explain, *four, "-o", out["r18_hirescam"], *R18, "--method", "hirescam", "--eigen-smooth"]),
        (
            "r18_layercam",
            [
                *explain,
                *four,
                "-o",
                out["r18_layercam"],
                *R18,
                "--method",
                "layercam",
                "--layer",
                "layer3",
                "--layer",
                "layer4",
            ],
        ),
        (
            "r18_fuse",
            [
                *explain,
                *four,
                "-o",
                out["r18_fuse"],
                *R18,
                "--layer",
                "layer3",
                "--layer",
                "layer4",
                "--fuse",
                "mean",
                "--counterfactual",
            ],
        ),
        (
            "r18_eigencam",
            [*explain, *four, "-o", out["r18_eigencam"], *R18, "--method", "eigencam", "--save", "heatmap,npy"],
        ),
        (
            "r18_eigengradcam",
            [*explain, *four, "-o", out["r18_eigengradcam"], *R18, "--method", "eigengradcam", "--aug-smooth"],
        ),
        ("r18_cam", [*explain, *four, "-o", out["r18_cam"], *R18, "--method", "cam", "--layer", "avgpool:input"]),
        (
            "r18_ablation",
            [
                *explain,
                str(photos),
                "--limit",
                "2",
                "-o",
                out["r18_ablation"],
                *R18,
                "--method",
                "ablationcam",
                "--target",
                "topk:2",
            ],
        ),
        (
            "r18_score",
            [
                *explain,
                str(photos),
                "--limit",
                "1",
                "-o",
                out["r18_score"],
                *R18,
                "--method",
                "scorecam",
                "--chunk-size",
                "64",
            ],
        ),
        (
            "r18_guided",
            [
                *explain,
                *four,
                "-o",
                out["r18_guided"],
                *R18,
                "--method",
                "guided-gradcam",
                "--target",
                "topk:2",
                "--save",
                "heatmap,overlay,npy",
            ],
        ),
        (
            "r18_backprop",
            [
                *explain,
                *four,
                "-o",
                out["r18_backprop"],
                *R18,
                "--method",
                "guided-backprop",
                "--colormap",
                "viridis",
                "--alpha",
                "0.3",
            ],
        ),
        (
            "r18_decode",
            [*explain, str(photos), "-o", out["r18_decode"], *R18, "--decode", "device", "--no-channels-last"],
        ),
        ("mixed", [*explain, str(mixed), "-o", out["mixed"], *R18, "--workers", "0"]),
        (
            "metrics",
            [
                *explain,
                "sample_images",
                "-o",
                out["metrics"],
                *DEMO,
                "--metrics",
                "deletion,insertion,drop,pointing,energy",
                "--boxes",
                "sample_images/boxes.csv",
                "--summary",
                "--steps",
                "8",
            ],
        ),
        (
            "metrics_audit",
            [
                str(BIN / "gradcam"),
                "audit",
                out["metrics"],
                "--fail-under",
                "pointing=0.5",
                "--fail-over",
                "deletion=0.9",
                "-q",
            ],
        ),
        ("metrics_report", [str(BIN / "gradcam"), "report", out["metrics"], "-q"]),
        (
            "labelled",
            [
                *explain,
                str(labelled),
                "-o",
                out["labelled"],
                *DEMO,
                "--target",
                "label",
                "--truth",
                "folders",
                "--only-below",
                "0.9",
                "--summary",
                "--fail-under",
                "accuracy=0.2",
            ],
        ),
        ("resume_full", [*explain, str(photos), "-o", out["resume_full"], *R18, "--target", "topk:2"]),
        ("resume", [*explain, str(photos), "-o", out["resume"], *R18, "--target", "topk:2"]),
        ("resume_again", [*explain, str(photos), "-o", out["resume"], *R18, "--target", "topk:2", "--resume"]),
        (
            "torchrun",
            [
                str(BIN / "torchrun"),
                "--nproc-per-node",
                "2",
                "--master-port",
                "29517",
                "-m",
                "gradcam_cli",
                "explain",
                str(photos),
                "-o",
                out["torchrun"],
                *R18,
                "--target",
                "topk:2",
                "--metrics",
                "drop",
            ],
        ),
    ]
    return runs


NAMES = [
    "demo",
    "r18_topk",
    "r18_gradcampp",
    "r18_xgradcam",
    "r18_hirescam",
    "r18_layercam",
    "r18_fuse",
    "r18_eigencam",
    "r18_eigengradcam",
    "r18_cam",
    "r18_ablation",
    "r18_score",
    "r18_guided",
    "r18_backprop",
    "r18_decode",
    "mixed",
    "metrics",
    "labelled",
    "resume_full",
    "resume",
    "torchrun",
]


def prepare_inputs(work: Path) -> None:
    """photos/: sample_images without the CSV; labelled/: class-name folders; mixed/: photos plus broken files."""
    base = work / "in"
    shutil.rmtree(base, ignore_errors=True)
    photos = base / "photos"
    photos.mkdir(parents=True)
    for p in sorted((ROOT / "sample_images").iterdir()):
        if p.suffix.lower() in (".jpg", ".png"):
            shutil.copy(p, photos / p.name)
    labelled = base / "labelled"
    for folder, name in (
        ("Egyptian cat", "chelsea.png"),
        ("espresso", "coffee.png"),
        ("rocket", "rocket.jpg"),
        ("tabby, tabby cat", "china.jpg"),
        ("tabby", "hubble_deep_field.jpg"),
    ):
        (labelled / folder).mkdir(parents=True)
        shutil.copy(ROOT / "sample_images" / name, labelled / folder / name)
    mixed = base / "mixed"
    mixed.mkdir()
    for name in ("astronaut.png", "flower.jpg", "rocket.jpg"):
        shutil.copy(ROOT / "sample_images" / name, mixed / name)
    (mixed / "broken.jpg").write_bytes(b"not an image" * 10)
    data = (ROOT / "sample_images" / "flower.jpg").read_bytes()
    (mixed / "sub").mkdir()
    (mixed / "sub" / "cut.jpg").write_bytes(data[: len(data) // 3])
    (mixed / "sub" / "empty.png").write_bytes(b"")


def interrupt(out: Path) -> None:
    """Make `out` look like a run killed midway: the last rows cut off and some outputs gone."""
    csv_path = out / "predictions.csv"
    lines = csv_path.read_bytes().split(b"\r\n")
    csv_path.write_bytes(b"\r\n".join(lines[:-6]) + b"\r\n" + lines[-6][:10])
    for name in sorted((out / "heatmaps").iterdir())[:2]:
        name.unlink()


def strip_clock(value: object) -> object:
    if isinstance(value, dict):
        return {k: strip_clock(v) for k, v in value.items() if k not in CLOCK_KEYS}
    if isinstance(value, list):
        return [strip_clock(v) for v in value]
    return value


def digest_file(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(strip_clock(json.loads(data)), sort_keys=True).encode()
    elif path.suffix == ".html":
        data = re.sub(rb'"generated":"[^"]*"', b'"generated":""', data)
    return hashlib.sha256(data).hexdigest()


def digest(work: Path) -> dict[str, str]:
    found = {}
    for name in NAMES:
        for dirpath, _dirs, files in os.walk(work / name):
            for f in files:
                path = Path(dirpath) / f
                found[path.relative_to(work).as_posix()] = digest_file(path)
    return dict(sorted(found.items()))


def run_all(work: Path) -> dict[str, object]:
    work.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        shutil.rmtree(work / name, ignore_errors=True)
    prepare_inputs(work)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("GRADCAM_DEBUG", None)
    codes = {}
    for name, argv in commands(work):
        if name == "resume_again":
            interrupt(work / "resume")
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        codes[name] = proc.returncode
        print(f"{name}: exit {proc.returncode}", file=sys.stderr, flush=True)
        if proc.returncode not in (0, 1, 3):
            print(proc.stderr[-2000:], file=sys.stderr)
    return {"exit_codes": codes, "files": digest(work)}


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    bad = 0
    for name in sorted(set(a["exit_codes"]) | set(b["exit_codes"])):
        if a["exit_codes"].get(name) != b["exit_codes"].get(name):
            print(f"exit code differs: {name}: {a['exit_codes'].get(name)} != {b['exit_codes'].get(name)}")
            bad += 1
    fa, fb = a["files"], b["files"]
    for rel in sorted(set(fa) | set(fb)):
        if fa.get(rel) != fb.get(rel):
            print(f"differs: {rel} ({'missing' if rel not in fa else 'ok'} / {'missing' if rel not in fb else 'ok'})")
            bad += 1
    same = sum(1 for rel in fa if fa[rel] == fb.get(rel))
    print(f"{same} of {len(fa)} files identical, {bad} differences, {len(a['exit_codes'])} commands")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_out" / "golden")
    parser.add_argument("--digest", type=Path, help="where to write the sha256 list (JSON)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    result = run_all(args.work.resolve())
    text = json.dumps(result, indent=1) + "\n"
    if args.digest:
        args.digest.write_text(text)
    print(f"{len(result['files'])} files digested", file=sys.stderr)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
