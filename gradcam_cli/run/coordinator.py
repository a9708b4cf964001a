"""Who does what in a run: one process alone, or the ranks of a torchrun job, behind the same methods.

The explain flow calls `list_files`, `started`, `prepare` (the leader prepares OUT; every process gets its
`Share`), then `finish` (or `stopped` after an exception); it never asks which kind of run it is. The local
coordinator does each step itself; the torchrun one talks to the other ranks through `world.World` and,
on rank 0, merges the rank CSVs and writes one run.json for the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gradcam_cli.data.discover import ImageFile
from gradcam_cli.errors import ExitCode, Interrupted, MachineFault, RunStopped, one_line
from gradcam_cli.out import names
from gradcam_cli.out.manifest import Manifest, now, timing
from gradcam_cli.out.merge import merge_csvs
from gradcam_cli.out.resume import restore_input_order
from gradcam_cli.out.table import Row, csv_text
from gradcam_cli.run.plan import RunPlan
from gradcam_cli.run.tally import RunSummary, Tally
from gradcam_cli.run.world import World, host

LogFn = Callable[[str], None]
STOPPED_NOTE = (
    "this run stopped before the ranks' results were merged: the predictions.rank<k>.csv files in this folder "
    "hold them; run the same command with --resume to merge them and explain only what is missing"
)


@dataclass(frozen=True)
class Share:
    """What this process explains (after --resume and sharding) and what its CSV starts with."""

    files: tuple[ImageFile, ...]
    csv_name: str
    keep_rows: tuple[Row, ...]  # rows of an earlier run that --resume keeps
    resumed: int  # images an earlier run already explained (the leader knows)


class Coordinator(Protocol):
    leader: bool  # rank 0, or the one process: logs, prepares OUT, writes run.json, audits

    def session(self, device_spec: str) -> Any: ...
    def device(self, spec: str) -> str: ...
    def list_files(self, discover: Callable[[], list[ImageFile]]) -> list[ImageFile]: ...
    def started(self) -> None: ...
    def prepare(self, plan: RunPlan, manifest: Manifest, log: LogFn) -> Share: ...
    def finish(self, plan: RunPlan, manifest: Manifest, share: Share, tally: Tally) -> RunSummary: ...
    def stopped(self, plan: RunPlan, manifest: Manifest, share: Share, tally: Tally, exc: BaseException) -> None: ...


def coordinator_from_env(timeout: float) -> Coordinator:
    """Torchrun's when this process is one rank of several, else the local one."""
    world = World.from_env(timeout)
    return TorchrunCoordinator(world) if world.active else LocalCoordinator()


def _prepare_out(plan: RunPlan, manifest: Manifest, log: LogFn) -> tuple[set[str], list[Row]]:
    """The leader's part of `prepare`: OUT ready for writing; the images and rows --resume keeps."""
    state = plan.folder.prepare(
        manifest, [f.rel for f in plan.files], plan.outputs, plan.columns, plan.settings.resume, log
    )
    return state.done, state.kept_rows


def stop_status(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """run.json's status after `exc` ended a run, and what it adds: `stopped` with a note when the machine
    stopped it (a full disk, ...), `interrupted` with the signal for Ctrl-C, SIGTERM and SIGHUP."""
    if isinstance(exc, MachineFault):
        note = "the machine stopped this run; what is listed in the CSV is complete: --resume finishes the rest"
        return "stopped", {"reason": one_line(exc), "note": note}
    if isinstance(exc, Interrupted):
        return "interrupted", {"reason": exc.name}
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", {"reason": "SIGINT"}
    return "interrupted", {"reason": one_line(exc)}


def _summary(plan: RunPlan, tally: Tally, share: Share) -> RunSummary:
    return RunSummary(
        out=str(plan.folder.path),
        total=len(plan.files),
        ok=tally.ok + share.resumed,
        errors=tally.errors,
        seconds=tally.seconds,
        images_per_second=tally.done / tally.seconds if tally.seconds > 0 else 0.0,
        layers=list(plan.layers),
        stages=tally.stages,
        skipped=share.resumed,
        skipped_confident=tally.skipped,
    )


class LocalCoordinator:
    """One process does everything: prepares OUT, explains every image, writes run.json."""

    leader = True

    @contextmanager
    def session(self, device_spec: str) -> Iterator[None]:
        yield

    def device(self, spec: str) -> str:
        return spec

    def list_files(self, discover: Callable[[], list[ImageFile]]) -> list[ImageFile]:
        return discover()

    def started(self) -> None:
        pass

    def prepare(self, plan: RunPlan, manifest: Manifest, log: LogFn) -> Share:
        done, kept = _prepare_out(plan, manifest, log)
        manifest.write()
        files = tuple(f for f in plan.files if f.rel not in done)
        return Share(files, names.PREDICTIONS, tuple(kept), len(done))

    def _close(self, plan: RunPlan, manifest: Manifest, share: Share, tally: Tally, status: str, **extra: Any) -> None:
        counts = {"images": len(plan.files), "ok": tally.ok + share.resumed, "error": tally.errors}
        if plan.settings.only_below is not None:
            counts["skipped"] = tally.skipped
        manifest.close(status, **tally.notes, counts=counts, **tally.timing(), **extra)

    def finish(self, plan: RunPlan, manifest: Manifest, share: Share, tally: Tally) -> RunSummary:
        if share.resumed:  # kept rows came first: back into input order, as an uninterrupted run has them
            restore_input_order(plan.folder.predictions, [csv_text(f.rel) for f in plan.files], plan.columns)
        self._close(plan, manifest, share, tally, "complete")
        return _summary(plan, tally, share)

    def stopped(self, plan: RunPlan, manifest: Manifest, share: Share, tally: Tally, exc: BaseException) -> None:
        """run.json after `exc`: counts of what reached the CSV before it (rows of batches still being written
        when it came count too: the writer finishes them)."""
        status, extra = stop_status(exc)
        self._close(plan, manifest, share, tally, status, **extra)


class TorchrunCoordinator:
    """One rank of a torchrun job (see `world` for how the ranks talk and what happens when one dies).

    Rank 0 lists the inputs and prepares OUT; each rank explains its share (whole batches dealt round robin)
    into its own rank CSV; at the end rank 0 merges the rank CSVs into predictions.csv in input order and
    writes one run.json with per-rank counts and throughput, and every rank returns the same summary.
    """

    def __init__(self, world: World) -> None:
        self.world = world
        self.leader = world.rank == 0

    @contextmanager
    def session(self, device_spec: str) -> Iterator[None]:
        with self.world.joined(device_spec), self.world.starting():
            yield

    def device(self, spec: str) -> str:
        return self.world.pick_device(spec)

    def list_files(self, discover: Callable[[], list[ImageFile]]) -> list[ImageFile]:
        listed = self.world.from_rank0("inputs", lambda: [(str(f.path), f.rel, f.error) for f in discover()])
        return [ImageFile(Path(path), rel, error) for path, rel, error in listed]

    def started(self) -> None:
        self.world.agree(None)

    def prepare(self, plan: RunPlan, manifest: Manifest, log: LogFn) -> Share:
        resumed = 0

        def prepare_out() -> list[int] | None:
            nonlocal resumed
            done, kept = _prepare_out(plan, manifest, log)
            manifest.update(distributed=self.world.describe())
            plan.folder.start_predictions(kept, plan.columns)  # the rows merged so far
            manifest.write()
            resumed = len(done)
            return [i for i, f in enumerate(plan.files) if f.rel not in done] if done else None

        left = self.world.from_rank0("todo", prepare_out)
        plan.folder.path.mkdir(parents=True, exist_ok=True)
        files = plan.files if left is None else [plan.files[i] for i in left]
        share = self.world.shard(files, plan.settings.batch_size)
        return Share(tuple(share), names.rank_csv(self.world.rank), (), resumed)

    def _report(self, plan: RunPlan, share: Share, tally: Tally, status: str) -> dict[str, Any]:
        """This rank's results for rank 0."""
        report = {"rank": self.world.rank, "host": host(), "device": str(plan.device), "status": status}
        report.update(images=len(share.files), ok=tally.ok, error=tally.errors, skipped=tally.skipped)
        report.update(tally.timing())
        return report

    def finish(self, plan: RunPlan, manifest: Manifest, share: Share, tally: Tally) -> RunSummary:
        """Every rank reports; rank 0 waits for all of them (a rank whose heartbeat stopped is given up on),
        merges and writes run.json; every rank returns the same summary, or raises when images are missing."""
        report = self._report(plan, share, tally, "complete")
        manifest.update(status="complete", finished=now(), **tally.notes)
        concluding = False

        def conclude(reports: dict[int, Any]) -> dict[str, Any]:
            nonlocal concluding
            concluding = True
            return self._conclude(plan, manifest, reports, tally.started, share.resumed)

        try:
            outcome = self.world.finish(report, conclude)
        except BaseException as exc:
            if self.leader and not concluding:  # stopped while waiting for the others: nothing merged yet
                self.world.stopped(report, exc)
                manifest.close("interrupted", ranks=[report], note=STOPPED_NOTE)
            raise
        if outcome["exit_code"] not in (ExitCode.OK, ExitCode.IMAGE_ERRORS):
            raise RunStopped(outcome["message"], outcome["exit_code"], quiet=not self.leader)
        totals = outcome["summary"]
        return RunSummary(
            out=str(plan.folder.path),
            total=totals["total"],
            ok=totals["ok"],
            errors=totals["errors"],
            seconds=totals["seconds"],
            images_per_second=totals["images_per_second"],
            layers=list(plan.layers),
            stages=totals["stages"],
            skipped=totals["skipped"],
            skipped_confident=totals["confident"],
            ranks=self.world.size,
        )

    def stopped(self, plan: RunPlan, manifest: Manifest, share: Share, tally: Tally, exc: BaseException) -> None:
        status, extra = stop_status(exc)
        report = self._report(plan, share, tally, status)
        report["reason"] = extra["reason"]
        self.world.stopped(report, exc)
        if self.leader:
            manifest.close(status, **tally.notes, ranks=[report], note=STOPPED_NOTE)

    def _conclude(
        self, plan: RunPlan, manifest: Manifest, reports: dict[int, Any], started: float, resumed: int
    ) -> dict[str, Any]:
        """Rank 0, once every rank has reported or been given up on: merge the rank CSVs into predictions.csv,
        write run.json (totals, per-rank counts and throughput) and return the outcome every rank gets: the
        exit code (4 when images have no result, with the message saying why and what to do), and the totals."""
        out, size = plan.folder.path, self.world.size
        order = [csv_text(f.rel) for f in plan.files]
        ranks = [reports.get(r) or {"rank": r, "status": "lost"} for r in range(size)]
        done_by = {r["rank"]: r.get("ok", 0) + r.get("error", 0) + r.get("skipped", 0) for r in ranks}
        unseen = [r for r, n in done_by.items() if r != 0 and n and not (out / names.rank_csv(r)).is_file()]
        t0 = time.perf_counter()
        merged = merge_csvs(out, order, plan.columns)
        seconds = time.perf_counter() - started  # rank 0's, from its first batch to the merge: the run's wall time
        done = sum(done_by.values())
        missing = len(order) - merged.images
        stage_names = [k for r in ranks for k in r.get("stage_seconds", {})]
        stages = {k: sum(r.get("stage_seconds", {}).get(k, 0.0) for r in ranks) for k in dict.fromkeys(stage_names)}
        counts = {"images": len(order), "ok": merged.ok, "error": merged.error, "missing": missing}
        if plan.settings.only_below is not None:
            counts["skipped"] = merged.skipped
        manifest.close(
            "complete" if missing == 0 else "incomplete",
            counts=counts,
            **timing(seconds, done, stages),  # stages summed over the ranks
            merge_seconds=round(time.perf_counter() - t0, 3),
            ranks=ranks,
        )
        message = None
        if missing:
            message = self._missing_message(ranks, unseen, out, missing, len(order), merged.images)
        summary = {"total": len(order), "ok": merged.ok, "errors": merged.error, "seconds": seconds, "stages": stages}
        summary.update(images_per_second=done / seconds if seconds > 0 else 0.0, skipped=resumed)
        summary.update(confident=merged.skipped)
        code = ExitCode.STOPPED if missing else (ExitCode.IMAGE_ERRORS if merged.error else ExitCode.OK)
        return {"exit_code": int(code), "message": message, "summary": summary}

    def _missing_message(
        self, ranks: Sequence[dict[str, Any]], unseen: Sequence[int], out: Path, missing: int, total: int, have: int
    ) -> str:
        why = []
        for r in ranks:
            if r["status"] == "lost":
                why.append(f"rank {r['rank']} stopped responding (no heartbeat for {self.world.timeout:g} s)")
            elif r["status"] != "complete":
                why.append(f"rank {r['rank']} stopped ({r.get('reason', r['status'])})")
        if unseen:
            why.append(
                f"{', '.join(names.rank_csv(r) for r in unseen)} not found in {out} as rank 0 sees it "
                "(with several nodes, -o must be a folder every node shares, at the same path)"
            )
        return (
            f"{'; '.join(why) or 'ranks stopped early'}: {missing} of {total} images have no result; "
            f"the {have} explained are in {out / names.PREDICTIONS}. Run the same command again "
            "with --resume to explain only the missing ones"
        )
