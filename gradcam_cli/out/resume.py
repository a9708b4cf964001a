"""Resume: which images an earlier, interrupted run into OUT already explained, so `--resume` can skip them.

An image counts as done only when every one of its CSV rows says `ok`, names exactly the output files this
run would write for it, and those files exist (files are written atomically, so existing means complete).
Everything else (error rows, images whose outputs were deleted, rows for images no longer among the inputs)
is dropped and explained again, so the final CSV has every image exactly once. Resuming with settings that
change the outputs (model, layers, targets, ...) would mix two runs in one CSV: that is a usage error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcam_cli.errors import GradcamError
from gradcam_cli.out import names
from gradcam_cli.out.files import atomic_write
from gradcam_cli.out.names import OutputNames
from gradcam_cli.out.table import BASE_COLUMNS, Row, csv_bytes, csv_text, iter_rows, read_header, read_records

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

# audit settings that shape only the summary, not the rows: a resume may change them (and a run.json from before
# they were recorded lacks them)
SUMMARY_ONLY_AUDIT_KEYS: tuple[str, ...] = ("groups", "group_min_count")


def _rows_settings(manifest: Mapping[str, Any], key: str) -> Any:
    """run.json's `key` as far as it decides what the rows hold."""
    value = manifest.get(key)
    if key == "audit" and isinstance(value, Mapping):
        return {k: v for k, v in value.items() if k not in SUMMARY_ONLY_AUDIT_KEYS}
    return value


@dataclass
class ResumeState:
    """The earlier run's rows to keep, and the relative paths of the images they cover (to skip)."""

    kept_rows: list[Row] = field(default_factory=list)
    done: set[str] = field(default_factory=set)


def _check_settings(out: Path, manifest: Mapping[str, Any]) -> None:
    run_json = out / names.RUN_JSON
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
    if isinstance(previous.get("preprocessing"), dict):  # recorded before the resize filter was: bilinear
        previous["preprocessing"].setdefault("interpolation", "bilinear")
    for key in RESUME_KEYS:
        if _rows_settings(previous, key) != _rows_settings(now, key):
            raise GradcamError(
                f"--resume: {out} was made with {key} {previous.get(key)!r} but this run has {now.get(key)!r}; "
                "resume with the same settings, or start fresh (no --resume, or another -o)"
            )


def expected_files(outputs: OutputNames, rel: str, row: Row) -> list[str] | None:
    """The files an `ok` row of `rel` must have in this run, or None when the row names other ones."""
    if row.layer not in outputs.maps or not row.target_index.isdigit():
        return None
    files = outputs.for_row(rel, row.layer, int(row.target_index))
    for written, expected in ((row.heatmap, files.heatmap), (row.overlay, files.overlay), (row.guided, files.guided)):
        if written != csv_text(expected):
            return None
    return files.all()


def plan_resume(
    out: Path, manifest: Mapping[str, Any], rels: Sequence[str], outputs: OutputNames, columns: Sequence[str]
) -> ResumeState:
    """Read OUT's predictions.csv and run.json and decide what to keep; nothing is written here.

    `columns` is this run's CSV header: a CSV with another one (other --metrics) is not resumed.
    """
    csv_path = out / names.PREDICTIONS
    if not csv_path.is_file():
        return ResumeState()
    _check_settings(out, manifest)
    try:
        header = read_header(csv_path)
        if tuple(header) != tuple(columns):
            extra = ""
            if tuple(header[: len(BASE_COLUMNS)]) == BASE_COLUMNS:
                extra = " (it was written with other --metrics; resume with the same ones)"
            raise GradcamError(
                f"{csv_path} does not start with this run's predictions.csv header{extra}; cannot resume from it"
            )
        _, records = read_records(csv_path, columns)
    except OSError as exc:
        raise GradcamError(f"--resume: cannot read {csv_path}: {exc.strerror or exc}") from None
    wanted = {csv_text(rel): rel for rel in rels}
    groups: dict[str, list[Row]] = {}
    for record in records:
        groups.setdefault(record["path"], []).append(Row.from_record(record))
    state = ResumeState()
    for shown, group in groups.items():
        rel = wanted.get(shown)
        if rel is None or not all(row.status == "ok" for row in group):
            continue
        needed: list[str] = []
        for row in group:
            files = expected_files(outputs, rel, row)
            if files is None:
                break
            needed.extend(files)
        else:
            if all((out / name).is_file() for name in needed):
                state.kept_rows.extend(group)
                state.done.add(rel)
    return state


def restore_input_order(csv_path: Path, order: Sequence[str], columns: Sequence[str]) -> None:
    """Kept rows came first and new ones after: put them back in input order, as an uninterrupted run has them.

    `order` holds the images' paths as the CSV shows them (csv_text); the sort is stable, so an image's own
    rows keep their order.
    """
    position = {path: i for i, path in enumerate(order)}
    rows = sorted(iter_rows(csv_path, columns), key=lambda row: position.get(row[0], len(position)))  # 0: path
    atomic_write(csv_path, csv_bytes(rows, columns, header=True))
