"""Write docs/reference.md from the Click commands of `gradcam` and the Settings fields of the config.

Run from the repository root:

    python docs/make_reference.py            # rewrites docs/reference.md
    python docs/make_reference.py --check    # exit 1 when docs/reference.md is not what this script writes

Everything in docs/reference.md comes from here: the usage line, docstring and options of every command are read
from `gradcam_cli.cli.main` (option names, types, choices, the `[default: ...]` of the help text), the config keys
from `dataclasses.fields(gradcam_cli.config.Settings)`. What the code cannot say (the longer notes on some options,
the meaning of the config-only keys) is kept in the dictionaries below; a note for an option or key that no
longer exists, or a config-only key without a description, stops the script, so the page cannot drift.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python docs/make_reference.py` puts docs/ first on the path, not the repo root
    sys.path.insert(0, str(ROOT))

from gradcam_cli.cli import main  # noqa: E402
from gradcam_cli.config import Settings  # noqa: E402

OUTPUT = ROOT / "docs" / "reference.md"
EXAMPLE_CONFIG = "configs/efficientnet_lite0.yaml"
PROG = "gradcam"

# Longer notes on `gradcam explain` options, keyed by the option's Click parameter name (= its config key).
NOTES: dict[str, str] = {
    "model": (
        "A torchvision classification model name (`gradcam models` lists them), `package.module:callable` "
        "returning an `nn.Module` (the module must be importable: installed, or on `PYTHONPATH`), "
        "`timm:NAME` (a timm model, the `timm` extra: [timm models](models.md#timm-models)) or "
        "`hf:PATH_OR_REPO_ID` (a Hugging Face image classifier, the `hf` extra: "
        "[Hugging Face models](models.md#hugging-face-models)). Quantized variants (`quantized_resnet18`, ...) "
        "and detection/segmentation/video models stop with one line saying why and what to use instead. "
        "See [models](models.md)."
    ),
    "weights": (
        "`DEFAULT`, a weights enum name (`IMAGENET1K_V2`, also `ResNet50_Weights.IMAGENET1K_V2`), `none` (random "
        "init, or the factory's own), or a path to a checkpoint: see [checkpoints](models.md#checkpoints). "
        "torchvision weights are read from the torch hub cache (`~/.cache/torch/hub/checkpoints`, or "
        "`$TORCH_HOME`); `timm:NAME`'s `DEFAULT` from the Hugging Face cache; `hf:`'s `DEFAULT` is the model "
        "folder's own. Nothing is downloaded for timm and hf models."
    ),
    "target_layers": (
        "Dotted module path with integer indexes: `layer4`, `layer4.-1`, `layer4[-1]`, `features.denseblock4`, "
        "`encoder.layers.-1.ln_1`. `MODULE:input` takes the map a module *receives* instead of the one it returns "
        "(`_avg_pooling:input`: what global pooling averages, when the activation before it is functional or a "
        "shared module). Unknown paths list the nearest valid names. Token outputs (ViT) and channels-last outputs "
        "(Swin) are reshaped automatically ([transformers](models.md#transformers-tokens-and-channels-last-maps)). "
        "Auto-detection picks the last module, in execution order, whose output still has positions (h*w > 1), "
        "which runs once, and whose positions the class score depends on, and prints which one it picked. "
        "Several layers give one map per layer (file suffix `__<layer>`), or one fused map with `--fuse`."
    ),
    "method": "Which method to pick, and what each computes: [CAM methods](methods.md).",
    "targets": (
        "`pred` (top-1 class), `label` (the image's true class, from `--truth`: a `labels.csv` or the parent "
        "folder's name), `topk:K` (one map per class for the K best), a class index, or a class name "
        '(`"Egyptian cat"`). A class name must be one of the model\'s class names, compared without regard to '
        "case (`egyptian cat` works); unlike the labels of `--boxes` and ground truth files, `_` does not stand "
        "for a space here. In a config, `targets` is a list (`[pred, 3]`) or a comma-separated string. The "
        "gradient is of the pre-softmax score. All targets of a batch come from one forward pass and one "
        "(vmapped) backward pass."
    ),
    "fuse": (
        "With several `--layer`: `none` (one map per layer), `mean` or `max`: one map per image and target, fused "
        "from the per-layer maps, each upsampled (bilinear) to the largest layer's resolution and min-max "
        "normalised first. Its `layer` in the CSV is `fused(layer3+layer4)`."
    ),
    "counterfactual": (
        "Explain the negated score -y: the regions that argue *against* the class (gradient methods: negated "
        "gradients; Score-/Ablation-CAM and CAM: the negated score). Not with `eigencam` (no class)."
    ),
    "aug_smooth": (
        "Average each map over 6 views: {as is, mirrored} x contrast {1, 0.9, 1.1} of the normalised input, each "
        "mapped back before averaging; the classes are those of the unaugmented image. 6x the cost."
    ),
    "eigen_smooth": (
        "Replace the sum over channels of the weighted activations by their first principal component (less noise, "
        "as pytorch-grad-cam's `eigen_smooth`). Not with `eigencam`, `eigengradcam`, `guided-backprop`."
    ),
    "chunk_size": (
        "Rows per forward pass of `scorecam` (masked images) and `ablationcam` (ablated activations): their memory "
        "is bounded by it, not by the number of channels."
    ),
    "device": "`auto` is CUDA if present, else the CPU. Under torchrun see [distributed](distributed.md).",
    "save": "Any of `heatmap,overlay,npy` ([outputs](outputs.md)); in a config a list or a comma-separated string.",
    "alpha": "0 = image only, 1 = heatmap only.",
    "preprocess": (
        "`full` resizes the whole image to the model's input size, so the heatmap covers every pixel; `crop` uses "
        "the weights' resize + center crop, and the heatmap is zero outside the crop."
    ),
    "amp": (
        "`bf16` or `fp16`: run the forward pass (and the head's backward) under autocast; the CAM maths stays "
        "float32. For GPUs; on a CPU bf16 works but is rarely faster."
    ),
    "channels_last": (
        "In a config `true`, `false` or `auto`. Auto is on for the CPU, where convolutions run faster in it, off "
        "on CUDA, where it depends on the GPU and `--amp` (turn it on there for Tensor Cores with `--amp`). The "
        "maps agree with NCHW to float rounding. run.json says which was used. Measured effect: "
        "[speed](speed.md)."
    ),
    "decode": (
        "`workers` (Pillow in the DataLoader workers), `device` (`torchvision.io.decode_jpeg` on the compute "
        "device: nvJPEG on CUDA, libjpeg-turbo in the main process on a CPU) or `auto` (`device` on CUDA when "
        "torchvision can decode there, else `workers`). Only complete 8-bit RGB/greyscale JPEGs within "
        "`--max-pixels` go to the device; PNG, CMYK, truncated or odd files are decoded by Pillow as before, so "
        "error rows and messages are the same either way. `device` where torchvision cannot decode is a usage error "
        "(exit 2); with `auto` run.json says why in `decode_device_error`."
    ),
    "max_pixels": (
        "An image whose header declares more pixels (width x height) is an `error` row, refused before any pixel "
        "is decoded (decompression bombs). The default is Pillow's own limit, which Pillow itself only warns about."
    ),
    "resume": (
        "Keep what an earlier, interrupted run into the same OUT finished and explain only the rest "
        "([reliability](reliability.md#interruptions-and---resume)); without it a run starts fresh."
    ),
    "metrics": (
        "Any of `deletion,insertion,drop,pointing,energy`; their columns are appended to predictions.csv "
        "([the metrics](auditing.md#the-metrics)). `pointing` and `energy` need `--boxes` and/or `--masks`."
    ),
    "steps": "2 to 1000: step k perturbs round(k/N) of the pixels.",
    "baseline": (
        "What deletion replaces pixels with and insertion starts from: `blur` (Gaussian, 11 taps, sigma 5), "
        "`zero` (black), `mean` (the image's mean colour)."
    ),
    "boxes": (
        "CSV `path,x0,y0,x1,y1,label`, COCO JSON, or a folder of Pascal VOC XML "
        "([annotations](auditing.md#annotations)). In a config, relative to the config file."
    ),
    "masks": "In a config, relative to the config file ([annotations](auditing.md#annotations)).",
    "truth": (
        "`auto`, `folders`, `none`, or a CSV of `path,label` ([ground truth](auditing.md#ground-truth)). In a "
        "config, a CSV path is relative to the config file."
    ),
    "fail_under": (
        "Gate: exit 3 when the summary's KEY is below V; KEY `accuracy`, `pointing`, `energy`, `insertion`, "
        "`increase`; V a number or a percentage (`80%`). Implies `--summary`. In a config a mapping "
        '(`fail_under: {pointing: 0.8}`) or a list (`fail_under: ["pointing=0.8"]`). An `accuracy` gate without '
        "ground truth is a usage error (exit 2) ([CI gates](auditing.md#ci-gates))."
    ),
    "fail_over": (
        "Gate: exit 3 when KEY is above V; KEY `deletion`, `drop` (lower is better). Same forms as `fail_under`."
    ),
    "only_below": (
        "P is a number greater than 0 and at most 1, or a percentage (`50%`). Images whose top-1 probability is "
        "at or above P get a `skipped` row with their prediction ([sampling](auditing.md#sampling-in-production))."
    ),
    "sample_rate": (
        "R is a number greater than 0 and at most 1, or a percentage (`10%`): the images whose path hashes "
        "(sha256) below R are explained. A rate that keeps none of the images found is a usage error (exit 2)."
    ),
    "dist_timeout": (
        "Seconds a rank waits for another that shows no sign of life (no heartbeat) before giving it up "
        "([several GPUs and nodes](distributed.md))."
    ),
    "quiet": "No progress bar (tqdm on stderr, with images/s) and no messages.",
}

# Config keys that have no flag: (default, meaning). Every Settings field without an `explain` option needs one.
CONFIG_ONLY: dict[str, tuple[str, str]] = {
    "input_size": (
        "the weights' (factories: their `pretrained_cfg`, else 224)",
        "Model input size: `224` or `[height, width]`, at most 4096. ViT and MaxViT fix their input size in the "
        "architecture: with `--weights none` the model is built for `input_size` (ViT: square; MaxViT: multiples "
        "of 224), with pretrained weights a different size is an error.",
    ),
    "mean": (
        "the weights' (factories: their `pretrained_cfg`, else ImageNet)",
        "Per-channel normalisation of [0, 1] RGB inputs: three finite numbers.",
    ),
    "std": (
        "the weights' (factories: their `pretrained_cfg`, else ImageNet)",
        "Per-channel normalisation of [0, 1] RGB inputs: three positive numbers.",
    ),
    "labels": (
        "the weights' class names (factories: the model's `class_names`), ImageNet names for 1000-class models",
        "A file of class names: one per line, or a JSON list; relative to the config file. A count that differs "
        "from the model's classes is an error with `num_classes` set, a message otherwise.",
    ),
    "model_kwargs": ("`{}`", "Keyword arguments for the model constructor or factory."),
    "num_classes": (
        "the model's",
        "Number of classes of a fine-tuned model: passed to the torchvision builder or the factory as "
        "`num_classes`, so a checkpoint with a 10-class head loads. With torchvision's own weights it must match "
        "them ([fine-tuned models](models.md#fine-tuned-models)).",
    ),
    "seed": ("0", "Seeds torch before the model is built, so random init (`--weights none`) is the same in every run."),
}

INTRO = f"""\
# Command reference

<!-- Generated by `python docs/make_reference.py` from gradcam_cli/cli.py and gradcam_cli/config.py: edit those,
or the notes in docs/make_reference.py, then run it again. Do not edit this file by hand. -->

Every command and option of `{PROG}`; `python -m gradcam_cli ...` is the same as `{PROG} ...`. This page is
generated from the command-line interface itself (`python docs/make_reference.py`), and a test fails when it
is out of date. The [README](../README.md) has a quick start, the other [docs](../README.md#documentation)
explain each topic.
"""

CONFIG_INTRO = """\
Every `explain` option except `-o`, `-c` and the inputs can also be set in the YAML config given with
`-c/--config`, under its config key. A flag on the command line wins over the config, the config over the
default. Unknown keys and values of the wrong type stop the run with exit code 2 and one line naming the key
and what was expected.

Values are checked before anything runs: `std` must be positive, `mean` and `std` finite, `input_size` at most
4096, path-like strings (`model`, `weights`, `labels`) free of NUL bytes. A config is read with YAML's safe
loader (no `!!python/...` tags); any malformed YAML is one line with exit code 2. In a config, `labels`,
`boxes`, `masks` and a `truth` CSV are relative to the config file. Keys that take several values
(`target_layers`, `targets`, `save`, `metrics`) take a YAML list or one comma-separated string (a single layer
path may also be a plain string); the gates `fail_under` and `fail_over` take a mapping
(`fail_under: {pointing: 0.8, energy: 50%}`) or a list of `KEY=VALUE` strings
(`fail_under: ["pointing=0.8"]`).
"""


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def cell(text: str) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def prose(text: str) -> str:
    """A docstring as Markdown paragraphs; `*` escaped so that a quoted '*' is not read as emphasis."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text.strip())]
    return "\n\n".join(p.replace("*", "\\*") for p in paragraphs if p)


def split_default(help_text: str) -> tuple[str, str | None]:
    """(help without its trailing `[default: ...]`, the default as the help shows it, or None)."""
    match = re.search(r"\s*\[default: (.*)\]\s*$", help_text)
    if not match:
        return help_text.strip(), None
    return help_text[: match.start()].strip(), match.group(1).strip()


def value_kind(param: click.Parameter) -> str:
    """What an option takes: its choices, or the kind of value; `(repeatable)` for multiple options."""
    kind: str
    if isinstance(param, click.Option) and param.is_flag:
        kind = "on/off" if param.secondary_opts else "flag"
    elif isinstance(param.type, click.Choice):
        kind = "one of " + ", ".join(f"`{c}`" for c in param.type.choices)
    elif isinstance(param.type, click.Path):
        kind = "folder" if not param.type.file_okay else ("file" if not param.type.dir_okay else "path")
    elif isinstance(param.type, click.types.IntParamType):
        kind = "integer"
    elif isinstance(param.type, click.types.FloatParamType):
        kind = "number"
    else:
        kind = "text"
    if param.multiple:
        kind += " (repeatable)"
    return kind


def shown_default(param: click.Option, from_help: str | None) -> str:
    if param.required:
        return "required"
    if from_help is not None:
        return from_help
    if param.is_flag:
        return "off"
    return ""


def flags_of(param: click.Option) -> str:
    names = [f"`{o}`" for o in param.opts]
    if param.secondary_opts:
        return " / ".join([", ".join(names), ", ".join(f"`{o}`" for o in param.secondary_opts)])
    return ", ".join(names)


def settings_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(Settings)]


def command_section(name: str, cmd: click.Command, group_ctx: click.Context, keys: list[str]) -> list[str]:
    ctx = click.Context(cmd, info_name=name, parent=group_ctx)
    takes_config = any(p.name == "config" for p in cmd.params)
    lines = [f"## `{PROG} {name}`", "", "```text", cmd.get_usage(ctx), "```", "", prose(cmd.help or ""), ""]
    help_option = cmd.get_help_option(ctx)
    options = [p for p in cmd.get_params(ctx) if isinstance(p, click.Option) and p is not help_option]
    if not options:
        return [*lines, "No options besides `-h`/`--help`.", ""]
    header = ["option", "takes", "default"] + (["config key"] if takes_config else []) + ["meaning"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for param in options:
        help_text, default = split_default(param.help or "")
        row = [flags_of(param), value_kind(param), cell(shown_default(param, default))]
        if takes_config:
            row.append(f"`{param.name}`" if param.name in keys else "")
        row.append(cell(help_text))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


def notes_section(cmd: click.Command) -> list[str]:
    params = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    unknown = sorted(set(NOTES) - set(params))
    if unknown:
        raise SystemExit(f"make_reference.py: NOTES for options that `explain` does not have: {', '.join(unknown)}")
    lines = ["### Notes on the `explain` options", ""]
    for name, param in params.items():
        if name in NOTES:
            lines.append(f"- {flags_of(param)} (`{name}`): {NOTES[name]}")
    lines.append("")
    return lines


def config_section(cmd: click.Command, keys: list[str]) -> list[str]:
    flagged = {p.name for p in cmd.params}
    only = [k for k in keys if k not in flagged]
    missing = sorted(set(only) - set(CONFIG_ONLY))
    stale = sorted(set(CONFIG_ONLY) - set(only))
    if missing or stale:
        raise SystemExit(
            "make_reference.py: CONFIG_ONLY is out of date: "
            + "; ".join(
                part
                for part in (
                    f"describe {', '.join(missing)}" if missing else "",
                    f"drop {', '.join(stale)} (now an option or gone)" if stale else "",
                )
                if part
            )
        )
    lines = ["## The config file", "", CONFIG_INTRO, "### Config-only keys", ""]
    lines += ["These keys have no flag:", "", "| config key | default | meaning |", "|---|---|---|"]
    for key in only:
        default, meaning = CONFIG_ONLY[key]
        lines.append(f"| `{key}` | {cell(default)} | {cell(meaning)} |")
    example = (ROOT / EXAMPLE_CONFIG).read_text(encoding="utf-8")
    lines += ["", "### A complete config", "", f"`{EXAMPLE_CONFIG}`, the offline demo model:", "", "```yaml"]
    lines += [example.rstrip("\n"), "```", ""]
    return lines


def generate() -> str:
    group_ctx = click.Context(main, info_name=PROG, **main.context_settings)
    keys = settings_keys()
    names = list(main.commands)  # in the order cli.py defines them
    commands = {name: main.get_command(group_ctx, name) for name in names}
    lines = [INTRO, "## Contents", ""]
    lines.append(f"- [`{PROG}`](#{slug(PROG)})")
    lines += [f"- [`{PROG} {name}`](#{slug(f'{PROG} {name}')})" for name in names]
    lines.append("- [The config file](#the-config-file)")
    lines += ["", f"## `{PROG}`", "", "```text", main.get_usage(group_ctx), "```", "", prose(main.help or ""), ""]
    lines += ["| option | meaning |", "|---|---|"]
    for param in main.get_params(group_ctx):
        if isinstance(param, click.Option):
            lines.append(f"| {flags_of(param)} | {cell(param.help or '')} |")
    lines += ["", f"Every command also takes `-h`/`--help`: `{PROG} COMMAND --help` prints its options.", ""]
    explain_cmd = None
    for name, cmd in commands.items():
        assert cmd is not None
        lines += command_section(name, cmd, group_ctx, keys)
        if any(p.name == "config" for p in cmd.params) and name == "explain":
            explain_cmd = cmd
            lines += notes_section(cmd)
    if explain_cmd is None:
        raise SystemExit("make_reference.py: no `explain` command with a --config option")
    lines += config_section(explain_cmd, keys)
    return "\n".join(lines).rstrip("\n") + "\n"


def main_() -> int:
    text = generate()
    if "--check" in sys.argv[1:]:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run `python docs/make_reference.py`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main_())
