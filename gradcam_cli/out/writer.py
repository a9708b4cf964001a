"""The writer of a run: image files encoded and written on threads, CSV rows appended once their files exist.

Files are encoded and written on a small thread pool (Pillow and zlib release the GIL while encoding) fed
through a bounded window, so compute does not wait for disk and memory stays flat. A batch's rows go to the
CSV only after that batch's files are on disk, in one write(2) on an O_APPEND descriptor: a row that says
`ok` always has its outputs, and a process killed at any moment leaves a CSV that ends at a row boundary.
Every output path is checked to stay inside OUT, also through symlinked folders.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from gradcam_cli.errors import GradcamError
from gradcam_cli.out.files import O_CLOEXEC, O_NOFOLLOW, atomic_write, fsync_folder, storage_fault
from gradcam_cli.out.table import Row, csv_bytes

Encoder = Callable[[], bytes]  # whatever is left to do for one file (colouring, encoding), run on the pool


class OutputWriter:
    """Writes (path relative to OUT, Encoder) files on a thread pool and appends each batch's rows after them.

    `submit_batch(files, rows)` returns at once unless more than `max_pending` batches are still being
    written, in which case it waits for the oldest: that bound is what keeps memory flat.

    With `fsync`, each file and its folder reach the disk before the CSV row that names it, and the CSV after
    each batch's rows: a power cut then loses at most the batches in flight, never a row without its files.
    `rows_written` counts the rows appended by this writer (not those kept from an earlier run), and
    `images_written` the images they are of, by the status of each image's first row: what is on disk, so a
    run stopped between explaining a batch and writing it never reports that batch as done.
    """

    def __init__(
        self,
        out: Path,
        csv_path: Path,
        columns: Sequence[str],
        keep_rows: Sequence[Row] = (),
        threads: int = 2,
        max_pending: int = 2,
        fsync: bool = False,
    ) -> None:
        """The CSV starts with its header and `keep_rows` (what --resume keeps), replacing any old file."""
        self.out = out
        self.fsync = fsync
        self.rows_written = 0
        self.images_written: Counter[str] = Counter()
        self.csv_path = csv_path
        self._root = os.path.realpath(out)
        self._safe_dirs: set[str] = set()
        self.max_pending = max_pending
        self.pending: deque[tuple[list[Future[None]], list[Row]]] = deque()
        self.columns = tuple(columns)
        atomic_write(csv_path, csv_bytes(keep_rows, self.columns, header=True), fsync)
        self._csv_fd = os.open(csv_path, os.O_WRONLY | os.O_APPEND | O_CLOEXEC | O_NOFOLLOW)
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gradcam-write")
        self.write_seconds = 0.0
        self._lock = threading.Lock()

    def _destination(self, rel: str) -> Path:
        """OUT/rel, after making sure it cannot land outside OUT (`..`, an absolute path, a symlinked folder)."""
        pure = PurePosixPath(rel)
        if pure.is_absolute() or not pure.parts or any(p in ("..", ".") for p in pure.parts) or "\x00" in rel:
            raise GradcamError(f"refusing to write output '{rel}': not a plain path inside -o {self.out}")
        path = self.out / rel
        parent = str(path.parent)
        if parent not in self._safe_dirs:
            self._check_inside(parent)  # before mkdir: never create folders through a symlink either
            path.parent.mkdir(parents=True, exist_ok=True)
            self._check_inside(parent)
            self._safe_dirs.add(parent)
        return path

    def _check_inside(self, folder: str) -> None:
        real = os.path.realpath(folder)
        if real != self._root and not real.startswith(self._root.rstrip(os.sep) + os.sep):
            raise GradcamError(
                f"refusing to write into {folder}: it resolves to {real}, outside -o {self.out} "
                "(a symlinked output folder?)"
            )

    def _write(self, path: Path, encode: Encoder) -> None:
        t0 = time.perf_counter()
        try:
            atomic_write(path, encode(), self.fsync)
        except OSError as exc:
            fault = storage_fault(exc, path)
            if fault is exc:
                raise
            raise fault from None
        with self._lock:
            self.write_seconds += time.perf_counter() - t0

    def submit_batch(self, files: Iterable[tuple[str, Encoder]], rows: Sequence[Row]) -> None:
        """files: (path relative to OUT, a callable returning its bytes); paths are checked here, at once."""
        targets = [(self._destination(rel), encode) for rel, encode in files]
        futures = [self.pool.submit(self._write, path, encode) for path, encode in targets]
        self.pending.append((futures, list(rows)))
        self._commit(block=len(self.pending) > self.max_pending)

    def _append_rows(self, rows: Sequence[Row]) -> None:
        """One write(2) per batch on an O_APPEND descriptor: a kill leaves whole rows or none of them. A write
        the disk cannot take (full, quota) is cut back to the last whole row, so the CSV stays a valid prefix."""
        data = memoryview(csv_bytes(rows, self.columns))
        size = os.fstat(self._csv_fd).st_size
        try:
            while data:
                data = data[os.write(self._csv_fd, data) :]
            if self.fsync:
                os.fsync(self._csv_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._csv_fd, size)
            fault = storage_fault(exc, self.csv_path)
            if fault is exc:
                raise
            raise fault from None
        self.rows_written += len(rows)
        self.images_written.update({row.path: row.status for row in reversed(rows)}.values())

    def _commit(self, block: bool) -> None:
        while self.pending and (block or all(f.done() for f in self.pending[0][0])):
            futures, rows = self.pending.popleft()
            for f in futures:
                f.result()  # a file that failed: its batch's rows never reach the CSV
            if rows:
                self._append_rows(rows)
            block = len(self.pending) > self.max_pending

    def close(self) -> None:
        """Finish every pending write and row; safe after an error (what was done is kept)."""
        try:
            while self.pending:
                self._commit(block=True)
            if self.fsync:
                fsync_folder(self.csv_path.parent)
        finally:
            self.pool.shutdown(wait=True)
            os.close(self._csv_fd)
