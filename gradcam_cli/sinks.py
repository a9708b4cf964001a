"""Sinks: everything that touches OUT. Atomic files, the predictions CSV, run.json.

Files are encoded and written on a small thread pool (Pillow and zlib release the GIL while encoding) fed
through a bounded window, so compute does not wait for disk and memory stays bounded. Each file appears
under its final name only when complete (temporary name + rename). CSV rows of a batch are appended, and
flushed, only after that batch's files are on disk: a row that says `ok` always has its outputs.
Nothing here knows about models or torch.

Crash safety: a batch's rows go to the CSV in one write(2) on an O_APPEND descriptor, so a process killed at
any moment (kill -9) leaves a CSV that ends at a row boundary; temporary files a killed run leaves behind
are removed by the next run (`clean_stale_temps`). Every output path is checked to stay inside OUT, also
through symlinked folders.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from gradcam_cli.errors import GradcamError

CSV_COLUMNS: tuple[str, ...] = (
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
# appended after any metric columns (so every earlier column keeps its place): the true class and whether the
# prediction was right (empty when the ground truth is unknown), and the guided/ picture of the guided methods
CAM_COLUMNS: tuple[str, ...] = ("true_index", "true_label", "correct", "guided")
PNG_COMPRESS_LEVEL = 1
JPEG_QUALITY = 90


# names that never reach a terminal or a CSV reader as raw bytes: not-UTF-8 file names are written escaped
CSV_ENCODING, CSV_ERRORS = "utf-8", "backslashreplace"
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# `.NAME.PID.THREAD.tmp`, as atomic_write names them
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.(\d+)\.tmp$")


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes so that `path` is either absent, the old file, or the complete new file.

    A symlink at `path` is replaced, never followed; the temporary file is never opened through a symlink.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC | _O_NOFOLLOW, 0o666)
        with open(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this run has written nothing yet: a temp file with our pid is from a reused pid
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(out: Path) -> int:
    """Remove the temporary files that killed runs left in OUT (their writer process is gone); returns how many.

    Only our own names (`.NAME.PID.THREAD.tmp`) of processes that no longer exist are touched, so a run that
    is still writing elsewhere in OUT keeps its files. Symlinked folders are not followed.
    """
    removed = 0
    if not out.is_dir():
        return 0
    for dirpath, _dirnames, filenames in os.walk(out):
        for name in filenames:
            match = _TEMP_NAME.match(name)
            if match and not _pid_alive(int(match.group(1))):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


def csv_bytes(rows: Iterable[Mapping[str, Any]], header: bool = False, columns: Sequence[str] = CSV_COLUMNS) -> bytes:
    """Rows as the CSV file holds them (CRLF line ends, minimal quoting); missing values are empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="raise")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode(CSV_ENCODING, CSV_ERRORS)


def read_csv_rows(path: Path, columns: Sequence[str] = CSV_COLUMNS) -> list[dict[str, str]]:
    """The complete rows of a predictions CSV that a killed run may have left; a cut-off last row is dropped.

    Raises GradcamError when the file is not ours, or has other columns than `columns` (the metric columns a
    run adds are part of its header), and cannot be resumed.
    """
    columns = tuple(columns)
    data = path.read_bytes().decode(CSV_ENCODING, "replace")
    try:
        records = list(csv.reader(io.StringIO(data, newline="")))
    except csv.Error:
        # a kill inside a quoted field; keep every line before the last one and parse again
        records = list(csv.reader(io.StringIO(data[: data.rstrip("\r\n").rfind("\n") + 1], newline="")))
    if not records or tuple(records[0]) != columns:
        extra = ""
        if records and tuple(records[0][: len(CSV_COLUMNS)]) == CSV_COLUMNS:
            extra = " (it was written with other --metrics; resume with the same ones)"
        raise GradcamError(
            f"{path} does not start with this run's predictions.csv header{extra}; cannot resume from it"
        )
    if not data.endswith("\n") and len(records) > 1:
        records.pop()  # the last row was being written when the process died
    return [dict(zip(columns, r, strict=True)) for r in records[1:] if len(r) == len(columns)]


def rewrite_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = CSV_COLUMNS) -> None:
    """Replace the CSV atomically (a resumed run puts its rows back into input order at the end)."""
    atomic_write(path, csv_bytes(rows, header=True, columns=columns))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    """8-bit greyscale (H, W) or RGB (H, W, 3) as PNG, written here rather than by Pillow because it is the
    largest cost of a CPU run after the model.

    Every row uses PNG's Sub filter (each byte minus the same channel of the pixel to its left), computed for
    the whole image in one numpy subtraction, then zlib level 1. Heatmaps are smooth, so Sub turns them into
    runs of small numbers: measured on a 1200x900 heatmap, 3.3 ms and 72 KB against 11.5 ms and 120 KB for
    Pillow at compress_level 1 (its per-row adaptive filter choice is what costs). Decoders see a standard
    PNG; tests read every file back with Pillow.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"encode_png takes uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else 3
    flat = array.reshape(height, width * channels)
    rows = np.empty((height, width * channels + 1), dtype=np.uint8)
    rows[:, 0] = 1  # filter type Sub
    rows[:, 1 : 1 + channels] = flat[:, :channels]
    np.subtract(flat[:, channels:], flat[:, :-channels], out=rows[:, 1 + channels :])  # wraps mod 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.data, PNG_COMPRESS_LEVEL)),
            _png_chunk(b"IEND", b""),
        )
    )


def encode_jpeg(image: np.ndarray | Image.Image) -> bytes:
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.astype(np.float32, copy=False), allow_pickle=False)
    return buf.getvalue()


PILLOW_BLOCKS = 32


def pillow_block_cache(blocks: int = PILLOW_BLOCKS) -> int:
    """Let Pillow keep up to `blocks` freed image blocks for reuse; returns the setting to restore afterwards.

    By default Pillow returns every image's memory to the system when the image dies, so each full-size
    overlay (the photo, its colour map, their blend) pays for fresh pages again: measured on a 1200x900
    overlay, blend 7.5 ms without the cache and 3.5 ms with it. The cache only holds memory that was in use
    at once before, so peak memory does not grow. DataLoader workers forked afterwards inherit it. A larger
    value set by the user (PILLOW_BLOCKS_MAX) is kept; `restore_pillow_blocks(previous)` puts it back.
    """
    core: Any = Image.core
    before = int(core.get_blocks_max())
    core.set_blocks_max(max(before, blocks))
    return before


def restore_pillow_blocks(previous: int) -> None:
    """Pillow's setting as it was before the run: a notebook that called the API keeps its own."""
    core: Any = Image.core
    core.set_blocks_max(previous)


Encoder = Callable[[], bytes]


class OutputWriter:
    """Encodes and writes files on a thread pool; appends each batch's CSV rows once its files exist.

    A file is (path relative to OUT, a callable returning its bytes): whatever is left to do per file
    (colouring on the CPU, encoding) runs on the pool. `submit_batch(files, rows)` returns at once unless more
    than `max_pending` batches are still being written, in which case it waits for the oldest: that bound is
    what keeps memory flat.
    """

    def __init__(
        self,
        out: Path,
        csv_path: Path,
        threads: int = 2,
        max_pending: int = 2,
        keep_rows: Sequence[Mapping[str, Any]] = (),
        columns: Sequence[str] = CSV_COLUMNS,
    ) -> None:
        """`keep_rows`: rows of a previous run that `--resume` keeps; the CSV starts with them. `columns`: the
        header, CSV_COLUMNS then any metric columns the run asked for (values a row lacks are written empty)."""
        self.out = out
        self._root = os.path.realpath(out)
        self._safe_dirs: set[str] = set()
        self.max_pending = max_pending
        self.pending: deque[tuple[list[Future[None]], list[Mapping[str, Any]]]] = deque()
        self.columns = tuple(columns)
        # header (and kept rows) appear at once, replacing any old CSV or a symlink in its place
        atomic_write(csv_path, csv_bytes(keep_rows, header=True, columns=self.columns))
        self._csv_fd = os.open(csv_path, os.O_WRONLY | os.O_APPEND | _O_CLOEXEC | _O_NOFOLLOW)
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
        atomic_write(path, encode())
        with self._lock:
            self.write_seconds += time.perf_counter() - t0

    def submit_batch(self, files: Iterable[tuple[str, Encoder]], rows: Sequence[Mapping[str, Any]]) -> None:
        """files: (path relative to OUT, a callable returning its bytes); paths are checked here, at once."""
        targets = [(self._destination(rel), encode) for rel, encode in files]
        futures = [self.pool.submit(self._write, path, encode) for path, encode in targets]
        self.pending.append((futures, list(rows)))
        self._commit(block=len(self.pending) > self.max_pending)

    def _append_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """One write(2) per batch on an O_APPEND descriptor: a kill leaves whole rows or none of them."""
        data = memoryview(csv_bytes(rows, columns=self.columns))
        while data:
            data = data[os.write(self._csv_fd, data) :]

    def _commit(self, block: bool) -> None:
        while self.pending and (block or all(f.done() for f in self.pending[0][0])):
            futures, rows = self.pending.popleft()
            for f in futures:
                f.result()
            if rows:
                self._append_rows(rows)
            block = len(self.pending) > self.max_pending

    def close(self) -> None:
        """Finish every pending write and row; safe after an error (what was done is kept)."""
        try:
            while self.pending:
                self._commit(block=True)
        finally:
            self.pool.shutdown(wait=True)
            os.close(self._csv_fd)


def write_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write(path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def read_predictions(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    """predictions.csv of an output folder: (header, rows as dicts of strings). For `gradcam audit`/`report`."""
    path = Path(out) / "predictions.csv"
    with open(path, newline="", encoding="utf-8", errors="backslashreplace") as fh:
        reader = csv.DictReader(fh)
        rows = [dict(row) for row in reader]
        return list(reader.fieldnames or []), rows


def read_manifest(out: Path) -> dict[str, Any]:
    """run.json of an output folder, or {} when it is missing or unreadable (older or partial outputs)."""
    try:
        data = json.loads((Path(out) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def output_name(kind_dir: str, rel: str, suffix: str, ext: str) -> str:
    """`heatmaps` + `cats/tom.jpg` + `__281` + `png` -> `heatmaps/cats/tom.jpg__281.png` (never collides)."""
    return f"{kind_dir}/{rel}{suffix}.{ext}"
