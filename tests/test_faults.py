"""Faults of the machine, not of the input: a full disk or quota, a read-only OUT, SIGTERM and SIGHUP, a decode
worker killed by a signal, two runs into one OUT, an input folder that goes away, and --fsync.

Each fault gives its documented exit code and one line, run.json says what happened, and where the run stopped,
`--resume` afterwards ends with the same predictions.csv and output bytes as an uninterrupted run. Faults are
injected without root: ENOSPC/EDQUOT/EROFS by patching the write path, signals sent to a subprocess, a worker
found among the children of the run's process (/proc) and killed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from helpers import invoke
from PIL import Image

from gradcam_cli.data import batches
from gradcam_cli.errors import ExitCode, Interrupted
from gradcam_cli.out import files as out_files
from gradcam_cli.out import lock as out_lock
from gradcam_cli.out import writer as out_writer
from gradcam_cli.out.manifest import Manifest
from gradcam_cli.out.names import LOCK
from gradcam_cli.run import explain as run_explain

N_IMAGES = 48
KINDS = ("heatmaps", "overlays")
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 images of 32x32 (png and jpg) in three subfolders."""
    folder = tmp_path_factory.mktemp("faults") / "in"
    rng = np.random.default_rng(1)
    for i in range(N_IMAGES):
        arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        name = f"sub{i % 3}/img{i:03d}.{'png' if i % 2 else 'jpg'}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The toy probe model (what is tested is decoding, writing and resuming, not the CAM), batches of 4."""
    cfg = tmp_path_factory.mktemp("probe") / "probe.yaml"
    cfg.write_text("input_size: [24, 40]\nmean: [0, 0, 0]\nstd: [1, 1, 1]\n", encoding="utf-8")
    return ["--model", "toy_models:probe", "-c", str(cfg), "--workers", "0", "-q", "--device", "cpu"]


@pytest.fixture(scope="module")
def reference(src: Path, flags: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run: what every fault followed by --resume must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = invoke("explain", src, "-o", out, *flags, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    return out


def outputs(out: Path) -> dict[str, bytes]:
    found = {str(p.relative_to(out)): p.read_bytes() for kind in KINDS for p in (out / kind).rglob("*") if p.is_file()}
    found["predictions.csv"] = (out / "predictions.csv").read_bytes()
    return found


def assert_same_as(out: Path, reference: Path) -> None:
    ours, theirs = outputs(out), outputs(reference)
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if ours[k] != theirs[k]] == []
    assert not (out / LOCK).exists(), "the lock outlived the run"


def one_error_line(text: str, *needles: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), lines
    assert "Traceback" not in text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def run_json(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def csv_rows(out: Path) -> int:
    data = (out / "predictions.csv").read_bytes()
    assert data.endswith(b"\r\n"), data[-60:]  # a valid prefix: whole rows only
    return data.count(b"\r\n") - 1


def resume(src: Path, out: Path, flags: list[str]) -> Result:
    result = invoke("explain", src, "-o", out, *flags, "--batch-size", "4", "--resume")
    assert result.exit_code == 0, result.output
    return result


# --- a full disk, a full quota, a read-only OUT ---------------------------------------------------------------


def fail_after(calls: int, code: int, real: Callable[..., Any]) -> Callable[..., Any]:
    """`real`, until it has been called `calls` times; then OSError(code) naming the path, as the kernel does."""
    count = 0

    def write(path: Path, *args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        if count > calls:
            raise OSError(code, os.strerror(code), str(path.with_name(f".{path.name}.1.2.tmp")))
        return real(path, *args, **kwargs)

    return write


def disk_full_after(out: Path, files: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the `files`+1-th new file in OUT on, creating a file there fails with ENOSPC, as on a full disk
    (writing into the blocks a file already has still works)."""
    real_open, created = os.open, 0

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        nonlocal created
        if flags & os.O_CREAT and str(path).startswith(str(out)):
            created += 1
            if created > files:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota exceeded")])
def test_a_full_disk_stops_with_exit_5_one_line_and_resume_finishes(
    src: Path, flags: list[str], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    """ENOSPC: no new file can be made in OUT, run.json included (it is rewritten in its own blocks); EDQUOT: the
    image files fail, from the 31st on."""
    out = tmp_path / "out"
    if code == errno.ENOSPC:
        disk_full_after(out, 40, monkeypatch)
    else:
        monkeypatch.setattr(out_writer, "atomic_write", fail_after(30, code, out_files.atomic_write))
    result = invoke("explain", src, "-o", out, *flags, "--batch-size", "4")
    assert result.exit_code == ExitCode.MACHINE == 5
    line = one_error_line(result.stderr, words, f"of {N_IMAGES} images", "--resume", str(out))
    assert ".tmp" not in line  # the file's own name, not the temporary one it was written under
    done = csv_rows(out)
    assert 0 < done < N_IMAGES and f"stopped after {done} of" in line
    info = run_json(out)
    assert info["status"] == "stopped" and words in info["reason"] and "--resume" in info["note"]
    monkeypatch.undo()
    resume(src, out, flags)
    assert_same_as(out, reference)


def test_a_csv_append_cut_short_by_a_full_quota_is_cut_back_to_whole_rows(
    src: Path, flags: list[str], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CSV append writes part of a batch's rows, then the quota is full: the part is removed again."""
    out = tmp_path / "out"
    real_write, appends, csv_fd = os.write, 0, -1

    def write(fd: int, data: Any) -> int:
        nonlocal appends, csv_fd
        if fd == csv_fd:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        chunk = bytes(data)
        if b",ok," in chunk and chunk.endswith(b"\r\n"):
            appends += 1
            if appends == 4:
                csv_fd = fd
                return real_write(fd, chunk[: len(chunk) // 2])  # a short write; the rest gets EDQUOT
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    result = invoke("explain", src, "-o", out, *flags, "--batch-size", "4")
    monkeypatch.undo()
    assert result.exit_code == 5
    one_error_line(result.stderr, "quota exceeded", "predictions.csv", "stopped after 12 of 48")
    assert csv_rows(out) == 12  # three whole batches; the half of the fourth is gone
    assert run_json(out)["status"] == "stopped"
    resume(src, out, flags)
    assert_same_as(out, reference)


def test_a_read_only_out_is_one_line_and_keeps_the_earlier_run(
    src: Path, flags: list[str], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    assert invoke("explain", src, "-o", out, *flags, "--batch-size", "4").exit_code == 0
    before = outputs(out)
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(path: Any, *args: Any, **kwargs: Any) -> Any:
            flags_ = args[0] if args else kwargs.get("flags", 0)
            if str(path).startswith(str(out)) and (real is real_mkdir or flags_ & (os.O_WRONLY | os.O_CREAT)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "open", refuse(real_open))
    monkeypatch.setattr(os, "mkdir", refuse(real_mkdir))
    result = invoke("explain", src, "-o", out, *flags, "--batch-size", "4", "--resume")
    monkeypatch.undo()
    assert result.exit_code == 5
    one_error_line(result.stderr, "read-only", str(out / LOCK), "nothing was written")
    assert outputs(out) == before and run_json(out)["status"] == "complete"


def test_an_input_folder_that_goes_away_is_one_line_and_resume_finishes(
    src: Path, flags: list[str], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs, gone = tmp_path / "in", tmp_path / "elsewhere"
    shutil.copytree(src, inputs)  # moved away (as an unmount would) after the second batch
    out = tmp_path / "out"
    real_decode, calls = batches.decode_rgb, 0

    def decode(path: Path, *args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 9:
            inputs.rename(gone)
        return real_decode(path, *args)

    monkeypatch.setattr(batches, "decode_rgb", decode)
    result = invoke("explain", inputs, "-o", out, *flags, "--batch-size", "4")
    assert result.exit_code == 5
    one_error_line(result.stderr, f"input {inputs} is gone", "stopped after 8 of 48", "--resume")
    assert csv_rows(out) == 8 and run_json(out)["status"] == "stopped"
    monkeypatch.undo()
    gone.rename(inputs)
    resume(inputs, out, flags)
    assert_same_as(out, reference)


# --- SIGTERM, SIGHUP ------------------------------------------------------------------------------------------


def start(src: Path, out: Path, flags: list[str], *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRADCAM_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(TESTS)) if p)
    cmd = [sys.executable, "-m", "gradcam_cli", "explain", str(src), "-o", str(out), *flags, *extra]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, f"no {what} in 120 s"
        time.sleep(0.005)


def rows_on_disk(out: Path) -> int:
    try:
        return max(0, (out / "predictions.csv").read_bytes().count(b"\r\n") - 1)
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize(
    ("signum", "point"),
    [(signal.SIGTERM, "start-up"), (signal.SIGTERM, "rows"), (signal.SIGHUP, "rows"), (signal.SIGTERM, "group")],
)
def test_sigterm_and_sighup_are_graceful_and_resume_finishes(
    src: Path, flags: list[str], reference: Path, tmp_path: Path, signum: int, point: str
) -> None:
    """Sent once run.json exists (start-up: before the first row is written), or once 8 rows are on disk; `group`:
    to the whole process group, decode workers included, as Slurm's scancel does."""
    out = tmp_path / "out"
    workers = ["--workers", "2"] if point == "group" else []
    proc = start(src, out, flags, "--batch-size", "4", *workers)
    if point == "start-up":
        wait_for(proc, lambda: (out / "run.json").exists(), "run.json")
    else:
        wait_for(proc, lambda: rows_on_disk(out) >= 8, "rows")
    if point == "group":
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _out, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    if proc.returncode == 0:  # the run ended between the check and the signal: nothing to test at this point
        pytest.fail(f"the run finished before {name} arrived; make the inputs larger")
    assert proc.returncode == 128 + signum, err
    one_error_line(err, f"stopped by {name}", "--resume")
    info = run_json(out)
    assert info["status"] == "interrupted" and info["reason"] == name
    assert info["counts"]["ok"] == rows_on_disk(out) < N_IMAGES
    assert not (out / LOCK).exists()
    resume(src, out, flags)
    assert_same_as(out, reference)


@pytest.mark.parametrize("point", ["run.json written", "loop starting"])
def test_a_signal_right_after_run_json_was_written_is_recorded(
    src: Path, flags: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str
) -> None:
    """The moments between run.json saying `running` and the first batch: a signal there is recorded too."""

    def sigterm(*args: Any, **kwargs: Any) -> None:
        raise Interrupted(signal.SIGTERM, "SIGTERM")

    if point == "run.json written":
        real_write = Manifest.write

        def write_then_stop(self: Manifest) -> None:
            real_write(self)
            sigterm()

        monkeypatch.setattr(Manifest, "write", write_then_stop)
    else:
        monkeypatch.setattr(run_explain, "BatchLoop", sigterm)
    out = tmp_path / "out"
    result = invoke("explain", src, "-o", out, *flags)
    assert result.exit_code == 143
    one_error_line(result.stderr, "stopped by SIGTERM")
    info = run_json(out)
    assert info["status"] == "interrupted" and info["reason"] == "SIGTERM"
    assert not (out / LOCK).exists()


# --- a decode worker killed ------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the DataLoader workers of a run), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        if int(text[text.rfind(")") + 2 :].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_worker_killed_by_the_oom_killer_is_replaced_and_the_run_ends_complete(
    src: Path, flags: list[str], reference: Path, tmp_path: Path
) -> None:
    """A SIGKILL from outside (what the OOM killer sends): the batch it held is decoded again, nothing is lost."""
    out = tmp_path / "out"
    proc = start(src, out, flags, "--batch-size", "4", "--workers", "2")
    wait_for(proc, lambda: rows_on_disk(out) >= 8 and len(children(proc.pid)) >= 2, "workers")
    os.kill(children(proc.pid)[0], signal.SIGKILL)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    lost = run_json(out)["decode_workers_lost"]
    assert len(lost) == 1 and lost[0]["signal"] == "SIGKILL" and "files" not in lost[0]
    assert_same_as(out, reference)


@pytest.fixture
def bomb(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A decoder that kills its worker process on one file (what a segfaulting decoder does to it)."""
    target = "sub1/img013.png"
    real = batches.decode_rgb

    def decode(path: Path, *args: Any) -> Any:
        if path.as_posix().endswith(target) and batches.torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(path, *args)

    monkeypatch.setattr(batches, "decode_rgb", decode)
    yield target


def test_a_file_that_kills_its_worker_becomes_an_error_row_naming_the_signal(
    src: Path, flags: list[str], reference: Path, tmp_path: Path, bomb: str
) -> None:
    out = tmp_path / "out"
    result = invoke("explain", src, "-o", out, *flags, "--batch-size", "4", "--workers", "2")
    assert result.exit_code == ExitCode.IMAGE_ERRORS, result.output
    rows = (out / "predictions.csv").read_text(encoding="utf-8").splitlines()
    bad = [r for r in rows if r.startswith(bomb + ",")]
    assert len(bad) == 1 and ",error," in bad[0] and "killed by SIGSEGV" in bad[0]
    assert csv_rows(out) == N_IMAGES
    lost = run_json(out)["decode_workers_lost"]
    assert {entry["signal"] for entry in lost} == {"SIGSEGV"}
    assert [rel for entry in lost for rel in entry.get("files", [])] == [bomb]
    # every other row is the uninterrupted run's, in the same order
    theirs = (reference / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert [r for r in rows if r not in bad] == [r for r in theirs if not r.startswith(bomb + ",")]


# --- two runs into one OUT -------------------------------------------------------------------------------------


def test_a_second_run_into_the_same_out_is_refused_at_once(
    src: Path, flags: list[str], reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = start(src, out, flags, "--batch-size", "4")
    wait_for(first, lambda: (out / LOCK).exists() and (out / "run.json").exists(), "the lock")
    t0 = time.monotonic()
    second = invoke("explain", src, "-o", out, *flags, "--batch-size", "4", "--resume")
    assert second.exit_code == 2 and time.monotonic() - t0 < 10
    one_error_line(second.stderr, f"pid {first.pid} on {socket.gethostname()}", "started", "in use")
    _out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert_same_as(out, reference)  # the first run was not disturbed; its lock is gone


def write_lock(out: Path, **fields: Any) -> None:
    record = out_lock.holder_record() | fields
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps(record), encoding="utf-8")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"pid": "dead"}, "no longer runs"),
        ({"pid": 1, "process_start": "-1"}, "now another process"),
        ({"boot_id": "another-boot"}, "rebooted"),
    ],
)
def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(
    src: Path, flags: list[str], reference: Path, tmp_path: Path, fields: dict[str, Any], why: str
) -> None:
    out = tmp_path / "out"
    if fields.get("pid") == "dead":
        fields = {"pid": dead_pid()}
    if "boot_id" in fields and not out_lock.boot_id():
        pytest.skip("this system has no boot id")
    write_lock(out, **fields)
    loud = [f for f in flags if f != "-q"]
    result = invoke("explain", src, "-o", out, *loud, "--batch-size", "4")
    assert result.exit_code == 0, result.output
    notes = [ln for ln in result.stderr.splitlines() if "took over the lock" in ln]
    assert len(notes) == 1 and why in notes[0]
    assert_same_as(out, reference)


def test_a_lock_of_another_host_is_refused_with_what_to_delete(src: Path, flags: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_lock(out, host="node-17", pid=4242)
    result = invoke("explain", src, "-o", out, *flags)
    assert result.exit_code == 2
    one_error_line(result.stderr, "pid 4242 on node-17", f"delete {out / LOCK}")
    assert (out / LOCK).exists()  # not ours to remove


def test_the_lock_is_released_after_a_usage_error_and_an_interrupt(
    src: Path, flags: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("explain", src, "-o", out, *flags, "--layer", "no_such_layer")
    assert result.exit_code == 2 and not (out / LOCK).exists()

    def interrupt(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(out_writer.OutputWriter, "submit_batch", interrupt)
    result = invoke("explain", src, "-o", out, *flags)
    assert result.exit_code == 130 and not (out / LOCK).exists()


# --- --fsync ---------------------------------------------------------------------------------------------------


def test_fsync_syncs_every_file_folder_and_the_csv_and_changes_no_byte(
    src: Path, flags: list[str], reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = 0
    real = os.fsync

    def count(fd: int) -> None:
        nonlocal synced
        synced += 1
        real(fd)

    monkeypatch.setattr(os, "fsync", count)
    out = tmp_path / "out"
    result = invoke("explain", src, "-o", out, *flags, "--batch-size", "4", "--fsync")
    assert result.exit_code == 0, result.output
    # each image's two files and their folders, the CSV after each of the 12 batches, run.json
    assert synced >= 2 * 2 * N_IMAGES + N_IMAGES // 4
    assert run_json(out)["fsync"] is True
    assert_same_as(out, reference)
    synced = 0
    assert invoke("explain", src, "-o", tmp_path / "plain", *flags, "--batch-size", "4").exit_code == 0
    assert synced == 0
