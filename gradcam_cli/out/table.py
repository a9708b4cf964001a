"""predictions.csv: its columns, the `Row` type every writer builds, and the one reader.

The file is always valid UTF-8: text is encoded with backslash escapes where it cannot be (a file name
that is not UTF-8 appears as `\\udcff`), and read back with surrogate escapes, so that no byte of a damaged
file is lost or stops a reader. Rows are CRLF-terminated with minimal quoting (the csv module's defaults).

A process killed while appending can leave a last line without its line end; every reader drops that row
(its image is explained again on --resume), and a header that is not the expected one is a usage error.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from gradcam_cli.errors import GradcamError

BASE_COLUMNS: tuple[str, ...] = (
    "path",
    "status",
    "error",
    "pred_index",
    "pred_label",
    "pred_prob",
    "target_index",
    "target_label",
    "target_prob",
    "method",
    "layer",
    "cam_max",
    "peak_x",
    "peak_y",
    "heatmap",
    "overlay",
)
# added after the base columns in a later version: new columns are only ever appended, so each keeps its place
TAIL_COLUMNS: tuple[str, ...] = ("true_index", "true_label", "correct", "guided")
ENCODING, WRITE_ERRORS, READ_ERRORS = "utf-8", "backslashreplace", "surrogateescape"


def columns_for(metric_columns: Sequence[str] = ()) -> tuple[str, ...]:
    """The header of predictions.csv: the base columns, the tail columns, then every metric column.

    One policy for every optional column: it is always there, empty where its feature is off (no ground
    truth, no guided output, a metric not asked for). The header is the same for every run of a version,
    so a script can read any column of any run, and a column never moves: later ones are appended.
    """
    return BASE_COLUMNS + TAIL_COLUMNS + tuple(metric_columns)


def csv_text(text: str) -> str:
    """How `text` (a path) reads back from the CSV: names that are not UTF-8 come back escaped."""
    return text.encode(ENCODING, WRITE_ERRORS).decode(ENCODING)


@dataclass
class Row:
    """One line of predictions.csv: one (image, target, map), or one image that failed or was skipped.

    Values are the CSV's text; the constructors below are the one place that formats numbers. `metrics`
    holds the metric columns (`deletion_auc`, ...) of the rows that have them.
    """

    path: str
    status: str
    error: str = ""
    pred_index: str = ""
    pred_label: str = ""
    pred_prob: str = ""
    target_index: str = ""
    target_label: str = ""
    target_prob: str = ""
    method: str = ""
    layer: str = ""
    cam_max: str = ""
    peak_x: str = ""
    peak_y: str = ""
    heatmap: str = ""
    overlay: str = ""
    true_index: str = ""
    true_label: str = ""
    correct: str = ""
    guided: str = ""
    metrics: dict[str, str] = field(default_factory=dict)

    @classmethod
    def failed(cls, path: str, message: str, method: str) -> Row:
        """An image that could not be explained, and why (one line)."""
        return cls(path, "error", error=message, method=method)

    @classmethod
    def skipped(cls, path: str, reason: str, pred: tuple[int, str, float], method: str) -> Row:
        """An image `--only-below` left out: its top-1 prediction (index, name, probability) and why."""
        return cls(path, "skipped", reason, str(pred[0]), pred[1], f"{pred[2]:.6f}", method=method)

    @classmethod
    def explained(
        cls,
        path: str,
        method: str,
        layer: str,
        pred: tuple[int, str, float],
        target: tuple[int, str, float],
        cam_max: float,
        peak: tuple[int, int],
        truth: tuple[int, str] | None,
        heatmap: str = "",
        overlay: str = "",
        guided: str = "",
    ) -> Row:
        """One map: the prediction and the explained target (index, name, probability), the map's maximum and
        peak (x, y) in original pixels, the true class when known, and the files written for it."""
        return cls(
            path,
            "ok",
            pred_index=str(pred[0]),
            pred_label=pred[1],
            pred_prob=f"{pred[2]:.6f}",
            target_index=str(target[0]),
            target_label=target[1],
            target_prob=f"{target[2]:.6f}",
            method=method,
            layer=layer,
            cam_max=f"{cam_max:.6g}",
            peak_x=str(peak[0]),
            peak_y=str(peak[1]),
            heatmap=heatmap,
            overlay=overlay,
            true_index="" if truth is None else str(truth[0]),
            true_label="" if truth is None else truth[1],
            correct="" if truth is None else ("true" if truth[0] == pred[0] else "false"),
            guided=guided,
        )

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> Row:
        """A row read back from a CSV (kept by --resume); columns that are not fields are its metrics."""
        row = cls(**{k: v for k, v in record.items() if k in _FIELDS})  # type: ignore[arg-type]
        row.metrics = {k: v for k, v in record.items() if k not in _FIELDS}
        return row

    def values(self, columns: Sequence[str]) -> list[str]:
        """The row's text under each of `columns` ("" where it has none)."""
        return [getattr(self, c) if c in _FIELDS else self.metrics.get(c, "") for c in columns]


_FIELDS = frozenset(f.name for f in fields(Row)) - {"metrics"}


def csv_bytes(rows: Iterable[Row | Sequence[str]], columns: Sequence[str], header: bool = False) -> bytes:
    """Rows (Row objects or lists of values in `columns` order) as the CSV holds them."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    if header:
        writer.writerow(columns)
    writer.writerows(r.values(columns) if isinstance(r, Row) else r for r in rows)
    return buf.getvalue().encode(ENCODING, WRITE_ERRORS)


def read_header(path: Path) -> list[str]:
    """The first line of a CSV, split into column names ([] for an empty file)."""
    with open(path, encoding=ENCODING, errors=READ_ERRORS, newline="") as fh:
        return next(csv.reader(fh), [])


def iter_rows(path: Path, columns: Sequence[str], what: str = "the predictions.csv header") -> Iterator[list[str]]:
    """The complete rows of a CSV whose header must be `columns`, one at a time, as lists of text.

    A last line cut off by a killed process (no line end, or a quoted field left open) is dropped; a header
    other than `columns` raises GradcamError naming `what` was expected.
    """
    columns = tuple(columns)
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        complete = size == 0 or (fh.seek(-1, os.SEEK_END) >= 0 and fh.read(1) == b"\n")
    with open(path, encoding=ENCODING, errors=READ_ERRORS, newline="") as fh:
        reader = csv.reader(fh)
        held: list[str] | None = None
        try:
            if tuple(next(reader, ())) != columns:
                raise GradcamError(f"{path} does not start with {what}")
            for record in reader:
                if held is not None and len(held) == len(columns):
                    yield held
                held = record
        except csv.Error as exc:
            if complete:
                raise GradcamError(f"{path}: not a readable CSV ({exc}); remove it or start a fresh run") from None
            held = None  # the cut-off last line
        if held is not None and complete and len(held) == len(columns):
            yield held


def read_records(path: Path, columns: Sequence[str] | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """(header, complete rows as dicts); the header must be `columns` when given, else it is taken as it is."""
    header = list(columns) if columns is not None else read_header(path)
    return header, [dict(zip(header, values, strict=True)) for values in iter_rows(path, header)]
