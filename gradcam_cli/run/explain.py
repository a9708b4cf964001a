"""`explain`: plan the run, probe it, prepare OUT, run the batch loop, record the outcome, audit it.

Per-image problems become `status=error` rows; problems with the call itself raise GradcamError before OUT
is touched. Under torchrun each rank explains its share and rank 0 merges (`coordinator`); only rank 0 logs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from pathlib import Path

from gradcam_cli.audit.diff.compare import DiffResult, diff
from gradcam_cli.audit.diff.gates import DIFF_GATE_KEYS
from gradcam_cli.audit.gates import gates_from
from gradcam_cli.cam.engine import CamEngine
from gradcam_cli.config import Settings, check_audit_settings
from gradcam_cli.data.discover import ImageFile, list_base, select_files
from gradcam_cli.errors import GradcamError, MachineFault
from gradcam_cli.out import names
from gradcam_cli.out.folder import OutputFolder
from gradcam_cli.out.manifest import Manifest
from gradcam_cli.out.writer import OutputWriter
from gradcam_cli.render.encode import pillow_block_cache, restore_pillow_blocks
from gradcam_cli.run.coordinator import Coordinator, coordinator_from_env, stop_status
from gradcam_cli.run.loop import BatchLoop, ProgressFn
from gradcam_cli.run.plan import RunPlan, plan_run, probe
from gradcam_cli.run.tally import RunSummary, Tally

LogFn = Callable[[str], None]


def _silent(message: str) -> None:
    pass


def explain(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    settings: Settings,
    progress: ProgressFn | None = None,
    log: LogFn | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunSummary:
    """Explain every image under `inputs` into `out`: heatmaps/, overlays/, npy/, predictions.csv, run.json.

    `progress(n)` is called after each batch with its number of images, `on_start(n)` once with the number of
    images this process will explain, `log(message)` for messages to the user.
    """
    if isinstance(inputs, (str, os.PathLike)):  # one folder or file: a str must not be walked letter by letter
        inputs = [inputs]
    coordinator = coordinator_from_env(settings.dist_timeout)
    say = (log or _silent) if coordinator.leader else _silent
    folder = OutputFolder(out)
    with ExitStack() as held:
        held.callback(folder.unlock)  # at the very end (after the audit), also after an error or a signal
        with coordinator.session(settings.device):
            check_audit_settings(settings)
            folder.check_writable()
            check_compare_to(settings, folder.path)

            def discover() -> list[ImageFile]:
                """The leader (rank 0 under torchrun) takes an existing OUT's lock at once, so a second run is
                refused before loading anything; a new OUT is created, and locked, when the run prepares it."""
                if folder.path.is_dir():
                    folder.lock(say)
                return select_files(inputs, folder.path, settings.sample_rate, settings.limit, settings.files_from)

            files = coordinator.list_files(discover)
            roots = list(inputs)
            if settings.files_from is not None:  # the list's folder is a root: labels.csv, the report's originals
                roots.append(list_base(settings.files_from))
            device = coordinator.device(settings.device)
            plan = plan_run(settings, roots, folder, files, device, coordinator.leader, say)
            with plan.engine() as engine:
                notes = [*plan.notes, *probe(plan, engine)]
                coordinator.started()
                for note in notes:
                    say(note)
                summary = _run(plan, engine, coordinator, say, progress, on_start)
        if plan.audit is not None:
            summary.audit = plan.audit.run(folder.path)
        if settings.compare_to is not None and coordinator.leader:
            summary.diff = compare_after(settings, folder.path, say)
    return summary


def check_compare_to(settings: Settings, out: Path) -> None:
    """`--compare-to OUT_A` must be an earlier explain output and not this run's OUT: said before any work."""
    if settings.compare_to is None:
        return
    earlier = Path(settings.compare_to)
    if not (earlier / names.PREDICTIONS).is_file():
        raise GradcamError(f"--compare-to {earlier}: no predictions.csv there; give the -o folder of an earlier run")
    if earlier.resolve() == out.resolve():
        raise GradcamError(f"--compare-to {earlier}: that is this run's own output folder")


def compare_after(settings: Settings, out: Path, log: LogFn) -> DiffResult:
    """The diff of this run (B) against `--compare-to` (A), into OUT/diff, with the diff's gates of
    --fail-under/--fail-over (the audit checks the others)."""
    gates = [g for g in gates_from(settings.fail_under, settings.fail_over) if g.key in DIFF_GATE_KEYS]
    assert settings.compare_to is not None
    return diff(settings.compare_to, out, gates=gates, log=log)


def _run(
    plan: RunPlan,
    engine: CamEngine,
    coordinator: Coordinator,
    log: LogFn,
    progress: ProgressFn | None,
    on_start: Callable[[int], None] | None,
) -> RunSummary:
    """run.json is written first (status running) and again at the end, also when the run is interrupted or the
    machine stopped it (status `stopped`: a full disk says where, how far the run got and that --resume
    finishes it)."""
    manifest = plan.folder.manifest(plan.describe(), plan.settings.fsync)
    try:
        share = coordinator.prepare(plan, manifest, log)
    except BaseException as exc:
        _stopped_early(manifest, exc)
        if isinstance(exc, MachineFault):
            raise MachineFault(f"{exc}; nothing was explained yet: {_free_and_resume(plan)}") from None
        raise
    tally = Tally()
    writer: OutputWriter | None = None
    try:  # from here on, whatever stops the run (a signal a moment after run.json was written too) is recorded
        if on_start is not None:
            on_start(len(share.files))
        loop = BatchLoop(plan, engine, share.files)
        writer = plan.folder.writer(share.csv_name, plan.columns, share.keep_rows, plan.settings.fsync)
        blocks = pillow_block_cache()
        try:
            loop.run(writer, tally, progress)
        finally:
            try:
                writer.close()
            finally:
                restore_pillow_blocks(blocks)
                tally.count_written(writer.images_written)
                tally.stages["write_threads"] = writer.write_seconds
                loop.report(tally)
                tally.stop_clock()
    except BaseException as exc:
        try:
            coordinator.stopped(plan, manifest, share, tally, exc)
        except MachineFault:
            if not isinstance(exc, MachineFault):
                raise  # run.json could not say it; the disk's fault is the news then
        if isinstance(exc, MachineFault):
            done = share.resumed + (sum(writer.images_written.values()) if writer is not None else 0)
            raise MachineFault(
                f"{exc}; stopped after {done} of {len(plan.files)} images (kept in {plan.folder.path}): "
                f"{_free_and_resume(plan)}"
            ) from None
        raise
    return coordinator.finish(plan, manifest, share, tally)


def _stopped_early(manifest: Manifest, exc: BaseException) -> None:
    """A run stopped while OUT was being prepared: if run.json already says `running`, it says how it ended
    instead (best effort: the disk may be what stopped it)."""
    if manifest.written:
        status, extra = stop_status(exc)
        with suppress(Exception):
            manifest.close(status, **extra)


def _free_and_resume(plan: RunPlan) -> str:
    return "free some space (or fix the folder) and run the same command with --resume to finish the rest"
