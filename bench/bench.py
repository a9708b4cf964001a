"""Speed benchmark: gradcam-cli against plain inference and the scripts users write with pytorch-grad-cam/torchcam.

    python bench/bench.py [--rounds 3] [--models resnet18,resnet50] [--skip-memory] [--skip-startup]

Run from the repo root (`make bench`). Every measurement is a whole process on the same folder, in this
order, round after round: E A A2 B B0 C (D), so slow drift of the machine hits all of them alike.

    E  python -c "import torch, torchvision"       start-up only; its median is subtracted from the others
    A  bench/plain_inference.py                     decode + resize + normalise + batched no-grad forward, CSV
    A2 bench/plain_inference.py --channels-last     the same in channels_last memory format
    B  python -m gradcam_cli explain ...            heatmaps, overlays, predictions.csv (channels_last: the
                                                    CPU default)
    B0 ... explain --no-channels-last               the same in NCHW, as A
    C  bench/pgc_script.py                          the same with pytorch-grad-cam
    D  bench/torchcam_script.py                     the same with torchcam (when torchcam is importable)

Then the memory test (peak RSS of B on N small images vs on n) and the start-up test (`gradcam --help`,
`gradcam models`, a usage error and a config error). Prints everything and writes bench/results.md.
Scratch: bench/_data (image folders) and bench/_out (outputs and logs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from make_photos import build_photos, build_small, describe

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
OUT = BENCH / "_out"
DATA = BENCH / "_data"
PY = sys.executable

# goal: (ratio, comparison, bound) per model; ratios are of work times (wall minus E's median)
GOALS: dict[str, list[tuple[str, str, float]]] = {
    "resnet50": [("B/A", "<=", 1.10), ("C/B", ">=", 2.5)],
    "resnet18": [("B/A", "<=", 1.5), ("C/B", ">=", 3.0)],
}
MEMORY_GOAL = 1.10  # peak RSS on the large folder / on the small one
STARTUP_GOAL_S = 1.0
STARTUP_REPEATS = 5

WHAT = {
    "E": "python -c 'import torch, torchvision' (start-up)",
    "A": "plain inference, no grad (floor)",
    "A2": "plain inference, channels_last",
    "B": "gradcam explain",
    "B0": "gradcam explain --no-channels-last",
    "C": "pytorch-grad-cam script",
    "D": "torchcam script",
}

# Runs argv in a fresh process and prints its peak RSS (KiB): RUSAGE_CHILDREN of this wrapper only covers
# that one command (and the descendants it waited for: the largest of them, not their sum).
RSS_WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
    "wall = time.perf_counter() - t\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, wall, rc)\n"
)


class BenchError(RuntimeError):
    pass


# CPU seconds that other processes on the machine used while our timed processes ran (a busy machine skews
# every ratio on 2 cores); summed over all timed runs, with their wall time
FOREIGN = {"cpu": 0.0, "wall": 0.0}
# every timing of E (the same start-up each time): its spread shows the machine itself changing speed during
# the run (another tenant of the host, frequency), which FOREIGN cannot see from inside this machine
E_WALLS: list[float] = []


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (all cores), from /proc/stat; None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def rel(path: Path | str) -> str:
    return os.path.relpath(path, REPO)


def show(argv: Sequence[str]) -> str:
    """argv as a shell line, with the interpreter and repo paths shortened."""
    parts = [rel(a) if os.path.isabs(a) and str(a).startswith(str(REPO)) else str(a) for a in argv]
    return shlex.join(parts)


def run_timed(argv: Sequence[str], log: Path, expect_rc: int = 0) -> tuple[float, float, float]:
    """Run argv to completion from the repo root.

    Returns (wall seconds, CPU seconds of it and its children, CPU seconds used meanwhile by everything else).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0 = machine_busy_seconds()
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.run(list(argv), cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=False)
        wall = time.perf_counter() - t0
    busy1 = machine_busy_seconds()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    other = max(0.0, busy1 - busy0 - cpu) if busy0 is not None and busy1 is not None else 0.0
    FOREIGN["cpu"] += other
    FOREIGN["wall"] += wall
    if proc.returncode != expect_rc:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise BenchError(
            f"exit code {proc.returncode} (expected {expect_rc}) from: {show(argv)}\n  log {rel(log)}:\n    "
            + "\n    ".join(tail)
        )
    return wall, cpu, other


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def csv_rows(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, encoding="utf-8") as fh:
        return max(0, sum(1 for _ in fh) - 1)


def check_outputs(name: str, out: Path, n: int, images: bool) -> None:
    """Each process must have done the whole job: n CSV rows, and n heatmaps and n overlays when it makes them."""
    problems = []
    if csv_rows(out / "predictions.csv") != n:
        problems.append(f"{csv_rows(out / 'predictions.csv')} CSV rows")
    if images:
        for kind in ("heatmaps", "overlays"):
            if count_files(out / kind) != n:
                problems.append(f"{count_files(out / kind)} {kind}")
    if problems:
        raise BenchError(f"{name} in {rel(out)}: expected {n} of each, found " + ", ".join(problems))


def commands(model: str, photos: Path, out: Path, batch: int, workers: int, with_d: bool) -> dict[str, list[str]]:
    """argv of every process, in the order a round runs them (each writes to out/<its name>)."""
    b = str(batch)

    def plain(name: str, *extra: str) -> list[str]:
        script = str(BENCH / "plain_inference.py")
        return [
            PY,
            script,
            str(photos),
            str(out / name),
            "--model",
            model,
            "--batch-size",
            b,
            "--workers",
            str(workers),
            *extra,
        ]

    def explain(name: str, *extra: str) -> list[str]:
        return [
            PY,
            "-m",
            "gradcam_cli",
            "explain",
            str(photos),
            "-o",
            str(out / name),
            "--model",
            model,
            "--weights",
            "none",
            "--batch-size",
            b,
            "--device",
            "cpu",
            "--workers",
            str(workers),
            "--quiet",
            *extra,
        ]

    def script(name: str, path: str) -> list[str]:
        return [PY, str(BENCH / path), str(photos), str(out / name), "--model", model, "--batch-size", b]

    cmds = {
        "E": [PY, "-c", "import torch, torchvision"],
        "A": plain("A"),
        "A2": plain("A2", "--channels-last"),
        "B": explain("B"),
        "B0": explain("B0", "--no-channels-last"),
        "C": script("C", "pgc_script.py"),
    }
    if with_d:
        cmds["D"] = script("D", "torchcam_script.py")
    return cmds


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def goal_met(value: float | None, op: str, bound: float) -> str:
    if value is None:
        return "n/a"
    ok = value <= bound if op == "<=" else value >= bound
    return "yes" if ok else "**no**"


def bench_model(model: str, photos: Path, n: int, args: argparse.Namespace, with_d: bool) -> tuple[list[str], dict]:
    out = OUT / "speed" / model
    cmds = commands(model, photos, out, args.batch_size, args.workers, with_d)
    walls: dict[str, list[float]] = {k: [] for k in cmds}
    cpus: dict[str, list[float]] = {k: [] for k in cmds}
    others: dict[str, list[float]] = {k: [] for k in cmds}
    for r in range(1, args.rounds + 1):
        for name, argv in cmds.items():
            if name != "E":
                shutil.rmtree(out / name, ignore_errors=True)
            wall, cpu, other = run_timed(argv, OUT / "logs" / f"{model}_{name}_{r}.log")
            if name != "E":
                check_outputs(name, out / name, n, images=not name.startswith("A"))
            walls[name].append(wall)
            if name == "E":
                E_WALLS.append(wall)
            cpus[name].append(cpu)
            others[name].append(other)
            print(
                f"  {model} round {r}/{args.rounds} {name}: {wall:6.2f} s wall, {cpu:6.2f} s CPU "
                f"(other processes: {other:.1f} CPU s)",
                flush=True,
            )

    med = {k: statistics.median(v) for k, v in walls.items()}
    start_up = med["E"]
    work = {k: max(med[k] - start_up, 1e-9) for k in cmds if k != "E"}

    def ratio(a: str, b: str) -> float | None:
        return work[a] / work[b] if a in work and b in work else None

    def paired(a: str, b: str) -> float | None:
        """Median over rounds of that round's work ratio: a and b ran minutes apart at most, so a machine that
        slows down for a while (other tenants of the host) shifts both and the ratio less than the medians."""
        if a not in work or b not in work:
            return None
        per_round = [
            max(wa - we, 1e-9) / max(wb - we, 1e-9) for wa, wb, we in zip(walls[a], walls[b], walls["E"], strict=True)
        ]
        return statistics.median(per_round)

    ratios = {
        "B/A": ratio("B", "A"),
        "C/B": ratio("C", "B"),
        "C/A": ratio("C", "A"),
        "D/B": ratio("D", "B"),
        "B/A2": ratio("B", "A2"),  # like for like: both channels_last
        "B0/A": ratio("B0", "A"),  # like for like: both NCHW
        "A2/A": ratio("A2", "A"),  # what the memory format alone is worth
    }
    raw = {k: (med[k.split("/")[0]] / med[k.split("/")[1]] if v is not None else None) for k, v in ratios.items()}
    # CPU-time ratios (CPU s minus E's): less sensitive to other load than wall time, but blind to parallelism
    cpu_med = {k: statistics.median(v) for k, v in cpus.items()}
    cpu_work = {k: max(cpu_med[k] - cpu_med["E"], 1e-9) for k in work}
    cpu_ratio = {
        k: (cpu_work[k.split("/")[0]] / cpu_work[k.split("/")[1]] if v is not None else None) for k, v in ratios.items()
    }

    pairs = {k: paired(*k.split("/")) for k in ratios}
    lines = [f"### {model}", ""]
    rows = []
    for k in cmds:
        rows.append(
            [
                k,
                WHAT[k],
                f"{med[k]:.2f}",
                f"{min(walls[k]):.2f}",
                f"{max(walls[k]):.2f}",
                "-" if k == "E" else f"{work[k]:.2f}",
                "-" if k == "E" else f"{n / work[k]:.1f}",
                f"{statistics.median(cpus[k]):.1f}",
                f"{statistics.median(others[k]):.1f}",
                " ".join(f"{w:.2f}" for w in walls[k]),
            ]
        )
    lines += md_table(
        [
            "",
            "process",
            "median s",
            "min s",
            "max s",
            "work s (- E)",
            "img/s (work)",
            "CPU s",
            "other procs CPU s",
            "all rounds s",
        ],
        rows,
    )
    lines.append("")
    goals = {g[0]: g for g in GOALS.get(model, [])}
    rows = []
    for key, value in ratios.items():
        if value is None:
            continue
        goal = goals.get(key)
        rows.append(
            [
                key,
                fmt_ratio(value),
                fmt_ratio(pairs[key]),
                fmt_ratio(raw[key]),
                fmt_ratio(cpu_ratio[key]),
                f"{goal[1]} {goal[2]:.2f}" if goal else "-",
                goal_met(value, goal[1], goal[2]) if goal else "-",
            ]
        )
    lines += md_table(
        [
            "ratio",
            "work (minus E)",
            "paired: median of per-round ratios",
            "wall (with start-up)",
            "CPU s (minus E's)",
            "goal",
            "met",
        ],
        rows,
    )
    lines.append("")
    return lines, {"median": med, "work": work, "ratios": ratios}


def bench_memory(counts: list[int], args: argparse.Namespace) -> list[str]:
    rows = []
    peaks: dict[int, int] = {}
    for count in counts:
        folder = build_small(count)
        out = OUT / "memory" / f"small_{count}"
        shutil.rmtree(out, ignore_errors=True)
        argv = [
            PY,
            "-m",
            "gradcam_cli",
            "explain",
            str(folder),
            "-o",
            str(out),
            "--model",
            "resnet18",
            "--weights",
            "none",
            "--save",
            "heatmap,overlay",
            "--batch-size",
            str(args.batch_size),
            "--device",
            "cpu",
            "--workers",
            str(args.workers),
            "--quiet",
        ]
        proc = subprocess.run([PY, "-c", RSS_WRAPPER, *argv], cwd=REPO, capture_output=True, text=True, check=False)
        try:
            kib, wall, rc = proc.stdout.split()[-3:]
        except ValueError:
            raise BenchError(f"memory wrapper failed: {proc.stderr.strip()[-2000:]}") from None
        if int(rc) != 0:
            raise BenchError(f"exit code {rc} from: {show(argv)}\n{proc.stderr.strip()[-2000:]}")
        check_outputs("B (memory)", out, count, images=True)
        peaks[count] = int(kib)
        print(f"  memory: {count} images: peak RSS {int(kib) / 1024:.0f} MiB, {float(wall):.1f} s", flush=True)
        rows.append([str(count), describe(folder), f"{int(kib) / 1024:.0f}", f"{float(wall):.1f}"])
    lines = md_table(["images", "folder", "peak RSS MiB", "wall s"], rows)
    lo, hi = min(counts), max(counts)
    if lo != hi:
        r = peaks[hi] / peaks[lo]
        lines += [
            "",
            f"Peak RSS {hi} / {lo} images: **{r:.3f}** (goal <= {MEMORY_GOAL:.2f}: {goal_met(r, '<=', MEMORY_GOAL)})",
        ]
    lines += [
        "",
        "Command (per folder), each in a fresh wrapper process that reads "
        "`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` (the largest single process of the tree, "
        "main or DataLoader worker, not their sum):",
        "",
        "```",
        show(argv),
        "```",
    ]
    return lines


def bench_startup() -> list[str]:
    gradcam = Path(PY).parent / "gradcam"
    base = [str(gradcam)] if gradcam.exists() else [PY, "-m", "gradcam_cli"]
    scratch = OUT / "startup"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    bad = scratch / "bad.yaml"
    bad.write_text("model: resnet18\nbogus_key: 1\n", encoding="utf-8")
    missing_in, missing_out = scratch / "x", scratch / "y"
    cases = [
        ("--help", [*base, "--help"], 0, None),
        ("models", [*base, "models"], 0, None),
        ("usage error (no -o)", [*base, "explain", str(missing_in)], 2, None),
        (
            "config error (unknown key)",
            [*base, "explain", str(missing_in), "-o", str(missing_out), "-c", str(bad)],
            2,
            "bogus_key",
        ),
    ]
    rows = []
    for label, argv, rc, must_say in cases:
        times = []
        for i in range(STARTUP_REPEATS):
            log = OUT / "logs" / f"startup_{i}.log"
            wall, _, _ = run_timed(argv, log, expect_rc=rc)
            times.append(wall)
        if must_say and must_say not in log.read_text(errors="replace"):
            raise BenchError(f"{label}: the message does not name '{must_say}': {log.read_text().strip()}")
        if missing_out.exists():
            raise BenchError(f"{label}: created {rel(missing_out)} although it failed")
        med = statistics.median(times)
        print(f"  start-up: {label}: median {med:.3f} s", flush=True)
        rows.append(
            [label, f"`{show(argv)}`", str(rc), f"{med:.3f}", f"{min(times):.3f}", goal_met(med, "<=", STARTUP_GOAL_S)]
        )
    return md_table(
        ["case", "command", "exit", f"median of {STARTUP_REPEATS} s", "min s", f"< {STARTUP_GOAL_S:.0f} s"], rows
    )


def machine_lines() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    git = (
        subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
        or "-"
    )
    packages = ", ".join(
        f"{d} {version(d)}" for d in ("torch", "torchvision", "grad-cam", "torchcam", "pillow", "numpy")
    )
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores ({usable} usable), memory {mem or 'unknown'}, no GPU used",
        f"- OS: {platform.platform()}; Python {platform.python_version()}",
        f"- packages: {packages}",
        f"- gradcam-cli {version('gradcam-cli')}, git {git}",
        f"- threads: torch default; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of E A A2 B B0 C (D) per model (default 5)")
    parser.add_argument("--models", default="resnet18,resnet50", help="comma-separated torchvision models")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of A and B")
    parser.add_argument("--no-torchcam", action="store_true", help="skip D even if torchcam is installed")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory test")
    parser.add_argument("--memory-counts", default="200,2000", help="small-image counts compared (default 200,2000)")
    parser.add_argument("--skip-startup", action="store_true", help="skip the start-up test")
    parser.add_argument("--results", type=Path, default=BENCH / "results.md", help="markdown report to write")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    with_d = not args.no_torchcam and importlib.util.find_spec("torchcam") is not None
    counts = sorted({int(c) for c in args.memory_counts.split(",")})

    started = dt.datetime.now().astimezone()
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {load_start}: other processes are busy; timings will be skewed", flush=True)
    t_start = time.perf_counter()
    command = shlex.join([rel(PY) if PY.startswith(str(REPO)) else PY, "bench/bench.py", *sys.argv[1:]])
    photos = build_photos()
    n = sum(1 for p in photos.iterdir() if p.suffix in (".jpg", ".png"))
    folder = describe(photos)
    print(f"photos: {rel(photos)}: {folder}", flush=True)
    order = " ".join(["E", "A", "A2", "B", "B0", "C"] + (["D"] if with_d else []))

    report = [
        "# gradcam-cli speed benchmark",
        "",
        f"Date: {started.isoformat(timespec='seconds')}",
        "",
    ]
    if args.rounds < 3:
        report += [f"**Quick check ({args.rounds} round(s)): not the benchmark, which needs at least 3 rounds.**", ""]
    report += [
        "## Machine",
        "",
        *machine_lines(),
        "",
        "## Command",
        "",
        "```",
        command,
        "```",
        "",
        f"Folder `{rel(photos)}`: {folder} (built by `bench/make_photos.py` from real photos).",
        f"Batch size {args.batch_size}, CPU, `--weights none` / `weights=None`, {args.workers} DataLoader workers "
        f"for A and B. Each process is timed whole (wall clock), alternating {order} for {args.rounds} round(s) "
        "per model; medians below. Work = median - median(E); ratios are of work times (the goal column is "
        "judged on them). The paired column is the median over rounds of each round's own ratio (work = that "
        "round's wall minus that round's E): less sensitive to the machine slowing down for part of the run.",
        "",
        "`gradcam explain` runs the model in channels_last memory format on the CPU by default (faster convolutions "
        "here; `--no-channels-last` turns it off). The goals are stated against A, the plain NCHW inference script "
        "a user writes; B/A2 (both channels_last) and B0/A (both NCHW) compare like with like, and A2/A is what the "
        "memory format alone is worth.",
        "",
        "## Speed",
        "",
    ]
    summary: dict[str, dict] = {}
    try:
        print("untimed warm-up of E", flush=True)
        run_timed(
            commands(models[0], photos, OUT, args.batch_size, args.workers, False)["E"], OUT / "logs" / "warmup.log"
        )
        for model in models:
            lines, summary[model] = bench_model(model, photos, n, args, with_d)
            report += lines
        report += ["Processes (for the last model):", ""]
        for k, argv in commands(
            models[-1], photos, OUT / "speed" / models[-1], args.batch_size, args.workers, with_d
        ).items():
            report.append(f"- {k}: `{show(argv)}`")
        report.append("")
        if not args.skip_memory:
            print("memory test", flush=True)
            report += ["## Memory", "", *bench_memory(counts, args), ""]
        if not args.skip_startup:
            print("start-up test", flush=True)
            report += ["## Start-up", "", *bench_startup(), ""]
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = FOREIGN["cpu"] / max(FOREIGN["wall"] * cores, 1e-9)
    quiet = "the machine was quiet" if share < 0.05 else "**the machine was busy: the numbers are skewed; rerun**"
    drift = max(E_WALLS) / min(E_WALLS) if E_WALLS else 1.0
    steady = (
        "steady"
        if drift < 1.2
        else "**not steady: the host slowed down or sped up during the run, so compare ratios within a round "
        "(the paired column), not medians, and rerun when it is calmer**"
    )
    report += [
        f"Other processes used {FOREIGN['cpu']:.0f} CPU s during the timed processes' {FOREIGN['wall']:.0f} s "
        f"({100 * share:.1f} % of {cores} cores): {quiet}. Load average at the start: {load_start}.",
        "",
        f"Start-up E took {min(E_WALLS, default=0):.2f} to {max(E_WALLS, default=0):.2f} s over the rounds "
        f"(slowest / fastest {drift:.2f}): the machine's own speed was {steady}.",
        "",
        f"Total benchmark time: {time.perf_counter() - t_start:.0f} s.",
        "",
    ]
    text = "\n".join(report)
    print()
    print(text)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text, encoding="utf-8")
    print(f"wrote {rel(args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
