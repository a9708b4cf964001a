"""Atomic files: a file in OUT is absent, the old one, or the complete new one, whatever kills the process.

Every file is written under a temporary name beside its final one (`.NAME.PID.THREAD.tmp`) and renamed when
complete. Temporary files a killed run leaves behind are removed by the next run (`clean_stale_temps`).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.(\d+)\.tmp$")


def atomic_write(path: Path, data: bytes | Callable[[BinaryIO], Any]) -> None:
    """Write `data` (bytes, or a function that writes into the open file) so that `path` is never partial.

    A symlink at `path` is replaced, never followed; the temporary file is never opened through a symlink.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o666)
        with open(fd, "wb") as fh:
            if isinstance(data, bytes):
                fh.write(data)
            else:
                data(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, value: Any) -> None:
    """JSON with a 2-space indent and a final newline, atomically (run.json, summary.json)."""
    atomic_write(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


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
