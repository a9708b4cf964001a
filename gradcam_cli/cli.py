"""The `gradcam` command: Click only. Parses flags, calls `gradcam_cli.api` (or the model listings), and maps
errors to one line and an `ExitCode`. It holds no logic the Python API lacks, and is the only module that
prints. torch is imported only inside the commands that need it, so `--help` and usage errors answer at once.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click

from gradcam_cli import __version__
from gradcam_cli.audit.diff.gates import FLIPS, SIMILARITIES_OVER, SIMILARITIES_UNDER
from gradcam_cli.audit.metrics import GATES_OVER, GATES_UNDER, METRIC_NAMES
from gradcam_cli.config import (
    AMP_MODES,
    BASELINES,
    DECODE_MODES,
    FUSE_MODES,
    METHOD_NAMES,
    PREPROCESS_MODES,
    RANDOMIZATION_MODES,
    check_audit_settings,
    check_diff_gates,
    load_settings,
)
from gradcam_cli.errors import ExitCode, GradcamError, Interrupted, RunStopped
from gradcam_cli.render.colormaps import COLORMAP_NAMES
from gradcam_cli.run.world import env_rank, env_world_size

UNDER_KEYS, OVER_KEYS = ", ".join(GATES_UNDER), ", ".join(GATES_OVER)
GAP_KEYS = "gap:KEY or gap:ATTRIBUTE:KEY, the largest gap between --groups of KEY: accuracy or a metric's key"
MIN_COUNT_HELP = "Values of a number a group needs to take part in the gaps between groups."
GROUPS_HELP = (
    "Slice the summary by group: a CSV of path,<attribute>... (e.g. path,site,camera) or folders:N (the N-th "
    "folder of each path)."
)
DIFF_UNDER_KEYS = ", ".join(SIMILARITIES_UNDER)
DIFF_OVER_KEYS = ", ".join((FLIPS, *SIMILARITIES_OVER))


def _fail(message: str, code: int = ExitCode.USAGE) -> NoReturn:
    size = env_world_size()
    where = f"[rank {env_rank()}/{size}] " if size > 1 else ""  # under torchrun: which process says it
    click.echo(f"Error: {where}{message}", err=True)
    sys.exit(code)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body, turning every known failure into one line on stderr and an exit code."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GradcamError as exc:
            _fail(str(exc))
        except RunStopped as exc:
            if exc.quiet:  # another rank of a distributed run: rank 0 says it, and exits with the run's code
                sys.exit(ExitCode.OK)
            _fail(str(exc), exc.exit_code)
        except BrokenPipeError:
            # `gradcam models | head`: the reader went away; that is not an error
            sys.stderr.close()
            os._exit(ExitCode.OK)
        except Interrupted as exc:
            _fail(
                f"stopped by {exc.name}; everything written so far is kept: run the same command with --resume to "
                "finish",
                128 + exc.signum,
            )
        except KeyboardInterrupt:
            _fail("interrupted; everything written so far is kept", ExitCode.INTERRUPTED)
        except MemoryError:
            _fail("out of memory; try a smaller --batch-size", ExitCode.IMAGE_ERRORS)
        except Exception as exc:
            if os.environ.get("GRADCAM_DEBUG"):
                raise
            first = " ".join(str(exc).split())[:300]
            _fail(f"unexpected {type(exc).__name__}: {first} (set GRADCAM_DEBUG=1 for the traceback)", ExitCode.STOPPED)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


GRACEFUL_SIGNALS = ("SIGTERM", "SIGHUP")  # what CI cancellation, `timeout`, Kubernetes, Slurm, a closed terminal send


@contextmanager
def _graceful_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end a run as Ctrl-C does (everything written is kept, run.json says `interrupted`),
    with exit code 128 + the signal. The first one is acted on; later ones are ignored so that the unwinding
    (finishing the batches being written, run.json) is not cut short."""
    signums = [getattr(signal, name) for name in GRACEFUL_SIGNALS if hasattr(signal, name)]
    if not threading_main():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        for other in signums:
            signal.signal(other, signal.SIG_IGN)
        raise Interrupted(signum, signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, stop) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # only where ours is still set: under torchrun a rank that has handed over its results ignores
            # SIGTERM up to its exit (torchrun sends it when rank 0 exits), and that must stay so
            if signal.getsignal(signum) is stop:
                signal.signal(signum, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _switch(name: str, help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--NAME/--no-NAME`, None when not given (so a config file's value stands)."""
    return click.option(f"--{name}/--no-{name}", default=None, help=help)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="gradcam")
def main() -> None:
    """Explain what an image classifier looks at, for whole folders of images at once."""


@main.command()
@click.argument("inputs", nargs=-1, type=click.Path(path_type=str))
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=str),
    help="Output folder (created; existing outputs are overwritten).",
)
@click.option(
    "-c",
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="YAML config; flags given on the command line win over it.",
)
@click.option(
    "--model",
    help="torchvision model name (see `gradcam models`), package.module:callable, timm:NAME (a timm model) or "
    "hf:PATH_OR_REPO_ID (a Hugging Face image classifier).",
)
@click.option(
    "--weights",
    help="DEFAULT, a weights enum name (IMAGENET1K_V2), none, or a checkpoint path. "
    "[default: DEFAULT for torchvision, timm and hf models, none for factories]",
)
@click.option(
    "--layer",
    "target_layers",
    multiple=True,
    help="Target layer path, e.g. layer4, layer4.-1, layer4[-1]; MODULE:input for a module's input "
    "(repeatable). [default: auto-detect]",
)
@click.option(
    "--method", type=click.Choice(METHOD_NAMES), help="CAM method (README: when to use which). [default: gradcam]"
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    help="pred, label (the true class, see --truth), topk:K, a class index or a class name (repeatable). "
    "[default: pred]",
)
@click.option(
    "--fuse",
    type=click.Choice(FUSE_MODES),
    help="With several --layer: one map per layer (none) or one fused map, mean or max of the per-layer maps "
    "normalised and upsampled to the largest layer. [default: none]",
)
@_switch("counterfactual", "Explain the negated score: regions that argue against the class. [default: off]")
@_switch("aug-smooth", "Average the maps over horizontal flips x contrast 0.9/1/1.1 (6 passes). [default: off]")
@_switch("eigen-smooth", "Replace the channel sum by its first principal component (less noise). [default: off]")
@click.option(
    "--chunk-size",
    type=int,
    help="Rows per forward pass of scorecam / ablationcam (bounds their memory). [default: 32]",
)
@click.option("--batch-size", type=int, help="Images per forward/backward pass. [default: 16]")
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps. [default: auto]")
@click.option("--workers", type=int, help="Decode worker processes (0 decodes in the main process). [default: 2]")
@click.option("--save", help="Comma-separated subset of heatmap,overlay,npy. [default: heatmap,overlay]")
@click.option("--colormap", type=click.Choice(COLORMAP_NAMES), help="Overlay colormap. [default: jet]")
@click.option("--alpha", type=float, help="Heatmap weight in the overlay, 0..1. [default: 0.5]")
@click.option(
    "--preprocess",
    type=click.Choice(PREPROCESS_MODES),
    help="full: resize the whole image; crop: the weights' resize + center crop. [default: full]",
)
@click.option("--limit", type=int, help="Explain only the first N images (sorted order).")
@click.option(
    "--amp", type=click.Choice(AMP_MODES), help="Autocast the forward pass (CAM maths stays float32). [default: none]"
)
@_switch("channels-last", "channels_last memory format for model and inputs. [default: on for the CPU, off on CUDA]")
@click.option(
    "--decode",
    type=click.Choice(DECODE_MODES),
    help="Where JPEGs are decoded: workers (Pillow) or device (torchvision.io; nvJPEG on CUDA). "
    "[default: auto = device on CUDA, workers otherwise]",
)
@click.option(
    "--max-pixels",
    type=int,
    help="Refuse (error row, nothing decoded) images with more pixels than this. [default: 89478485, Pillow's]",
)
@_switch(
    "resume",
    "Skip images an earlier run into OUT already explained (ok rows whose files exist). [default: start fresh]",
)
@_switch(
    "fsync",
    "Sync each file and its folder to the disk before the CSV row naming it, and the CSV and run.json after "
    "each batch: a power cut or kernel crash then loses at most the batch in flight. [default: off]",
)
@click.option(
    "--metrics",
    help=f"Comma-separated explanation-quality metrics: {','.join(METRIC_NAMES)} "
    "(columns appended to predictions.csv).",
)
@click.option("--steps", type=int, help="Deletion/insertion steps. [default: 20]")
@click.option(
    "--baseline", type=click.Choice(BASELINES), help="What deletion/insertion perturb towards. [default: blur]"
)
@click.option(
    "--metric-batch-size", type=int, help="Images per forward in the metric passes. [default: 4 x --batch-size]"
)
@click.option(
    "--randomization",
    type=click.Choice(RANDOMIZATION_MODES),
    help="The randomization metric: head re-initialises the layers after the target layer at once; cascade then "
    "goes on down the model one block at a time and saves each map's curve. [default: head]",
)
@click.option(
    "--sensitivity-samples", type=int, help="Noisy copies of each image for the sensitivity metric. [default: 10]"
)
@click.option(
    "--sensitivity-radius",
    type=float,
    help="Half-width of the sensitivity metric's uniform noise, in pixel units of [0, 1] images. [default: 0.05]",
)
@click.option("--groups", help=GROUPS_HELP)
@click.option("--group-min-count", type=int, help=MIN_COUNT_HELP + " [default: 3]")
@click.option("--boxes", help="Boxes for pointing/energy: CSV path,x0,y0,x1,y1,label, COCO JSON, or a VOC XML folder.")
@click.option("--masks", help="Folder of binary PNG masks mirroring the input tree (for pointing/energy).")
@_switch("summary", "Also write summary.json (as `gradcam audit`).")
@click.option(
    "--truth",
    help="Ground truth (the summary, --target label, the CSV's true_index/true_label/correct): auto, folders, "
    "none, or a CSV of path,label. [default: auto]",
)
@click.option("--worst", type=int, help="Images listed per metric in summary.json's worst lists. [default: 10]")
@click.option(
    "--fail-under", multiple=True, help=f"KEY=VALUE gate, exit 3 when the summary is below it; KEY: {UNDER_KEYS}."
)
@click.option(
    "--fail-over",
    multiple=True,
    help=f"KEY=VALUE gate, exit 3 when the summary is above it; KEY: {OVER_KEYS}; {GAP_KEYS}.",
)
@click.option(
    "--only-below",
    help="Explain only images whose top-1 probability is below P; the others get a `skipped` row.",
)
@click.option("--sample-rate", help="Explain a deterministic sample (by hash of the path) of this fraction, e.g. 0.1.")
@click.option(
    "--compare-to",
    metavar="OUT_A",
    help="After the run, diff it against an earlier explain output (as `gradcam diff OUT_A OUT`, into OUT/diff); "
    "its gates are --fail-under spearman/ssim/iou=V and --fail-over flips/shift=V.",
)
@click.option(
    "--files-from",
    help="Also explain the files listed in this file, one path per line (relative to the list's folder, or "
    "absolute; `-` reads standard input, relative to the current folder). Missing files become error rows.",
)
@click.option(
    "--dist-timeout",
    type=float,
    help="Under torchrun: seconds a rank waits for a peer that shows no sign of life. [default: 120]",
)
@click.option("-q", "--quiet", is_flag=True, default=None, help="No progress bar or messages.")
@_guarded
def explain(inputs: tuple[str, ...], out: str, config: str | None, **flags: Any) -> None:
    """Explain every image in INPUTS (files or folders, walked recursively) and in --files-from into OUT.

    Writes heatmaps/, overlays/ (and npy/ when asked; guided/ for the guided methods), predictions.csv and
    run.json (and summary.json with --summary or a gate). Exit codes: 0 all images explained, 1 some images
    failed, 2 usage or config error, 3 a --fail-under/--fail-over gate failed (3 wins over 1).
    """
    flags = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}
    for key in ("target_layers", "targets", "fail_under", "fail_over"):
        if not flags[key]:
            flags[key] = None
    settings = load_settings(config, **flags)
    check_audit_settings(settings)  # combinations that cannot work: one line before torch is even imported
    # under torchrun only rank 0 prints: its progress bar (its own share) and the summary of the merged run
    quiet = settings.quiet or env_rank() != 0

    def log(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    from gradcam_cli.api import explain as run_explain

    bar: Any = None

    def on_start(total: int) -> None:
        nonlocal bar
        if not quiet:
            from tqdm import tqdm

            size = env_world_size()
            desc = f"explain (rank 0 of {size})" if size > 1 else "explain"
            bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, desc=desc)

    def progress(n: int) -> None:
        if bar is not None:
            bar.update(n)

    try:
        with _graceful_signals():
            summary = run_explain(list(inputs), out, settings, progress=progress, log=log, on_start=on_start)
    finally:
        if bar is not None:
            bar.close()
    done = f" ({summary.skipped} already done)" if summary.skipped else ""
    confident = f", {summary.skipped_confident} skipped (confident)" if summary.skipped_confident else ""
    across = f" by {summary.ranks} processes" if summary.ranks > 1 else ""
    log(
        f"{summary.ok} ok{done}, {summary.errors} failed{confident} of {summary.total} images "
        f"in {summary.seconds:.1f} s ({summary.images_per_second:.1f} img/s{across}) -> {summary.out}"
    )
    if summary.audit is not None:
        _report_audit(summary.audit, log)
    if summary.diff is not None:
        _report_diff(summary.diff, log)
    # under torchrun rank 0's exit code is the run's; the other ranks exit 0 once rank 0 has their results, so
    # that no launcher stops rank 0 (torchrun stops every rank when one exits non-zero) before it has reported
    sys.exit(summary.exit_code if env_rank() == 0 else ExitCode.OK)


def _report_audit(result: Any, log: Callable[[str], None]) -> None:
    from gradcam_cli.audit.summary import summary_lines

    _report(summary_lines(result), result.gates, log)


def _report_diff(result: Any, log: Callable[[str], None]) -> None:
    from gradcam_cli.audit.diff.compare import summary_lines

    _report(summary_lines(result), result.gates, log)


def _report(lines: list[str], gates: Any, log: Callable[[str], None]) -> None:
    """Summary lines (unless quiet) and one stderr line per gate; failed gates are printed even when quiet."""
    for line in lines:
        log(line)
    for gate in gates:
        if gate.passed:
            log(gate.message())
        else:
            click.echo(f"Error: {gate.message()}", err=True)


_GATE_OPTIONS = [
    click.option("--truth", help="Ground truth: auto, folders, none, or a CSV of path,label. [default: auto]"),
    click.option("--fail-under", multiple=True, help=f"KEY=VALUE gate ({UNDER_KEYS})."),
    click.option("--fail-over", multiple=True, help=f"KEY=VALUE gate ({OVER_KEYS}; {GAP_KEYS})."),
    click.option(
        "--groups", help=GROUPS_HELP[:-1] + ", or none. [default: what the run recorded in run.json, if anything]"
    ),
    click.option("--group-min-count", type=int, help=MIN_COUNT_HELP + " [default: as recorded in run.json, or 3]"),
]


def _with_gate_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_GATE_OPTIONS):
        fn = option(fn)
    return fn


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@_with_gate_options
@click.option("--worst", type=int, help="Images listed per metric in the worst lists. [default: 10]")
@click.option("-q", "--quiet", is_flag=True, help="Print only failed gates.")
@_guarded
def audit(
    out: str,
    truth: str | None,
    fail_under: tuple[str, ...],
    fail_over: tuple[str, ...],
    groups: str | None,
    group_min_count: int | None,
    worst: int | None,
    quiet: bool,
) -> None:
    """Summarise the explain output folder OUT into OUT/summary.json and check CI gates.

    Exit codes: 0 ok, 1 the folder has failed images, 2 usage error (or a gate on a metric OUT lacks),
    3 a gate failed (3 wins over 1).
    """
    from gradcam_cli.api import audit as run_audit
    from gradcam_cli.audit.gates import gates_from

    settings = load_settings(
        None,
        truth=truth,
        worst=worst,
        fail_under=list(fail_under) or None,
        fail_over=list(fail_over) or None,
        groups=groups,
        group_min_count=group_min_count,
    )
    check_diff_gates(settings)
    result = run_audit(
        out,
        truth=settings.truth,
        worst=settings.worst,
        gates=gates_from(settings.fail_under, settings.fail_over),
        groups=settings.groups,
        group_min_count=group_min_count and settings.group_min_count,
    )

    def log(message: str) -> None:
        if not quiet:
            click.echo(message)

    _report_audit(result, log)
    sys.exit(result.exit_code)


@main.command()
@click.argument("out_a", type=click.Path(path_type=str))
@click.argument("out_b", type=click.Path(path_type=str))
@click.option(
    "-o",
    "--out",
    "diff_out",
    type=click.Path(file_okay=False, path_type=str),
    help="Where diff.csv, diff.json (and diff.html) go. [default: OUT_B/diff]",
)
@click.option(
    "--top",
    type=float,
    default=0.2,
    show_default=True,
    help="Share of each map's most salient pixels whose overlap (IoU) is measured.",
)
@click.option(
    "--fail-under",
    multiple=True,
    help=f"KEY=VALUE gate, higher is better ({DIFF_UNDER_KEYS}); STAT:KEY picks the statistic: mean (default), "
    "median, p10, p90.",
)
@click.option(
    "--fail-over",
    multiple=True,
    help=f"KEY=VALUE gate, lower is better ({DIFF_OVER_KEYS}); flips: the share of images whose top-1 class "
    "changed (2% or 0.02); shift: the peak shift over the image diagonal (mean, or STAT:shift).",
)
@click.option(
    "--report", is_flag=True, help="Also write diff.html: A's overlay, B's overlay and where they differ, per image."
)
@click.option("--worst", type=int, default=10, show_default=True, help="Least similar pairs listed in diff.json.")
@click.option("-q", "--quiet", is_flag=True, help="Print only failed gates.")
@_guarded
def diff(
    out_a: str,
    out_b: str,
    diff_out: str | None,
    top: float,
    fail_under: tuple[str, ...],
    fail_over: tuple[str, ...],
    report: bool,
    worst: int,
    quiet: bool,
) -> None:
    """Compare two explain output folders made on the same images (OUT_A the reference, OUT_B the new run).

    Per image: did the top-1 class flip, and how alike are the two maps (Spearman, SSIM, IoU of the top
    regions, peak shift); writes diff.csv and diff.json, and with --report diff.html. Reads files only: no
    model. Exit codes: 0 ok, 1 images only in one run or failed in either, 2 usage error (not explain
    outputs, no image in common), 3 a gate failed (3 wins over 1).
    """
    from gradcam_cli.api import diff as run_diff
    from gradcam_cli.audit.diff.gates import DIFF_GATE_KEYS
    from gradcam_cli.audit.gates import gates_from

    settings = load_settings(None, fail_under=list(fail_under) or None, fail_over=list(fail_over) or None)
    for flag, gates in (("--fail-under", settings.fail_under), ("--fail-over", settings.fail_over)):
        for key, _value in gates:
            if key not in DIFF_GATE_KEYS:
                raise GradcamError(
                    f"{flag} {key}=...: not a gate of gradcam diff (those are {DIFF_UNDER_KEYS}; {DIFF_OVER_KEYS})"
                )
    if worst < 0:
        raise GradcamError(f"--worst: expected a number >= 0, got {worst}")

    def log(message: str) -> None:
        if not quiet:
            click.echo(message)

    result = run_diff(
        out_a,
        out_b,
        diff_out,
        top=top,
        gates=gates_from(settings.fail_under, settings.fail_over),
        report=report,
        worst=worst,
    )
    _report_diff(result, log)
    sys.exit(result.exit_code)


@main.command()
@click.argument("out", type=click.Path(path_type=str))
@click.option("--truth", help="Ground truth: auto, folders, none, or a CSV of path,label. [default: auto]")
@click.option(
    "--groups", help=GROUPS_HELP[:-1] + ", or none. [default: what the run recorded in run.json, if anything]"
)
@click.option("--group-min-count", type=int, help=MIN_COUNT_HELP + " [default: as recorded in run.json, or 3]")
@click.option("--title", help="Page title. [default: the model and the folder]")
@click.option("--thumb-size", type=int, default=None, help="Longest side of the thumbnails in pixels. [default: 256]")
@click.option(
    "--low-confidence", type=float, default=None, help="Threshold of the low-confidence filter. [default: 0.5]"
)
@click.option("-q", "--quiet", is_flag=True, help="No messages.")
@_guarded
def report(
    out: str,
    truth: str | None,
    groups: str | None,
    group_min_count: int | None,
    title: str | None,
    thumb_size: int | None,
    low_confidence: float | None,
    quiet: bool,
) -> None:
    """Write OUT/report.html: a self-contained page (works from file://) with the summary, a per-class table,
    with groups a per-group table, and a filterable, sortable gallery of original | overlay thumbnails
    (written to OUT/thumbnails/)."""
    from gradcam_cli.api import report as build_report

    settings = load_settings(None, truth=truth, groups=groups, group_min_count=group_min_count)
    path = build_report(
        out,
        truth=settings.truth,
        groups=settings.groups,
        group_min_count=group_min_count and settings.group_min_count,
        title=title,
        thumb_size=thumb_size if thumb_size is not None else 256,
        low_confidence=low_confidence if low_confidence is not None else 0.5,
        log=(lambda m: None) if quiet else (lambda m: click.echo(m, err=True)),
    )
    if not quiet:
        click.echo(str(path))


@main.command()
@click.argument("pattern", required=False)
@_guarded
def models(pattern: str | None) -> None:
    """List torchvision classifiers: input size, auto-detected target layer, family config and weights.

    PATTERN filters the names (a substring, or a glob such as 'vit_*'). The list is a table generated from
    torchvision, so it answers without importing torch; `gradcam layers MODEL` traces the real model.
    """
    from gradcam_cli.api import models as zoo_models
    from gradcam_cli.model.catalog import QUANTIZED, TORCHVISION_VERSION, installed_torchvision

    rows = zoo_models(pattern)
    click.echo(f"{'model':<20} {'input':>5}  {'auto-detected layer':<38} {'config':<27} weights (input size if other)")
    for m in rows:
        weights = ", ".join(w if size == m.input_size else f"{w} ({size})" for w, size in m.weights) or "-"
        config = f"configs/{m.config}" if m.config else "-"
        click.echo(f"{m.name:<20} {m.input_size:>5}  {m.layer:<38} {config:<27} {weights}")
    if not pattern:
        click.echo(
            f"\n{len(rows)} models. Not listed: the quantized variants ({', '.join(QUANTIZED[:2])}, ...): int8 kernels "
            "have no gradients, explain the float model of the same architecture instead. Any other model: "
            "--model package.module:callable."
        )
    installed = installed_torchvision()
    if installed and installed != TORCHVISION_VERSION:
        click.echo(
            f"note: this table was generated from torchvision {TORCHVISION_VERSION}; {installed} is installed, so "
            "names may differ (`gradcam layers MODEL` always traces the installed one)",
            err=True,
        )


@main.command()
@click.argument("model")
@click.option(
    "-c",
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="YAML config (for model_kwargs, num_classes, input_size of a factory model).",
)
@click.option("--input-size", type=int, help="Dummy input size. [default: the model's]")
@click.option("--all", "show_all", is_flag=True, help="Also list modules without a spatial output.")
@_guarded
def layers(model: str, config: str | None, input_size: int | None, show_all: bool) -> None:
    """Print MODEL's modules with their output shapes for a dummy input; '*' marks candidate target layers.

    Token sequences (ViT) and channels-last maps (Swin) count as spatial: the line says which grid they are
    reshaped to. A module that runs more than once cannot be a target (its hook would see several outputs).
    """
    from gradcam_cli.api import layers as model_layers

    report = model_layers(model, config, input_size)
    pick, (height, width) = report.auto_detected, report.input_size
    shown_config = f"; family config: configs/{report.family_config}" if report.family_config else ""
    if report.family_default:
        click.echo(f"{report.model}: input 3x{height}x{width}; default layer: {pick} ({report.family_default})")
        click.echo("  '*' = spatial output, usable as --layer; '>' = the default one")
    else:
        click.echo(f"{report.model}: input 3x{height}x{width}; auto-detected layer: {pick}{shown_config}")
        click.echo("  '*' = spatial output, usable as --layer; '>' = the auto-detected one")
    for info in report.layers:
        if not show_all and not info.spatial:
            continue
        mark = ">" if info.name == pick else ("*" if info.spatial and info.calls == 1 else " ")
        shape = "x".join(str(s) for s in info.shape[1:]) if info.shape else "-"
        depth = info.name.count(".")
        calls = f"  (called {info.calls}x)" if info.calls > 1 else ""
        layout = f"  [{info.layout.describe()}]" if info.layout and info.layout.kind != "nchw" and info.spatial else ""
        click.echo(
            f"{mark} {'  ' * depth}{info.name:<{max(1, 40 - 2 * depth)}} {info.type_name:<24} {shape}{calls}{layout}"
        )


if __name__ == "__main__":
    main()
