"""OUT as one object: where everything is, how a run prepares it, and how audit and report read it back."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradcam_cli.errors import GradcamError, MachineFault
from gradcam_cli.out import names
from gradcam_cli.out.files import atomic_write, clean_stale_temps, read_json, storage_fault
from gradcam_cli.out.lock import acquire, release
from gradcam_cli.out.manifest import Manifest
from gradcam_cli.out.merge import fold_rank_csvs
from gradcam_cli.out.names import OutputNames
from gradcam_cli.out.resume import ResumeState, plan_resume
from gradcam_cli.out.table import Row, csv_bytes, csv_text, read_records
from gradcam_cli.out.writer import OutputWriter

LogFn = Callable[[str], None]


class OutputFolder:
    """The `-o` folder of `gradcam explain`: heatmaps/, overlays/, npy/, guided/, predictions.csv, run.json,
    and what `audit` and `report` add (summary.json, report.html, thumbnails/)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: dict[str, Any] | None = None

    def lock(self, log: LogFn) -> None:
        """Take OUT's lock (`out.lock`) unless this object holds it already: one run at a time writes here."""
        if self._lock is None:
            try:
                self._lock = acquire(self.path, log)
            except MachineFault as exc:
                raise MachineFault(f"{exc}; nothing was written: make -o writable (or use another -o)") from None

    def unlock(self) -> None:
        if self._lock is not None:
            release(self.path, self._lock)
            self._lock = None

    @property
    def predictions(self) -> Path:
        return self.path / names.PREDICTIONS

    @property
    def run_json(self) -> Path:
        return self.path / names.RUN_JSON

    def file(self, name: str) -> Path:
        """OUT/name for one of `names`' constants (summary.json, report.html, a rank CSV, ...)."""
        return self.path / name

    def check_writable(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise GradcamError(f"-o {self.path}: exists and is not a directory")

    def manifest(self, fields: Mapping[str, Any], fsync: bool = False) -> Manifest:
        return Manifest(self.run_json, fields, fsync)

    def create(self) -> None:
        """OUT and its parents; one that cannot be made (read-only, no space) is a `MachineFault` naming it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fault = storage_fault(exc, self.path)
            if fault is exc:
                raise
            raise fault from None

    def prepare(
        self,
        manifest: Manifest,
        rels: Sequence[str],
        outputs: OutputNames,
        columns: Sequence[str],
        resume: bool,
        log: LogFn,
    ) -> ResumeState:
        """Before anybody writes: create OUT, merge or drop the rank CSVs an earlier job left, remove the
        temporary files of killed runs, and with `resume` decide which images are already done."""
        self.create()
        self.lock(log)
        fold_rank_csvs(self.path, lambda: [csv_text(rel) for rel in rels], resume, columns)
        removed = clean_stale_temps(self.path)
        if removed:
            log(f"removed {removed} temporary file(s) left in {self.path} by an interrupted run")
        if not resume:
            return ResumeState()
        state = plan_resume(self.path, manifest.data, rels, outputs, columns)
        log(f"resume: {len(state.done)} of {len(rels)} images already explained in {self.path}")
        manifest.update(resume={"skipped": len(state.done)})
        return state

    def start_predictions(self, rows: Sequence[Row], columns: Sequence[str]) -> None:
        """predictions.csv with its header and `rows`, replacing whatever was there (atomically)."""
        atomic_write(self.predictions, csv_bytes(rows, columns, header=True))

    def writer(
        self, csv_name: str, columns: Sequence[str], keep_rows: Sequence[Row] = (), fsync: bool = False
    ) -> OutputWriter:
        """The writer of one process: its CSV (predictions.csv, or its rank CSV under torchrun) and OUT's files."""
        return OutputWriter(self.path, self.path / csv_name, columns, keep_rows, fsync=fsync)

    def read(self) -> tuple[list[str], list[dict[str, str]], dict[str, Any]]:
        """(CSV header, rows, run.json) of an explain output folder; a folder that is not one is a usage error."""
        if not self.path.is_dir():
            raise GradcamError(f"{self.path}: no such folder")
        if not self.predictions.is_file():
            raise GradcamError(f"{self.path}: no predictions.csv here; is it the -o folder of `gradcam explain`?")
        try:
            header, rows = read_records(self.predictions)
        except OSError as exc:
            raise GradcamError(f"{self.predictions}: cannot read ({exc})") from None
        if "path" not in header or "status" not in header:
            raise GradcamError(f"{self.predictions}: not a gradcam predictions file (no path/status columns)")
        return header, rows, read_json(self.run_json)
