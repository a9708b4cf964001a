"""One run at a time per OUT: `OUT/.gradcam.lock`, made atomically by the run that writes there.

Two runs into one folder would interleave rows and files made with different settings, so the second is
refused at once, with the holder's pid, host and start time. The lock is a small JSON file (pid, host, boot
id, the process's start time, when the run started) that appears complete or not at all: it is written under
a temporary name and hard-linked to its final name, which fails when the name exists. It is removed when the
run exits, also after an error or a signal. A run killed with SIGKILL (or a machine that crashed) leaves it
behind, so a lock whose holder provably no longer runs is taken over with a note: same host and boot id and
that pid gone or now another process (its start time differs), or the same host since rebooted. A lock of
another host cannot be checked from here; it is refused, and the message says which file to delete if that
run is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from gradcam_cli.errors import GradcamError
from gradcam_cli.out import names
from gradcam_cli.out.files import O_CLOEXEC, O_NOFOLLOW, storage_fault

LogFn = Callable[[str], None]
UNREADABLE_GRACE_S = 10.0  # a lock without readable content younger than this may be one being written


def boot_id() -> str:
    """This boot of this machine (Linux), or "" where that is not known."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """When process `pid` started, in clock ticks since boot (Linux /proc), or "" when unknown or gone: a pid
    reused by another process has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def holder_record() -> dict[str, Any]:
    """What the lock says about the process holding it."""
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": boot_id(),
        "process_start": process_start(pid),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tool": "gradcam explain",
    }


def why_stale(holder: dict[str, Any], age_s: float) -> str | None:
    """Why the run named in a lock provably no longer runs, or None when it may still run."""
    if not holder:
        return "its content is unreadable" if age_s > UNREADABLE_GRACE_S else None
    if holder.get("host") != socket.gethostname():
        return None  # another machine: its processes cannot be checked from here
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return "it names no pid"
    if holder.get("boot_id") and boot_id() and holder["boot_id"] != boot_id():
        return f"this machine has rebooted since pid {pid} took it"
    if pid == os.getpid() or not pid_alive(pid):
        return f"pid {pid} no longer runs"
    started = process_start(pid)
    if holder.get("process_start") and started and started != holder["process_start"]:
        return f"pid {pid} is now another process"
    return None


def read_holder(path: Path) -> tuple[dict[str, Any], float]:
    """The lock's record ({} when unreadable) and its age in seconds; FileNotFoundError when it is gone."""
    age = time.time() - path.lstat().st_mtime
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError):
        return {}, age
    return (data if isinstance(data, dict) else {}), age


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Make the lock with `record` in it, complete or not at all; False when it exists already."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.0.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o644)
        with open(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    except OSError as exc:
        fault = storage_fault(exc, path)
        if fault is exc:
            raise
        raise fault from None
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def acquire(out: Path, log: LogFn) -> dict[str, Any]:
    """Take OUT's lock or raise `GradcamError` naming the run that holds it; returns the record written."""
    path = out / names.LOCK
    record = holder_record()
    for _attempt in range(5):
        if _create(path, record):
            return record
        try:
            holder, age = read_holder(path)
        except FileNotFoundError:
            continue  # its holder just left
        reason = why_stale(holder, age)
        if reason is None:
            raise GradcamError(_held_message(out, path, holder))
        with suppress(FileNotFoundError):
            path.unlink()
        log(f"note: took over the lock {path} of an earlier run: {reason}")
    raise GradcamError(f"-o {out}: could not take the lock {path}; another run keeps taking it")


def _held_message(out: Path, path: Path, holder: dict[str, Any]) -> str:
    if not holder:
        return f"-o {out} is being started by another gradcam run ({path} is being written); use another -o"
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    hint = "wait for it to finish or use another -o"
    if holder.get("host") != socket.gethostname():
        hint += f" (if that run is gone, delete {path})"
    return f"-o {out} is in use by another gradcam explain ({who}); {hint}"


def release(out: Path, record: dict[str, Any]) -> None:
    """Remove the lock if it is still ours (never another run's that took over a lock thought stale)."""
    path = out / names.LOCK
    try:
        holder, _age_s = read_holder(path)
        if holder.get("pid") == record["pid"] and holder.get("process_start") == record["process_start"]:
            path.unlink()
    except OSError:
        pass  # gone already, or OUT became unreadable: the next run finds the pid gone
