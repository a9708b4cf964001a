"""`gradcam diff OUT_A OUT_B`: compare two explain output folders made on the same images, whatever model,
weights, layer, method or precision made them, from what they wrote (predictions.csv, run.json, npy/ or
heatmaps/): no model, no torch, so it takes seconds for thousands of images.

Writes DIFF_OUT/diff.csv (one row per image slot, see `pairs`), DIFF_OUT/diff.json (`summary`) and, with
`report`, DIFF_OUT/diff.html (`page`). Exit code: 3 when a gate fails, else 1 when an image is in one run only
or failed in either, else 0; folders that are not explain outputs, or that share no image, are usage errors.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradcam_cli.audit.diff.gates import diff_gate_value
from gradcam_cli.audit.diff.pairs import COMPARED, Pair, measure, pair_rows
from gradcam_cli.audit.diff.summary import DIFF_COLUMNS, csv_row, summarize_diff
from gradcam_cli.audit.gates import Gate, GateResult
from gradcam_cli.errors import ExitCode, GradcamError
from gradcam_cli.out import names
from gradcam_cli.out.files import atomic_write, write_json
from gradcam_cli.out.folder import OutputFolder
from gradcam_cli.out.table import csv_bytes

LogFn = Callable[[str], None]
DIFF_FOLDER = "diff"  # DIFF_OUT's default: OUT_B/diff


@dataclass
class DiffResult:
    """What `diff` wrote and found; `exit_code` is what the CLI returns."""

    summary: dict[str, Any]
    gates: list[GateResult]
    pairs: list[Pair]
    folder: Path
    report: Path | None = None

    @property
    def exit_code(self) -> int:
        if not all(g.passed for g in self.gates):
            return ExitCode.GATE_FAILED
        counts = self.summary["counts"]
        if counts["pairs"] != counts[COMPARED]:
            return ExitCode.IMAGE_ERRORS
        return ExitCode.OK


def default_out(b: str | Path) -> Path:
    return Path(b) / DIFF_FOLDER


def diff(
    a: str | Path,
    b: str | Path,
    out: str | Path | None = None,
    *,
    top: float = 0.2,
    gates: Sequence[Gate] = (),
    report: bool = False,
    worst: int = 10,
    threads: int | None = None,
    log: LogFn | None = None,
) -> DiffResult:
    """Compare explain output folders `a` (the reference) and `b`; write diff.csv and diff.json into `out`
    (default `b`/diff) and, with `report`, diff.html. `top` is the share of pixels whose overlap (IoU) is
    measured; `gates` are checked on diff.json (see `gates`)."""
    log = log or (lambda message: None)
    if not 0.0 < top < 1.0:
        raise GradcamError(f"--top: expected a share of the pixels between 0 and 1, got {top:g}")
    folder_a, folder_b = OutputFolder(a), OutputFolder(b)
    _, rows_a, run_a = folder_a.read()
    _, rows_b, run_b = folder_b.read()
    pairs = pair_rows(rows_a, rows_b)
    if not any(p.status == COMPARED for p in pairs):
        raise GradcamError(f"{a} and {b} have no image in common (their predictions.csv share no path)")
    target = Path(out) if out is not None else default_out(b)
    if target.resolve() in (folder_a.path.resolve(), folder_b.path.resolve()):
        raise GradcamError(f"-o {target}: write the diff into its own folder, not into OUT_A or OUT_B")
    workers = threads or min(8, os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gradcam-diff") as pool:
        pairs = list(pool.map(lambda p: measure(p, folder_a.path, folder_b.path, top), pairs, chunksize=64))
    summary = summarize_diff(pairs, (run_a, run_b), (str(a), str(b)), top, worst)
    results = [GateResult(g, value, _passes(g, value)) for g in gates for value in [diff_gate_value(summary, g.key)]]
    summary["gates"] = [g.to_json() for g in results]
    summary["passed"] = all(g.passed for g in results)
    try:
        target.mkdir(parents=True, exist_ok=True)
        atomic_write(target / names.DIFF_CSV, csv_bytes((csv_row(p) for p in pairs), DIFF_COLUMNS, header=True))
        write_json(target / names.DIFF_JSON, summary)
    except OSError as exc:
        raise GradcamError(f"-o {target}: cannot write the diff ({exc.strerror or exc})") from None
    result = DiffResult(summary, results, pairs, target)
    if report:
        from gradcam_cli.audit.diff.page import write_page

        result.report = write_page(result, folder_a.path, folder_b.path, threads=workers)
    log(f"diff: {len(pairs)} pairs -> {target / names.DIFF_CSV}")
    return result


def _passes(gate: Gate, value: float | None) -> bool:
    """A gate with nothing to measure fails: a gate that cannot be checked must not pass."""
    return value is not None and (value >= gate.threshold if gate.op == ">=" else value <= gate.threshold)


def summary_lines(result: DiffResult) -> list[str]:
    """A few human lines for the terminal: counts, flips, similarity means (the gates are the caller's to print)."""
    s = result.summary
    c, f, sim = s["counts"], s["flips"], s["similarity"]
    lines = [
        f"{c['compared']} of {c['pairs']} pairs compared ({c['images']} images; "
        + ", ".join(
            f"{k} {c[k]}" for k in ("only_in_a", "only_in_b", "error_in_a", "error_in_b", "error_in_both") if c[k]
        )
        + ")"
        if c["pairs"] != c["compared"]
        else f"{c['compared']} pairs compared ({c['images']} images)"
    ]
    if f["rate"] is not None:
        lines.append(f"top-1 flips {f['flipped']}/{f['images']} ({100 * f['rate']:.1f}%)")
    for key in ("spearman", "ssim", "iou", "peak_shift"):
        st = sim[key]
        if st["count"]:
            lines.append(
                f"{key} mean {st['mean']:.4f} (median {st['median']:.4f}, p10 {st['p10']:.4f}, {st['count']} maps)"
            )
    differ = s["settings"]["differ"]
    if differ:
        lines.append("runs differ in: " + ", ".join(differ))
    lines.append(f"diff -> {result.folder / names.DIFF_JSON}")
    if result.report is not None:
        lines.append(f"page -> {result.report}")
    return lines
