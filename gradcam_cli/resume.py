"""Resume: which images a previous, interrupted run in OUT already explained, so `--resume` can skip them.

An image counts as done only when every one of its CSV rows says `ok`, names exactly the output files this
run would write for it, and those files exist (files are written atomically, so existing means complete).
Everything else -- error rows, images whose outputs were deleted, rows for images no longer among the
inputs -- is dropped and explained again, so the final CSV has every image exactly once. Resuming with
settings that change the outputs (model, layers, targets, ...) would mix two runs in one CSV: that is a
usage error. No torch here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcam_cli.errors import GradcamError
from gradcam_cli.sinks import CSV_COLUMNS, CSV_ENCODING, CSV_ERRORS, read_csv_rows

# run.json keys that must match for the old rows to be what this run would write
RESUME_KEYS: tuple[str, ...] = (
    "model",
    "weights",
    "layers",
    "method",
    "targets",
    "preprocessing",
    "save",
    "colormap",
    "alpha",
    "amp",
    "seed",
    "audit",  # metrics, steps, baseline, annotations, sampling: the metric columns must mean the same
    "method_options",  # counterfactual, smoothing, fusion: the maps must mean the same
    "ground_truth",  # `--target label` classes and the true_* columns
)

# (relative path of the image, one of its CSV rows) -> output files the row must have, or None if it names others
ExpectedOutputs = Callable[[str, Mapping[str, str]], "list[str] | None"]


def csv_text(text: str) -> str:
    """How a path appears in the CSV (file names that are not UTF-8 are escaped there)."""
    return text.encode(CSV_ENCODING, CSV_ERRORS).decode(CSV_ENCODING)


@dataclass
class ResumeState:
    """The previous run's rows to keep, and the relative paths of the images they cover (to skip)."""

    kept_rows: list[dict[str, str]] = field(default_factory=list)
    done: set[str] = field(default_factory=set)


def _check_settings(out: Path, manifest: Mapping[str, Any]) -> None:
    run_json = out / "run.json"
    if not run_json.is_file():
        raise GradcamError(
            f"--resume: {out} has a predictions.csv but no run.json, so the settings it was made with are "
            "unknown; run without --resume to start fresh"
        )
    try:
        previous = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise GradcamError(f"--resume: cannot read {run_json}: {exc}") from None
    if not isinstance(previous, dict):
        raise GradcamError(f"--resume: {run_json} is not a run.json written by gradcam")
    now = json.loads(json.dumps(dict(manifest)))  # tuples -> lists, as they were stored
    for key in RESUME_KEYS:
        if previous.get(key) != now.get(key):
            raise GradcamError(
                f"--resume: {out} was made with {key} {previous.get(key)!r} but this run has {now.get(key)!r}; "
                "resume with the same settings, or start fresh (no --resume, or another -o)"
            )


def plan_resume(
    out: Path,
    manifest: Mapping[str, Any],
    rels: Sequence[str],
    expected_outputs: ExpectedOutputs,
    columns: Sequence[str] = CSV_COLUMNS,
) -> ResumeState:
    """Read OUT's predictions.csv and run.json and decide what to keep; nothing is written here.

    `columns` is this run's CSV header (CSV_COLUMNS plus its metric columns): a CSV with another header is
    not resumed."""
    csv_path = out / "predictions.csv"
    if not csv_path.is_file():
        return ResumeState()
    _check_settings(out, manifest)
    try:
        rows = read_csv_rows(csv_path, columns)
    except OSError as exc:
        raise GradcamError(f"--resume: cannot read {csv_path}: {exc.strerror or exc}") from None
    wanted = {csv_text(rel): rel for rel in rels}
    groups: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault(row["path"], []).append(row)
    state = ResumeState()
    for shown, group in groups.items():
        rel = wanted.get(shown)
        if rel is None or not all(row["status"] == "ok" for row in group):
            continue
        needed: list[str] = []
        for row in group:
            files = expected_outputs(rel, row)
            if files is None:
                break
            needed.extend(files)
        else:
            if all((out / name).is_file() for name in needed):
                state.kept_rows.extend(group)
                state.done.add(rel)
    return state
