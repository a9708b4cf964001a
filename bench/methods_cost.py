"""Relative cost of every CAM method: seconds per batch, relative to gradcam, measured in one run.

    .venv/bin/python bench/methods_cost.py                       # resnet18 (random weights), layer4, batch 4, CPU
    .venv/bin/python bench/methods_cost.py --batch 8 --repeats 5 --device cuda --out bench/methods_cost.md

Every method explains the same batch (224x224, one target per image) through `CamEngine.run`, the call the
pipeline makes per batch. After one untimed warm-up run of each, the methods are timed in turn, round after round
(`--rounds`), so that a burst of load from other processes spreads over all of them; the median per method is
reported. Score-CAM and Ablation-CAM, whose one batch takes minutes on a CPU, are timed in the first
`--slow-rounds` rounds only. It also times 5 classes per image (`--target topk:5`) with the one vmapped
backward vs one backward per class. The load average is printed: on a shared CPU every ratio moves with it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradcam_cli.cam.engine import CamEngine
from gradcam_cli.cam.methods import method_names

SLOW = {"scorecam", "ablationcam"}


def make_engine(model: torch.nn.Module, method: str) -> CamEngine:
    return CamEngine(model, {"layer4": model.layer4}, method)


def time_once(engine: CamEngine, x: torch.Tensor, select: object) -> float:
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine.run(x, select)  # type: ignore[arg-type]
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_topk(model: torch.nn.Module, x: torch.Tensor, repeats: int, batched: bool, k: int = 5) -> tuple[float, int]:
    table = torch.arange(k, device=x.device).expand(x.shape[0], k).contiguous() + 281
    with CamEngine(model, {"layer4": model.layer4}, "gradcam") as engine:
        engine.batched_backward = batched
        engine.run(x, lambda logits: table)
        passes = engine.backward_passes
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.run(x, lambda logits: table)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slow-rounds", type=int, default=1, help="rounds that time scorecam and ablationcam")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the top-k comparison")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default=",".join(method_names()))
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = torchvision.models.resnet18(weights=None).eval().to(device)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device)
    targets = torch.tensor([[281 + i] for i in range(args.batch)], device=device)

    def select(logits: torch.Tensor) -> torch.Tensor:
        return targets

    load_before = os.getloadavg()
    started = time.perf_counter()
    methods = args.methods.split(",")
    engines = {m: make_engine(model, m) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for m in methods:  # warm-up (the slow ones warm up in their own first, timed, run: minutes each)
        if m not in SLOW:
            with engines[m] as engine:
                engine.run(x, select)
    for round_no in range(args.rounds):
        for m in methods:
            if m in SLOW and round_no >= args.slow_rounds:
                continue
            with engines[m] as engine:
                times[m].append(time_once(engine, x, select))
            print(f"round {round_no + 1}: {m:16s} {times[m][-1]:9.3f} s/batch", file=sys.stderr, flush=True)
    results = {m: statistics.median(v) for m, v in times.items()}
    topk_batched, passes_batched = time_topk(model, x, args.repeats, batched=True)
    topk_loop, passes_loop = time_topk(model, x, args.repeats, batched=False)
    load_after = os.getloadavg()

    base = results.get("gradcam") or next(iter(results.values()))
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {platform.node() or 'this machine'}: "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device {device}; resnet18 (random weights), layer4 (512x7x7), "
        f"batch {args.batch} at 224x224, one target per image; median of {args.rounds} rounds (methods in turn "
        f"within a round; {', '.join(sorted(SLOW))}: {args.slow_rounds} round). "
        f"Load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after; total {time.perf_counter() - started:.0f} s.",
        "",
        "| method | s / batch | relative to gradcam |",
        "|---|---:|---:|",
    ]
    for method, seconds in results.items():
        lines.append(f"| {method} | {seconds:.3f} | {seconds / base:.2f}x |")
    lines += [
        "",
        f"5 classes per image (`--target topk:5`, gradcam): one vmapped backward {topk_batched:.3f} s/batch "
        f"({passes_batched} autograd.grad call), one backward per class {topk_loop:.3f} s/batch ({passes_loop} calls).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
