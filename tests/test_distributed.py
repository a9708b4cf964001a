"""Distributed runs: sharding, the rank-to-rank messages, the merge, and torchrun end to end on CPU/gloo.

The end-to-end tests start real torchrun jobs (`python -m torch.distributed.run`) of 2 CPU processes on 25
small files (24 images and one that cannot be decoded) with a seeded random resnet18 at 64 px, and compare
with a one-process run of the same settings: the same predictions.csv, byte for byte, and the same heatmap
and overlay files. A second job simulates two nodes (two torchrun launchers on loopback) and kills rank 1 in
the middle of its share: rank 0 must not wait forever, must keep and merge what was done and exit non-zero
with one clear line; `--resume` then completes the set.

The in-process tests drive `World` over a real c10d TCPStore with short timeouts, so "a dead peer is given
up on, a slow one is waited for" is checked in about a second.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from gradcam_cli import load_settings
from gradcam_cli.audit.metrics import COLUMN_NAMES
from gradcam_cli.cli import main
from gradcam_cli.errors import GradcamError, RunStopped
from gradcam_cli.out.files import atomic_write
from gradcam_cli.out.merge import fold_rank_csvs, merge_csvs
from gradcam_cli.out.names import LOCK
from gradcam_cli.out.names import rank_csv as rank_csv_name
from gradcam_cli.out.table import BASE_COLUMNS, columns_for, csv_bytes, iter_rows
from gradcam_cli.run.coordinator import LocalCoordinator, TorchrunCoordinator, coordinator_from_env
from gradcam_cli.run.explain import explain
from gradcam_cli.run.world import World, shard

TESTS_DIR = Path(__file__).parent
MODEL = "dist_models:resnet18"  # tests/dist_models.py: resnet18 that can kill its own rank on request
BATCH = 2
SIZES = [(64, 48), (48, 64), (80, 60)]


@pytest.fixture(autouse=True)
def _sigterm_as_it_was() -> Any:
    """A World that finished ignores SIGTERM from then on; the test process (and what it starts) must not."""
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


# --- sharding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 5, 24, 25])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("batch", [1, 4])
def test_shards_are_disjoint_complete_and_whole_batches(n: int, world_size: int, batch: int) -> None:
    items = list(range(n))
    shares = [shard(items, r, world_size, batch) for r in range(world_size)]
    assert sorted(x for s in shares for x in s) == items  # every item once: disjoint and complete
    assert shares == [shard(items, r, world_size, batch) for r in range(world_size)]  # deterministic
    one_process_batches = [items[i : i + batch] for i in range(0, n, batch)]
    for r, share in enumerate(shares):
        # the rank's batches are exactly the one-process batches j with j % world_size == r, in order
        mine = [b for j, b in enumerate(one_process_batches) if j % world_size == r]
        assert [share[i : i + batch] for i in range(0, len(share), batch)] == mine
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= batch  # balanced to within one batch
    if world_size == 1:
        assert shares == [items]


# --- World from the environment ---------------------------------------------------------------------------


def test_without_torchrun_a_world_is_one_process_and_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    world = World.from_env()
    assert (world.rank, world.size, world.active) == (0, 1, False)
    assert isinstance(coordinator_from_env(120), LocalCoordinator)  # predictions.csv, no rank CSVs
    assert world.shard([1, 2, 3], 2) == [1, 2, 3]
    assert world.pick_device("cuda") == "cuda" and world.pick_device("auto") == "auto"
    assert world.gather("x", {"a": 1}) == {0: {"a": 1}} and world.broadcast("x", 5) == 5
    assert world.from_rank0("x", lambda: [1]) == [1]
    with world.joined("cpu"), world.starting():
        world.agree(None)
    assert not dist.is_initialized()


def test_world_reads_torchrun_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    world = World.from_env(7)
    assert (world.rank, world.size, world.local_rank, world.timeout) == (2, 3, 0, 7.0)
    assert world.active and isinstance(coordinator_from_env(7), TorchrunCoordinator)
    assert rank_csv_name(world.rank) == "predictions.rank2.csv"
    assert world.shard(list(range(10)), 2) == [4, 5]
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc-per-node 1: exactly a one-process run
    assert not World.from_env().active


def test_world_size_without_rank_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(GradcamError, match="start distributed runs with torchrun"):
        World.from_env()
    result = CliRunner().invoke(main, ["explain", str(tmp_path), "-o", str(tmp_path / "o"), "--model", "resnet18"])
    assert result.exit_code == 2, result.output
    assert "RANK/LOCAL_RANK are missing" in result.stderr and "Traceback" not in result.output


def test_a_process_group_the_caller_initialised_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python API inside the caller's own distributed job (no torchrun variables): its rank and size."""
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    world = World.from_env()
    assert (world.rank, world.size, rank_csv_name(world.rank)) == (1, 4, "predictions.rank1.csv")


def test_cuda_means_the_local_rank_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    world = World(rank=3, size=4, local_rank=1)
    assert world.pick_device("cuda") == "cuda:1" and world.pick_device("auto") == "cuda:1"
    assert chosen == [1, 1]
    assert world.pick_device("cuda:0") == "cuda:0"  # pinned by the user: kept
    assert world.pick_device("cpu") == "cpu"
    with pytest.raises(GradcamError, match=r"LOCAL_RANK 2 has no GPU.*--nproc-per-node 2"):
        World(rank=2, size=4, local_rank=2).pick_device("cuda")


def test_dist_timeout_is_validated() -> None:
    assert load_settings(dist_timeout=2.5).dist_timeout == 2.5
    for bad in (0, -1, "soon", True, float("nan")):
        with pytest.raises(GradcamError, match="dist-timeout"):
            load_settings(dist_timeout=bad)
    result = CliRunner().invoke(main, ["explain", ".", "-o", "o", "--model", "resnet18", "--dist-timeout", "0"])
    assert result.exit_code == 2 and "option --dist-timeout: expected a number of seconds > 0" in result.stderr


def test_sigterm_becomes_a_clean_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun sends SIGTERM to every rank when one fails: the run unwinds (files flushed), it is not killed."""
    world = World(rank=1, size=2)
    previous = world._catch_sigterm()
    try:
        with pytest.raises(RunStopped, match="stopped by SIGTERM") as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread long before
        assert caught.value.exit_code == 4 and world.stop_reason == "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- messages between ranks over a real store --------------------------------------------------------------


@pytest.fixture
def store() -> Any:
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=20))


def _peer(store: Any) -> Any:
    return dist.TCPStore("127.0.0.1", store.port, is_master=False, timeout=timedelta(seconds=20))


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_a_dead_rank_is_given_up_on_after_the_timeout(store: Any) -> None:
    rank0 = World(rank=0, size=3, timeout=1.0)
    rank0.attach(store)
    rank1 = World(rank=1, size=3, timeout=1.0)  # alive and reporting
    rank1.attach(_peer(store))
    # rank 2 never starts: no heartbeat, no report
    try:
        rank1.gather("report", {"ok": 5})
        t0 = time.monotonic()
        got = rank0.gather("report", {"ok": 7})
        waited = time.monotonic() - t0
    finally:
        rank0.detach()
        rank1.detach()
    assert got == {0: {"ok": 7}, 1: {"ok": 5}, 2: None}
    assert 1.0 <= waited < 6.0, waited


def test_a_slow_rank_is_waited_for_as_long_as_it_lives(store: Any) -> None:
    rank0 = World(rank=0, size=2, timeout=0.8)
    rank0.attach(store)
    rank1 = World(rank=1, size=2, timeout=0.8)
    rank1.attach(_peer(store))
    try:
        # rank 1 reports after 3x the timeout, but its heartbeat runs all along
        thread, _ = _in_thread(lambda: (time.sleep(2.4), rank1.gather("report", {"ok": 1})))
        t0 = time.monotonic()
        got = rank0.gather("report", {"ok": 0})
        waited = time.monotonic() - t0
        thread.join(10)
    finally:
        rank0.detach()
        rank1.detach()
    assert got == {0: {"ok": 0}, 1: {"ok": 1}}
    assert waited >= 2.0


def test_a_rank_waiting_for_a_dead_rank_0_stops_with_a_clear_message(store: Any) -> None:
    rank1 = World(rank=1, size=2, timeout=0.8)
    rank1.attach(_peer(store))
    try:
        t0 = time.monotonic()
        with pytest.raises(RunStopped, match=r"rank 0 stopped responding \(no heartbeat for 0.8 s\).*--resume"):
            rank1.finish({"ok": 1}, conclude=lambda reports: {})
        assert time.monotonic() - t0 < 6.0
    finally:
        rank1.detach()


def test_a_rank_that_cannot_start_stops_all_with_one_message(store: Any) -> None:
    rank0 = World(rank=0, size=2, timeout=5)
    rank0.attach(store)
    rank1 = World(rank=1, size=2, timeout=5)
    rank1.attach(_peer(store))
    try:
        thread, box = _in_thread(lambda: rank1.agree(GradcamError("--layer nope: no such layer")))
        with pytest.raises(GradcamError, match=r"^rank 1 of 2: --layer nope: no such layer$"):
            rank0.agree(None)
        thread.join(10)
    finally:
        rank0.detach()
        rank1.detach()
    error = box["error"]
    assert isinstance(error, RunStopped) and error.quiet and error.exit_code == 2  # rank 0 said it; rank 1 is quiet


def test_the_outcome_reaches_every_rank(store: Any) -> None:
    rank0 = World(rank=0, size=2, timeout=5)
    rank0.attach(store)
    rank1 = World(rank=1, size=2, timeout=5)
    rank1.attach(_peer(store))
    seen: dict[int, Any] = {}

    def conclude(reports: dict[int, Any]) -> dict[str, Any]:
        seen.update(reports)
        return {"exit_code": 1, "total": sum(r["ok"] for r in reports.values())}

    try:
        thread, box = _in_thread(lambda: rank1.finish({"ok": 3, "status": "complete"}, conclude=lambda reports: {}))
        outcome = rank0.finish({"ok": 2, "status": "complete"}, conclude)
        thread.join(10)
    finally:
        rank0.detach()
        rank1.detach()
    assert seen == {0: {"ok": 2, "status": "complete"}, 1: {"ok": 3, "status": "complete"}}
    # rank 0 has merged and only has to print and exit: a SIGTERM (a peer exiting) must not cut it short
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert outcome == box["value"] == {"exit_code": 1, "total": 5}


def test_a_rank_with_an_error_of_its_own_waits_for_the_merge(store: Any) -> None:
    """A rank that fails by itself (not stopped from outside) reports, and exits only once rank 0 has merged:
    torchrun would otherwise stop rank 0 the moment the failing rank exits."""
    rank0 = World(rank=0, size=2, timeout=5)
    rank0.attach(store)
    rank1 = World(rank=1, size=2, timeout=5)
    rank1.attach(_peer(store))
    events: list[str] = []

    def conclude(reports: dict[int, Any]) -> dict[str, Any]:
        assert reports[1]["status"] == "interrupted" and reports[1]["waits"] is True
        time.sleep(0.5)  # the merge
        events.append("merged")
        return {"exit_code": 4, "message": "rank 1 stopped"}

    def fail() -> None:
        rank1.stopped({"rank": 1, "status": "interrupted"}, OSError("No space left on device"))
        events.append("rank 1 leaves")

    try:
        thread, box = _in_thread(fail)
        outcome = rank0.finish({"rank": 0, "status": "complete"}, conclude)
        events.append("rank 0 leaves")
        thread.join(10)
    finally:
        rank0.detach()
        rank1.detach()
    assert "error" not in box and outcome["exit_code"] == 4
    assert events[0] == "merged" and sorted(events[1:]) == ["rank 0 leaves", "rank 1 leaves"]


# --- merging rank CSVs ------------------------------------------------------------------------------------


def write_csv(path: Path, rows: Sequence[Sequence[str]] = (), columns: Sequence[str] = BASE_COLUMNS) -> None:
    atomic_write(path, csv_bytes(rows, columns, header=True))


def read_rows(path: Path, columns: Sequence[str] = BASE_COLUMNS) -> list[list[str]]:
    return list(iter_rows(path, columns))


def _row(path: str, status: str = "ok", target: str = "1") -> list[str]:
    row = dict.fromkeys(BASE_COLUMNS, "")
    row.update(path=path, status=status, target_index=target, pred_label="a, b")  # a field that needs quotes
    if status == "error":
        row["error"] = "OSError: cannot identify image file"
    return [row[c] for c in BASE_COLUMNS]


def _write_rank_csv(out: Path, rank: int, rows: list[list[str]], cut_last: bool = False) -> None:
    path = out / rank_csv_name(rank)
    write_csv(path, rows)
    if cut_last:
        data = path.read_bytes()
        path.write_bytes(data[: data.rfind(b"\r\n", 0, len(data) - 2) + 2] + b"zz/partial.png,ok,")


def test_merge_puts_rows_back_in_input_order_and_removes_rank_csvs(tmp_path: Path) -> None:
    order = [f"d/{i:02d}.png" for i in range(10)] + ["é/ünïcode.jpg"]
    write_csv(tmp_path / "predictions.csv", [_row(order[0])])  # kept from an earlier run (--resume)
    shares = [shard(order[1:], r, 3, 2) for r in range(3)]
    for r, share in enumerate(shares):
        rows = []
        for rel in share:
            rows += [_row(rel, target="1"), _row(rel, target="2")] if rel == "d/05.png" else [_row(rel)]
        _write_rank_csv(tmp_path, r, rows)
    counts = merge_csvs(tmp_path, order, BASE_COLUMNS)
    rows = read_rows(tmp_path / "predictions.csv")
    assert [r[0] for r in rows] == [*order[:6], "d/05.png", *order[6:]]
    assert [r[6] for r in rows if r[0] == "d/05.png"] == ["1", "2"]  # an image's rows stay in their order
    assert (counts.ok, counts.error, counts.rows) == (11, 0, 12)
    assert not list(tmp_path.glob("predictions.rank*.csv"))
    assert "é/ünïcode.jpg" in (tmp_path / "predictions.csv").read_text(encoding="utf-8")
    assert (tmp_path / "predictions.csv").read_bytes().startswith(b"path,status,error,")


def test_merge_keeps_the_newest_rows_and_drops_a_cut_off_row(tmp_path: Path) -> None:
    order = ["a.png", "b.png", "c.png", "d.png"]
    write_csv(tmp_path / "predictions.csv", [_row("a.png"), _row("b.png", "error")])
    _write_rank_csv(tmp_path, 0, [_row("b.png"), _row("c.png")])  # b.png explained again: this row wins
    _write_rank_csv(tmp_path, 1, [_row("d.png"), _row("zz/x.png")], cut_last=True)  # killed mid-row
    counts = merge_csvs(tmp_path, order, BASE_COLUMNS)
    rows = read_rows(tmp_path / "predictions.csv")
    assert [(r[0], r[1]) for r in rows] == [("a.png", "ok"), ("b.png", "ok"), ("c.png", "ok"), ("d.png", "ok")]
    assert (counts.ok, counts.error) == (4, 0)


def test_merge_sorts_a_file_that_is_out_of_order_and_keeps_unknown_paths_last(tmp_path: Path) -> None:
    order = ["a.png", "b.png", "c.png"]
    write_csv(tmp_path / "predictions.csv", [])
    _write_rank_csv(tmp_path, 0, [_row("c.png"), _row("gone.png", "error"), _row("a.png")])
    _write_rank_csv(tmp_path, 1, [_row("b.png")])
    counts = merge_csvs(tmp_path, order, BASE_COLUMNS)
    assert [r[0] for r in read_rows(tmp_path / "predictions.csv")] == ["a.png", "b.png", "c.png", "gone.png"]
    assert (counts.ok, counts.error) == (3, 1)


def test_a_foreign_csv_is_refused_and_stale_rank_csvs_are_removed(tmp_path: Path) -> None:
    (tmp_path / "predictions.rank0.csv").write_text("name,score\nx,1\n", encoding="utf-8")
    with pytest.raises(GradcamError, match=r"does not start with the predictions\.csv header"):
        merge_csvs(tmp_path, ["x"], BASE_COLUMNS)
    (tmp_path / "predictions.rank12.csv").write_text("", encoding="utf-8")
    (tmp_path / "predictions.rank.csv").write_text("", encoding="utf-8")  # not ours: kept
    assert fold_rank_csvs(tmp_path, list, keep=False, columns=BASE_COLUMNS) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.rank.csv"]


# --- torchrun end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist_inputs(tmp_path_factory: pytest.TempPathFactory, make_image: Callable[..., Path]) -> Path:
    """24 images of 3 sizes in 3 folders, png and jpg, plus one file that cannot be decoded (d1/broken.jpg)."""
    root = tmp_path_factory.mktemp("dist") / "imgs"
    for i in range(24):
        make_image(root / f"d{i % 3}" / f"img{i:02d}.{'png' if i % 2 else 'jpg'}", size=SIZES[i % 3], seed=100 + i)
    (root / "d1" / "broken.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def dist_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every run of these tests: also a metric column (drop), summary.json and a gate, all on the merged result."""
    cfg = tmp_path_factory.mktemp("dist_cfg") / "dist.yaml"
    cfg.write_text(
        f"model: {MODEL}\ninput_size: 64\ntarget_layers: [layer4]\nbatch_size: {BATCH}\nworkers: 0\nquiet: false\n"
        "metrics: [drop]\nsummary: true\nfail_under: ['increase=0.5']\n",
        encoding="utf-8",
    )
    return cfg


@pytest.fixture(scope="module")
def reference(dist_inputs: Path, dist_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process run everything is compared with, in this process, with one thread like every rank."""
    out = tmp_path_factory.mktemp("ref") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = explain([dist_inputs], out, load_settings(dist_config, save=["heatmap", "overlay"]))
    finally:
        torch.set_num_threads(threads)
    assert (summary.ok, summary.errors) == (24, 1)
    return out


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GRADCAM_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _torchrun(launcher: list[str], args: list[str | Path]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "gradcam_cli", "explain", *map(str, args)]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _csv_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _rank_exit_codes(stderr: str) -> list[int]:
    """The workers' exit codes from torchrun's failure report (it exits 1 whatever they were)."""
    return sorted(int(m) for m in re.findall(r"exitcode\s+:\s+(-?\d+)", stderr))


def _summary_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if " failed of " in ln and " images in " in ln]


@pytest.mark.slow
def test_two_ranks_give_the_same_results_as_one_process(
    dist_inputs: Path, dist_config: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    launcher = ["--standalone", "--nproc-per-node", "2"]
    proc = _run(_torchrun(launcher, [dist_inputs, "-o", out, "-c", dist_config]), _env())
    # the undecodable file: exit 1 from rank 0, whose code is the run's; rank 1 exits 0 once merged
    assert proc.returncode == 1 and _rank_exit_codes(proc.stderr) == [1], proc.stderr[-3000:]
    assert "rank      : 0 (local_rank: 0)" in proc.stderr
    # the same CSV, byte for byte (rows, order, values), and the same image files, byte for byte
    assert (out / "predictions.csv").read_bytes() == (reference / "predictions.csv").read_bytes()
    for folder in ("heatmaps", "overlays"):
        ours, theirs = _files(out / folder), _files(reference / folder)
        assert ours.keys() == theirs.keys() and len(ours) == 24
        assert [k for k in ours if ours[k] != theirs[k]] == []
    assert not list(out.glob("predictions.rank*.csv")) and not list(out.rglob("*.tmp"))
    assert not (out / LOCK).exists()  # rank 0's lock of OUT ends with the job
    # metric columns are in the CSV compared above; summary.json and its gate were made from the merged CSV
    header = (out / "predictions.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == ",".join(columns_for(COLUMN_NAMES))  # the same header as one process writes
    ours, theirs = (json.loads((d / "summary.json").read_text(encoding="utf-8")) for d in (out, reference))
    assert ours["counts"]["images"] == 25 and ours["gates"][0]["gate"] == "--fail-under increase=0.5"
    assert {**ours, "generated": None} == {**theirs, "generated": None}
    assert "--fail-under increase=0.5" in proc.stderr, proc.stderr[-3000:]  # rank 0 reports the gate
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["status"] == "complete"
    assert run["counts"] == {"images": 25, "ok": 24, "error": 1, "missing": 0}
    assert run["distributed"]["world_size"] == 2 and run["distributed"]["backend"] == "gloo"
    ranks = run["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["status"] == "complete" for r in ranks)
    assert [r["images"] for r in ranks] == [13, 12]  # 13 batches of 2: 7 to rank 0, 6 to rank 1
    assert sum(r["ok"] for r in ranks) == 24 and sum(r["error"] for r in ranks) == 1
    assert all(r["images_per_second"] > 0 and r["device"] == "cpu" for r in ranks)
    assert run["images_per_second"] > 0
    # only rank 0 prints the summary; torchrun reports the exit code 1 in its own way
    summaries = _summary_lines(proc.stderr)
    assert len(summaries) == 1 and "24 ok, 1 failed of 25 images" in summaries[0], proc.stderr[-3000:]
    assert "by 2 processes" in summaries[0]
    assert not [ln for ln in proc.stderr.splitlines() if "gradcam_cli" in ln and 'File "' in ln]  # no traceback of ours


def test_a_job_into_an_out_another_run_holds_is_refused_by_rank_0_at_once(
    dist_inputs: Path, dist_config: Path, tmp_path: Path
) -> None:
    """Rank 0 takes the one lock of OUT for the whole job: held elsewhere, every rank stops, with one line."""
    out = tmp_path / "out"
    out.mkdir()
    lock = {"pid": 4242, "host": "node-17", "started": "2026-11-30T00:00:00+0000", "boot_id": "", "process_start": ""}
    (out / LOCK).write_text(json.dumps(lock), encoding="utf-8")
    launcher = ["--standalone", "--nproc-per-node", "2"]
    proc = _run(_torchrun(launcher, [dist_inputs, "-o", out, "-c", dist_config]), _env(), timeout=120)
    assert _rank_exit_codes(proc.stderr) == [2], proc.stderr[-3000:]  # rank 0's usage error; rank 1 exits 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "[rank 0/2]" in errors[0] and "pid 4242 on node-17" in errors[0], errors
    assert json.loads((out / LOCK).read_text(encoding="utf-8")) == lock and sorted(out.iterdir()) == [out / LOCK]


@pytest.mark.slow
def test_a_killed_rank_does_not_hang_the_others_and_resume_completes(
    dist_inputs: Path, dist_config: Path, reference: Path, tmp_path: Path
) -> None:
    """Rank 1 dies by SIGKILL in the middle of its share, with no launcher to stop rank 0 (as when another node
    dies): rank 0 must finish, give rank 1 up after --dist-timeout, merge what was done, and exit 4 with one
    line. The two ranks are plain processes with torchrun's variables (as srun or a job script starts them)."""
    out = tmp_path / "out"
    args = ["-c", str(dist_config), "--dist-timeout", "3"]
    cmd = [sys.executable, "-m", "gradcam_cli", "explain", str(dist_inputs), "-o", str(out), *args]
    port = str(_free_port())
    ranks = [
        subprocess.Popen(
            cmd,
            env=_env(
                RANK=str(k),
                LOCAL_RANK=str(k),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                GRADCAM_TEST_KILL_RANK="1",
                GRADCAM_TEST_KILL_AT="5",  # the probe is forward 1: dies in batch 4
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (0, 1)
    ]
    try:
        stderr0 = ranks[0].communicate(timeout=150)[1]  # a hang fails here
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
    assert ranks[1].returncode == -signal.SIGKILL
    assert ranks[0].returncode == 4, stderr0[-3000:]
    errors = [ln for ln in stderr0.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in stderr0, stderr0[-3000:]
    assert errors[0].startswith("Error: [rank 0/2] rank 1 stopped responding (no heartbeat for 3 s)")
    assert "Run the same command again with --resume" in errors[0]

    # what was done is kept and merged: all of rank 0's share, a leading part of rank 1's, rows as in one process
    ref_rows = _csv_rows(reference)
    ref_paths = [r["path"] for r in ref_rows]
    rows = _csv_rows(out)
    paths = [r["path"] for r in rows]
    rank0_share, rank1_share = shard(ref_paths, 0, 2, BATCH), shard(ref_paths, 1, 2, BATCH)
    assert set(rank0_share) <= set(paths)
    done1 = [p for p in paths if p in rank1_share]
    assert done1 == rank1_share[: len(done1)] and len(done1) < len(rank1_share)
    assert rows == [r for r in ref_rows if r["path"] in set(paths)]  # same rows, input order
    assert all((out / r["heatmap"]).is_file() for r in rows if r["status"] == "ok")
    assert not list(out.glob("predictions.rank*.csv"))
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["status"] == "incomplete"
    assert run["counts"]["missing"] == 25 - len(paths) > 0
    assert [r["status"] for r in run["ranks"]] == ["complete", "lost"]

    # --resume, here with one process: explains only what is missing, and the set is complete
    before_ok = {r["path"] for r in rows if r["status"] == "ok"}
    summary = explain([dist_inputs], out, load_settings(dist_config, resume=True, quiet=True))
    assert (summary.ok, summary.errors, summary.skipped) == (24, 1, len(before_ok))
    _assert_same_set(out, reference)


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_stops_the_others_cleanly_and_resume_completes(
    dist_inputs: Path, dist_config: Path, reference: Path, tmp_path: Path
) -> None:
    """One node: when rank 1 dies, torchrun stops rank 0 with SIGTERM. Rank 0 stops cleanly (its batches kept,
    run.json 'interrupted', one line); nothing is merged, the rank CSVs stay; --resume with 2 ranks merges
    them and explains only what is missing."""
    out = tmp_path / "out"
    launcher = ["--standalone", "--nproc-per-node", "2"]
    args: list[str | Path] = [dist_inputs, "-o", out, "-c", dist_config]
    proc = _run(_torchrun(launcher, args), _env(GRADCAM_TEST_KILL_RANK="1", GRADCAM_TEST_KILL_AT="5"))
    assert proc.returncode == 1 and -9 in _rank_exit_codes(proc.stderr), proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: [rank 0/2] stopped by SIGTERM"), proc.stderr[-3000:]
    assert "--resume" in errors[0]
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["status"] == "interrupted" and "predictions.rank<k>.csv" in run["note"]
    ref_rows = _csv_rows(reference)
    ref_paths = [r["path"] for r in ref_rows]
    columns = columns_for(COLUMN_NAMES)
    assert read_rows(out / "predictions.csv", columns) == []  # nothing merged
    done = []
    for k in (0, 1):  # each rank CSV holds a leading part of that rank's share, rows as in one process
        rows = read_rows(out / rank_csv_name(k), columns)
        share = shard(ref_paths, k, 2, BATCH)
        assert [r[0] for r in rows] == share[: len(rows)]
        done += [r[0] for r in rows if r[1] == "ok"]
    assert len(done) < 24

    proc = _run(_torchrun(launcher, [*args, "--resume"]), _env())
    assert proc.returncode == 1 and _rank_exit_codes(proc.stderr) == [1], proc.stderr[-3000:]  # broken.jpg
    summaries = _summary_lines(proc.stderr)
    assert len(summaries) == 1 and f"24 ok ({len(done)} already done), 1 failed of 25" in summaries[0], proc.stderr[
        -3000:
    ]
    _assert_same_set(out, reference)
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["status"] == "complete" and run["counts"] == {"images": 25, "ok": 24, "error": 1, "missing": 0}
    assert run["resume"] == {"skipped": len(done)}
    assert sum(r["images"] for r in run["ranks"]) == 25 - len(done)  # error rows are tried again


def _assert_same_set(out: Path, reference: Path) -> None:
    """Every image once, in input order, with the reference's results, and its files."""
    rows, ref_rows = _csv_rows(out), _csv_rows(reference)
    assert [r["path"] for r in rows] == [r["path"] for r in ref_rows]
    exact = ("status", "pred_index", "target_index", "layer", "heatmap", "overlay")
    assert [[r[k] for k in exact] for r in rows] == [[r[k] for k in exact] for r in ref_rows]
    for ours, theirs in zip(rows, ref_rows, strict=True):
        if ours["status"] == "ok":  # batches differ from the one-process run's: allow float rounding
            assert abs(float(ours["pred_prob"]) - float(theirs["pred_prob"])) < 1e-4
            assert all((out / ours[k]).is_file() for k in ("heatmap", "overlay"))
    assert _files(out / "heatmaps").keys() == _files(reference / "heatmaps").keys()
    assert not list(out.glob("predictions.rank*.csv")) and not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_rank_csvs_left_by_a_stopped_run_are_merged_on_resume_or_removed_on_a_fresh_run(
    dist_inputs: Path, dist_config: Path, reference: Path, tmp_path: Path
) -> None:
    """When rank 0 itself was stopped (torchrun stops every rank when one dies), no merge happened: the rank CSVs
    are what is done. --resume, with any number of processes (here one), merges them first and finishes."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    columns = columns_for(COLUMN_NAMES)
    ref = read_rows(reference / "predictions.csv", columns)
    paths = [r[0] for r in ref]
    share0, share1 = shard(paths, 0, 2, BATCH), shard(paths, 1, 2, BATCH)
    done = set(share0[:4]) | set(share1)  # rank 0 stopped after 2 batches, rank 1 finished
    write_csv(out / "predictions.csv", columns=columns)  # as rank 0 lays it down at the start
    write_csv(out / rank_csv_name(0), [r for r in ref if r[0] in share0[:4]], columns)
    write_csv(out / rank_csv_name(1), [r for r in ref if r[0] in share1], columns)
    for row in ref:
        if row[0] not in done:
            for rel in (row[BASE_COLUMNS.index("heatmap")], row[BASE_COLUMNS.index("overlay")]):
                if rel:
                    (out / rel).unlink()
    settings = load_settings(dist_config, save=["heatmap", "overlay"], resume=True, quiet=True)
    summary = explain([dist_inputs], out, settings)
    ok_done = len([r for r in ref if r[0] in done and r[1] == "ok"])
    assert (summary.ok, summary.errors, summary.skipped) == (24, 1, ok_done)
    _assert_same_set(out, reference)

    # a fresh run (no --resume) does not mix in the rank CSVs of an earlier run: they are stale
    write_csv(out / rank_csv_name(3), ref[:3], columns)
    summary = explain([dist_inputs], out, settings.replace(resume=False, limit=2))
    assert summary.total == 2 and not list(out.glob("predictions.rank*.csv"))
    assert [r["path"] for r in _csv_rows(out)] == paths[:2]
