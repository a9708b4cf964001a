"""Atomic files: a file in OUT is absent, the old one, or the complete new one, whatever kills the process.

Every file is written under a temporary name beside its final one (`.NAME.PID.THREAD.tmp`) and renamed when
complete. Temporary files a killed run leaves behind are removed by the next run (`clean_stale_temps`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, BinaryIO

from gradcam_cli.errors import MachineFault

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.(\d+)\.tmp$")
# what the machine, not the run, gets wrong when writing: said in words, never as a bug
STORAGE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def storage_fault(exc: BaseException, path: str | Path | None = None) -> BaseException:
    """`exc` as a `MachineFault` naming what happened and the file, when it is a full disk, a full quota or a
    folder that cannot be written; any other exception as it is. What to do about it is added by the caller,
    which knows how far the run got."""
    if isinstance(exc, MachineFault) or not isinstance(exc, OSError) or exc.errno not in STORAGE_ERRORS:
        return exc
    where = exc.filename if exc.filename is not None else path
    if isinstance(where, str) and path is not None and _TEMP_NAME.match(os.path.basename(where)):
        where = path  # the final name says more than the temporary one it was written under
    return MachineFault(f"{STORAGE_ERRORS[exc.errno]} writing {where}")


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable: without it a power cut can lose the name."""
    fd = os.open(folder, os.O_RDONLY | O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], Any], fsync: bool = False) -> None:
    """Write `data` (bytes, or a function that writes into the open file) so that `path` is never partial.

    A symlink at `path` is replaced, never followed; the temporary file is never opened through a symlink.
    With `fsync` the file's bytes reach the disk before the rename, and the folder after it, so that a power
    cut leaves the old file or the new one (without, a killed process does too, a crashed kernel may not).
    A full disk or quota, or a folder that cannot be written, raises `MachineFault` naming `path`.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o666)
        with open(fd, "wb") as fh:
            if isinstance(data, bytes):
                fh.write(data)
            else:
                data(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_folder(path.parent)
    except BaseException as exc:
        with suppress(OSError):  # a read-only folder: nothing was created there either
            tmp.unlink(missing_ok=True)
        fault = storage_fault(exc, path)
        if fault is exc:
            raise
        raise fault from None


def overwrite_in_place(path: Path, data: bytes) -> bool:
    """Rewrite `path` inside the blocks it already has, for run.json's last words on a full disk (where the
    temporary file of an atomic write cannot be created). Only done when `data` fits those blocks; returns
    whether it was written."""
    try:
        fd = os.open(path, os.O_WRONLY | O_CLOEXEC | O_NOFOLLOW)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_blocks * 512 < len(data):
            return False
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.ftruncate(fd, len(data))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")


def write_json(path: Path, value: Any, fsync: bool = False) -> None:
    """JSON with a 2-space indent and a final newline, atomically (run.json, summary.json)."""
    atomic_write(path, json_bytes(value), fsync)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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

    Only our own names of processes that no longer exist are touched, so a run that is still writing elsewhere
    in OUT keeps its files. Symlinked folders are not followed.
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
