"""The `gradcam` command: a thin Click layer over the Python API.

Parses flags, calls `gradcam_cli.pipeline.explain` (or the model listings), and maps errors to one line and
an exit code: 0 every image explained, 1 some images failed, 2 usage/config/model/layer error.
torch is imported only inside the commands that need it, so `--help` and usage errors answer at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from gradcam_cli import __version__
from gradcam_cli.colormaps import COLORMAP_NAMES
from gradcam_cli.config import AMP_MODES, METHOD_NAMES, PREPROCESS_MODES, load_settings
from gradcam_cli.errors import GradcamError

EXIT_OK, EXIT_IMAGE_ERRORS, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 4


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body, turning every known failure into one line on stderr and an exit code."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GradcamError as exc:
            _fail(str(exc))
        except BrokenPipeError:
            # `gradcam models | head`: the reader went away; that is not an error
            sys.stderr.close()
            os._exit(EXIT_OK)
        except KeyboardInterrupt:
            _fail("interrupted; everything written so far is kept", 130)
        except MemoryError:
            _fail("out of memory; try a smaller --batch-size", EXIT_IMAGE_ERRORS)
        except Exception as exc:
            if os.environ.get("GRADCAM_DEBUG"):
                raise
            first = " ".join(str(exc).split())[:300]
            _fail(f"unexpected {type(exc).__name__}: {first} (set GRADCAM_DEBUG=1 for the traceback)", EXIT_INTERNAL)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="gradcam")
def main() -> None:
    """Explain what an image classifier looks at, for whole folders of images at once."""


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
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
@click.option("--model", help="torchvision model name (see `gradcam models`) or package.module:callable.")
@click.option(
    "--weights",
    help="DEFAULT, a weights enum name (IMAGENET1K_V2), none, or a checkpoint path. "
    "[default: DEFAULT for torchvision models, none for factories]",
)
@click.option(
    "--layer",
    "target_layers",
    multiple=True,
    help="Target layer path, e.g. layer4, layer4.-1, layer4[-1] (repeatable). [default: auto-detect]",
)
@click.option("--method", type=click.Choice(METHOD_NAMES), help="CAM method. [default: gradcam]")
@click.option(
    "--target",
    "targets",
    multiple=True,
    help="pred, topk:K, a class index or a class name (repeatable). [default: pred]",
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
@click.option(
    "--channels-last/--no-channels-last", default=None, help="channels_last memory format (faster on recent GPUs)."
)
@click.option(
    "--max-pixels",
    type=int,
    help="Refuse (error row, nothing decoded) images with more pixels than this. [default: 89478485, Pillow's]",
)
@click.option(
    "--resume/--no-resume",
    default=None,
    help="Skip images an earlier run into OUT already explained (ok rows whose files exist). [default: start fresh]",
)
@click.option("-q", "--quiet", is_flag=True, default=None, help="No progress bar or messages.")
@_guarded
def explain(inputs: tuple[str, ...], out: str, config: str | None, **flags: Any) -> None:
    """Explain every image in INPUTS (files or folders, walked recursively) into OUT.

    Writes heatmaps/, overlays/ (and npy/ when asked), predictions.csv and run.json.
    Exit codes: 0 all images explained, 1 some images failed, 2 usage or config error.
    """
    flags = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}
    for key in ("target_layers", "targets"):
        if not flags[key]:
            flags[key] = None
    settings = load_settings(config, **flags)
    quiet = settings.quiet

    def log(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    from gradcam_cli.pipeline import explain as run_explain

    bar: Any = None

    def on_start(total: int) -> None:
        nonlocal bar
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True, desc="explain")

    def progress(n: int) -> None:
        if bar is not None:
            bar.update(n)

    try:
        summary = run_explain(list(inputs), out, settings, progress=progress, log=log, on_start=on_start)
    finally:
        if bar is not None:
            bar.close()
    done = f" ({summary.skipped} already done)" if summary.skipped else ""
    log(
        f"{summary.ok} ok{done}, {summary.errors} failed of {summary.total} images in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.1f} img/s) -> {summary.out}"
    )
    sys.exit(summary.exit_code)


@main.command()
@_guarded
def models() -> None:
    """List torchvision classification models with their input size and pretrained weights."""
    import torchvision

    from gradcam_cli.models import classification_model_names

    click.echo(f"{'model':<28} {'input':>7}  weights")
    for name in classification_model_names():
        try:
            enum = torchvision.models.get_model_weights(name)
            size = enum.DEFAULT.transforms().crop_size[0]
            weights = ", ".join(m for m in enum.__members__ if m != "DEFAULT")
        except (ValueError, KeyError, AttributeError):
            size, weights = 224, "-"
        click.echo(f"{name:<28} {size:>7}  {weights}")


@main.command()
@click.argument("model")
@click.option(
    "-c",
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=str),
    help="YAML config (for model_kwargs, input_size of a factory model).",
)
@click.option("--input-size", type=int, help="Dummy input size. [default: the model's]")
@click.option("--all", "show_all", is_flag=True, help="Also list modules with non-spatial outputs.")
@_guarded
def layers(model: str, config: str | None, input_size: int | None, show_all: bool) -> None:
    """Print MODEL's modules with their output shapes for a dummy input; '*' marks candidate target layers."""
    settings = load_settings(config, model=model, weights="none", input_size=input_size)
    from gradcam_cli.layers import auto_detect_layer, trace_layers
    from gradcam_cli.models import load_model

    loaded = load_model(settings)
    infos = trace_layers(loaded.model, loaded.spec.size)
    pick = auto_detect_layer(loaded.model, loaded.spec.size)
    click.echo(f"{loaded.name}: input 3x{loaded.spec.size[0]}x{loaded.spec.size[1]}; auto-detected layer: {pick}")
    click.echo("  '*' = spatial output, usable as --layer; '>' = the auto-detected one")
    for info in infos:
        if not show_all and not info.spatial:
            continue
        mark = ">" if info.name == pick else ("*" if info.spatial and info.calls == 1 else " ")
        shape = "x".join(str(s) for s in info.shape[1:]) if info.shape else "-"
        depth = info.name.count(".")
        calls = f"  (called {info.calls}x)" if info.calls > 1 else ""
        click.echo(f"{mark} {'  ' * depth}{info.name:<{max(1, 40 - 2 * depth)}} {info.type_name:<24} {shape}{calls}")


if __name__ == "__main__":
    main()
