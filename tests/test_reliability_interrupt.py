"""Interruptions: atomic files, a CSV that is always a valid prefix, stale temp files cleaned, `--resume`,
and a run killed with SIGKILL at several points and resumed that ends equal to an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result
from helpers import assert_usage_error, invoke, rows_of
from PIL import Image

from gradcam_cli.audit.metrics import COLUMN_NAMES
from gradcam_cli.out import files as out_files
from gradcam_cli.out import writer as out_writer
from gradcam_cli.out.files import atomic_write
from gradcam_cli.out.table import BASE_COLUMNS, Row, columns_for, csv_bytes, read_records
from gradcam_cli.out.writer import OutputWriter
from gradcam_cli.render.encode import encode_png

HEADER = ",".join(columns_for(COLUMN_NAMES))


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file() and out_files._TEMP_NAME.match(p.name)]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cfg = tmp_path_factory.mktemp("probe") / "probe.yaml"
    cfg.write_text("input_size: [24, 40]\nmean: [0, 0, 0]\nstd: [1, 1, 1]\n", encoding="utf-8")
    return ["--model", "toy_models:probe", "-c", str(cfg), "--workers", "0", "-q"]


# --- the CSV and atomic files -------------------------------------------------------------------------------


def _sample_rows(n: int) -> list[Row]:
    names = ["plain.png", 'comma, "quote".png', "new\nline.png", "ünïcödé.png"]
    rows = []
    for i in range(n):
        name = f"{i}-{names[i % len(names)]}"
        rows.append(Row(name, "ok", heatmap=f"heatmaps/{name}.png"))
    return rows


def test_a_csv_cut_at_any_byte_reads_as_a_prefix_of_its_rows(tmp_path: Path) -> None:
    """Whatever byte a kill stops the CSV at, resuming reads complete rows only, in order."""
    rows = _sample_rows(8)
    data = csv_bytes(rows, BASE_COLUMNS, header=True)
    header_end = data.index(b"\r\n") + 2
    path = tmp_path / "predictions.csv"
    for cut in range(header_end, len(data) + 1):
        path.write_bytes(data[:cut])
        got = [Row.from_record(record) for record in read_records(path, BASE_COLUMNS)[1]]
        assert got == rows[: len(got)], cut
        if cut == len(data):
            assert len(got) == len(rows)


def test_each_batch_is_one_append(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's rows reach the file in a single write(2), after its image files exist."""
    writes: list[bytes] = []
    real_write = os.write

    def spy(fd: int, data: bytes | memoryview) -> int:
        chunk = bytes(data)
        if chunk.endswith(b"\r\n"):
            writes.append(chunk)
            # when the rows are written, the batch's files are already complete under their final names
            for line in chunk.decode().splitlines():
                name = line.split(",")[0]
                assert (tmp_path / "out" / "heatmaps" / f"{name}.png").is_file(), name
        return real_write(fd, data)

    monkeypatch.setattr(out_writer.os, "write", spy)
    out = tmp_path / "out"
    out.mkdir()
    writer = OutputWriter(out, out / "predictions.csv", BASE_COLUMNS, threads=2, max_pending=1)
    heat = np.zeros((4, 4), np.uint8)
    for batch in range(5):
        names = [f"b{batch}i{i}" for i in range(3)]
        rows = [Row(n, "ok") for n in names]
        writer.submit_batch([(f"heatmaps/{n}.png", partial(encode_png, heat)) for n in names], rows)
    writer.close()
    assert len(writes) == 5 and all(w.count(b"\r\n") == 3 for w in writes)
    assert [r["path"] for r in rows_of(out)] == [f"b{b}i{i}" for b in range(5) for i in range(3)]


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "dir" / "x.png"
    atomic_write(target, b"old")

    class Boom(Exception):
        pass

    real_replace = os.replace

    def failing_replace(src: str, dst: str) -> None:
        raise Boom

    monkeypatch.setattr(out_files.os, "replace", failing_replace)
    with pytest.raises(Boom):
        atomic_write(target, b"new content")
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["x.png"]
    monkeypatch.setattr(out_files.os, "replace", real_replace)
    atomic_write(target, b"new content")
    assert target.read_bytes() == b"new content" and os.listdir(target.parent) == ["x.png"]
    # a symlink at the final name is replaced, not written through
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me", encoding="utf-8")
    link = tmp_path / "dir" / "link.png"
    link.symlink_to(victim)
    atomic_write(link, b"png bytes")
    assert victim.read_text(encoding="utf-8") == "keep me" and not link.is_symlink()


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_stale_temp_files_are_removed_by_the_next_run(
    tmp_path: Path, probe: list[str], make_image: Callable[..., Path]
) -> None:
    make_image(tmp_path / "in" / "a.png")
    out = tmp_path / "out"
    dead = _dead_pid()
    stale = [
        out / f".predictions.csv.{dead}.140001.tmp",
        out / "heatmaps" / f".a.png.png.{dead}.140002.tmp",
        out / "overlays" / "deep" / f".b.jpg.jpg.{dead}.140003.tmp",
    ]
    alive = out / "heatmaps" / f".c.png.png.{os.getppid()}.1.tmp"  # a live process's: left alone
    mine = [out / "notes.tmp", out / "heatmaps" / "my.tmp"]  # not our names: left alone
    for path in [*stale, alive, *mine]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    result = invoke("explain", tmp_path / "in", "-o", out, *probe)
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale)
    assert alive.exists() and all(p.exists() for p in mine)


# --- --resume -----------------------------------------------------------------------------------------------


@pytest.fixture
def photos(tmp_path: Path, make_image: Callable[..., Path]) -> Path:
    src = tmp_path / "in"
    for i in range(6):
        make_image(src / f"p{i}.png", size=(40, 24), seed=i)
    (src / "p3.png").write_bytes(b"not yet downloaded")  # an error the first time
    return src


def test_resume_skips_what_is_done_and_redoes_the_rest(photos: Path, tmp_path: Path, probe: list[str]) -> None:
    out = tmp_path / "out"
    save = ["--save", "heatmap,overlay,npy"]
    assert invoke("explain", photos, "-o", out, *probe, *save).exit_code == 1
    first = {r["path"]: r for r in rows_of(out)}
    assert first["p3.png"]["status"] == "error"
    kept = out / "heatmaps" / "p0.png.png"
    kept_stat = kept.stat()
    (out / "npy" / "p4.png.npy").unlink()  # an output lost: p4 must be explained again
    Image.new("RGB", (40, 24), (90, 90, 200)).save(photos / "p3.png")  # the missing file arrived
    result = invoke("explain", photos, "-o", out, *probe, *save, "--resume")
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert [r["path"] for r in rows] == [f"p{i}.png" for i in range(6)]  # once each, in input order
    assert all(r["status"] == "ok" for r in rows)
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["resume"] == {"skipped": 4} and info["counts"] == {"images": 6, "ok": 6, "error": 0}
    assert info["status"] == "complete"
    assert (out / "npy" / "p4.png.npy").is_file() and (out / "heatmaps" / "p3.png.png").is_file()
    assert kept.stat().st_ino == kept_stat.st_ino and kept.stat().st_mtime_ns == kept_stat.st_mtime_ns  # untouched
    assert {r["path"]: r for r in rows}["p0.png"] == first["p0.png"]


def test_resume_of_a_complete_run_does_nothing_and_default_starts_fresh(
    photos: Path, tmp_path: Path, probe: list[str]
) -> None:
    (photos / "p3.png").unlink()
    out = tmp_path / "out"
    assert invoke("explain", photos, "-o", out, *probe).exit_code == 0
    before = (out / "predictions.csv").read_bytes()
    inode = (out / "heatmaps" / "p0.png.png").stat().st_ino
    result = invoke("explain", photos, "-o", out, *probe, "--resume")
    assert result.exit_code == 0, result.output
    assert (out / "predictions.csv").read_bytes() == before
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["resume"] == {"skipped": 5}
    assert (out / "heatmaps" / "p0.png.png").stat().st_ino == inode
    # without --resume everything is explained again (files replaced), and the CSV is the same
    assert invoke("explain", photos, "-o", out, *probe).exit_code == 0
    assert (out / "heatmaps" / "p0.png.png").stat().st_ino != inode
    assert (out / "predictions.csv").read_bytes() == before
    assert "resume" not in json.loads((out / "run.json").read_text(encoding="utf-8"))


def test_resume_of_a_run_json_without_the_resize_filter(photos: Path, tmp_path: Path, probe: list[str]) -> None:
    """run.json of a version that did not record `interpolation` (it always resized bilinear) still resumes;
    one that records another filter does not."""
    (photos / "p3.png").unlink()
    out = tmp_path / "out"
    assert invoke("explain", photos, "-o", out, *probe).exit_code == 0
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["preprocessing"].pop("interpolation") == "bilinear"
    (out / "run.json").write_text(json.dumps(info), encoding="utf-8")
    result = invoke("explain", photos, "-o", out, *probe, "--resume")
    assert result.exit_code == 0, result.output
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["resume"] == {"skipped": 5}
    info["preprocessing"]["interpolation"] = "bicubic"
    (out / "run.json").write_text(json.dumps(info), encoding="utf-8")
    assert_usage_error(invoke("explain", photos, "-o", out, *probe, "--resume"), "preprocessing")


def test_resume_from_the_config_and_no_resume_flag(photos: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "resume.yaml"
    cfg.write_text("input_size: [24, 40]\nmean: [0, 0, 0]\nstd: [1, 1, 1]\nresume: true\n", encoding="utf-8")
    flags = ["--model", "toy_models:probe", "-c", cfg, "--workers", "0", "-q"]
    out = tmp_path / "out"
    invoke("explain", photos, "-o", out, *flags)
    invoke("explain", photos, "-o", out, *flags)
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["resume"] == {"skipped": 5}
    invoke("explain", photos, "-o", out, *flags, "--no-resume")
    assert "resume" not in json.loads((out / "run.json").read_text(encoding="utf-8"))


def test_resume_into_an_empty_folder_runs_everything(photos: Path, tmp_path: Path, probe: list[str]) -> None:
    result = invoke("explain", photos, "-o", tmp_path / "new", *probe, "--resume")
    assert result.exit_code == 1, result.output
    assert len(rows_of(tmp_path / "new")) == 6


def _one_error_line(result: Result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in result.output, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("changed", "key"),
    [
        (["--target", "dark"], "targets"),
        (["--save", "heatmap"], "save"),
        (["--colormap", "gray"], "colormap"),
        (["--preprocess", "crop"], "preprocessing"),
    ],
)
def test_resume_refuses_other_settings(
    photos: Path, tmp_path: Path, probe: list[str], changed: list[str], key: str
) -> None:
    out = tmp_path / "out"
    invoke("explain", photos, "-o", out, *probe)
    before = (out / "predictions.csv").read_bytes()
    _one_error_line(invoke("explain", photos, "-o", out, *probe, *changed, "--resume"), "--resume", key)
    assert (out / "predictions.csv").read_bytes() == before


def test_resume_needs_run_json_and_our_csv(photos: Path, tmp_path: Path, probe: list[str]) -> None:
    out = tmp_path / "out"
    invoke("explain", photos, "-o", out, *probe)
    (out / "run.json").unlink()
    _one_error_line(invoke("explain", photos, "-o", out, *probe, "--resume"), "run.json")
    invoke("explain", photos, "-o", out, *probe)
    (out / "predictions.csv").write_text("name,score\nx,1\n", encoding="utf-8")
    _one_error_line(invoke("explain", photos, "-o", out, *probe, "--resume"), "header")


# --- kill -9 at several points, then resume -----------------------------------------------------------------

N_IMAGES = 300


def _make_small_images(folder: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        arr[8:20, 10:24] = 255 - arr[8:20, 10:24] // 4
        name = f"sub{i % 3}/img{i:03d}.{'png' if i % 2 else 'jpg'}"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(folder / name)


def _csv_rows_on_disk(csv_path: Path) -> int:
    try:
        return max(0, csv_path.read_bytes().count(b"\r\n") - 1)
    except FileNotFoundError:
        return 0


def _run_until(
    cmd: list[str], csv_path: Path, rows: int | None, seconds: float | None, pythonpath: str
) -> subprocess.Popen[bytes]:
    """Start cmd and SIGKILL it once the CSV holds `rows` rows (or after `seconds`)."""
    env = {k: v for k, v in os.environ.items() if k != "GRADCAM_DEBUG"} | {"PYTHONPATH": pythonpath}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    start = time.monotonic()
    while proc.poll() is None:
        if time.monotonic() - start > 240:
            proc.kill()
            pytest.fail("the run did not reach its kill point in 240 s")
        if (seconds is not None and time.monotonic() - start >= seconds) or (
            rows is not None and _csv_rows_on_disk(csv_path) >= rows
        ):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.003)
    proc.wait()
    return proc


def _check_consistent(out: Path) -> int:
    """What a killed run leaves: a CSV that is a valid prefix, whose ok rows have complete files, and no
    incomplete file under a final name. Returns the number of rows."""
    csv_path = out / "predictions.csv"
    for path in out.rglob("*"):
        if not path.is_file() or out_files._TEMP_NAME.match(path.name):
            continue
        if path.suffix == ".npy":
            assert np.isfinite(np.load(path)).all(), path
        elif path.suffix in (".png", ".jpg"):
            with Image.open(path) as im:
                im.load()  # raises on a half-written file
        elif path.name == "run.json":
            json.loads(path.read_text(encoding="utf-8"))
    if not csv_path.exists():
        return 0
    data = csv_path.read_bytes()
    assert data.startswith(HEADER.encode() + b"\r\n") and data.endswith(b"\r\n"), data[-80:]
    records = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert all(len(r) == len(columns_for(COLUMN_NAMES)) for r in records)
    paths = [r[0] for r in records[1:]]
    assert len(paths) == len(set(paths))
    for r in records[1:]:
        assert r[1] == "ok" and (out / r[14]).is_file() and (out / r[15]).is_file()
    return len(paths)


@pytest.mark.slow
def test_kill_9_at_several_points_then_resume_equals_an_uninterrupted_run(tmp_path: Path, probe: list[str]) -> None:
    """300 images of 32x32, batches of 4, the toy probe model (decoding, writing and resuming are what is
    tested; resnet18's determinism is tested in test_determinism.py). Kill points: during start-up, a third
    and two thirds in (the writer threads are busy with the next batch then); each restart uses --resume."""
    src = tmp_path / "in"
    _make_small_images(src)
    flags = [*probe, "--device", "cpu", "--batch-size", "4", "--save", "heatmap,overlay,npy"]
    reference = tmp_path / "reference"
    assert invoke("explain", src, "-o", reference, *flags).exit_code == 0
    env_path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(Path(__file__).parent)) if p)

    def cmd(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "gradcam_cli", "explain", str(src), "-o", str(out), *flags, *extra]

    out = tmp_path / "out"
    csv_path = out / "predictions.csv"
    seen_rows, temps_seen = [], 0
    kill_points: list[tuple[int | None, float | None]] = [(None, 1.0), (100, None), (200, None)]
    for i, (rows, seconds) in enumerate(kill_points):
        proc = _run_until(cmd(out, *(["--resume"] if i else [])), csv_path, rows, seconds, env_path)
        assert proc.returncode == -signal.SIGKILL, f"kill point {i}: exited {proc.returncode} before being killed"
        n = _check_consistent(out)
        assert n < N_IMAGES
        if rows is not None:
            assert n >= rows
        seen_rows.append(n)
        temps_seen += len(temp_files(out))
    assert seen_rows == sorted(seen_rows), seen_rows  # every resume kept what was done

    env = {**os.environ, "PYTHONPATH": env_path}
    final = subprocess.run(cmd(out, "--resume"), capture_output=True, text=True, check=False, timeout=300, env=env)
    assert final.returncode == 0, final.stderr
    assert _check_consistent(out) == N_IMAGES
    assert temp_files(out) == [], "temporary files of the killed runs were not cleaned"
    # the same CSV, byte for byte, and the same files with the same bytes as the uninterrupted run
    assert csv_path.read_bytes() == (reference / "predictions.csv").read_bytes()
    for kind in ("heatmaps", "overlays", "npy"):
        ours = {p.relative_to(out): p.read_bytes() for p in (out / kind).rglob("*") if p.is_file()}
        theirs = {p.relative_to(reference): p.read_bytes() for p in (reference / kind).rglob("*") if p.is_file()}
        assert len(ours) == N_IMAGES and ours.keys() == theirs.keys()
        assert [k for k in ours if ours[k] != theirs[k]] == [], kind
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["status"] == "complete" and info["counts"] == {"images": N_IMAGES, "ok": N_IMAGES, "error": 0}
    assert info["resume"]["skipped"] == seen_rows[-1]
    print(f"rows on disk at the kill points: {seen_rows}; temp files found after kills: {temps_seen}")
