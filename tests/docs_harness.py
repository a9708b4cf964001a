"""Run the examples of README.md and docs/*.md: what tests/test_docs.py needs, kept out of the test module.

Rules (the docs are written to them):

- Every fenced ```sh block is a list of commands: one per line, `\\` continues a line, `#` starts a comment,
  `&&` chains commands, and `NAME=value` words before a command are its environment. A command the docs present
  as failing ends with a comment `# exit N`; every other command must exit 0.
- Every ```python block is run with exec(), in a fresh namespace, in the same working folder; the blocks of a
  page run in the order they appear.
- A ```yaml block whose first line is a comment naming a file (`# finetuned.yaml`) is written to that file when
  it is reached, so the commands after it use exactly what the page shows. Other yaml, ```text and ```console
  blocks are output or illustration and are not run.
- All of it runs in one temporary working folder, made once for tests/test_docs.py (`prepare_workspace`): copies
  of sample_images/ and configs/ plus the small inputs, checkpoints, files and the Hugging Face model folder
  (`models/vit-finetuned`) the examples name. Pages run one
  after the other (README.md, then docs/*.md by name) and share it, so a page must not rely on another's files.

How each kind of command is handled is decided in one place, COMMAND_KINDS below.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.util
import os
import re
import shlex
import shutil
import sys
import urllib.error
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def doc_files() -> list[Path]:
    """README.md and every docs/*.md, in the order they run (README first)."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# ------------------------------------------------------------------------------------------- reading the pages


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block: its info string's first word, the line of its first content line, its text."""

    path: Path
    lang: str
    line: int
    text: str


FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def blocks(path: Path) -> list[Block]:
    """Every fenced code block of a Markdown file."""
    found: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence = match.group("fence")
        lang = (match.group("info").strip().split() or [""])[0].lower()
        start = i + 1
        j = start
        while j < len(lines) and not re.match(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            j += 1
        found.append(Block(path, lang, start + 1, "\n".join(lines[start:j])))
        i = j + 1
    return found


@dataclasses.dataclass(frozen=True)
class Command:
    """One command of a sh block: where it is, its words, its environment and the exit code the page implies."""

    path: Path
    line: int
    text: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    expect: int = 0


EXIT_NOTE = re.compile(r"^#\s*exit\s+(\d+)\b")
ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell line: the comment starts at the first unquoted `#` that begins a word."""
    quote = ""
    escaped = False
    for i, ch in enumerate(line):
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i:]
    return line.rstrip(), ""


def commands(block: Block) -> list[Command]:
    """The commands of a sh block (see the module docstring for the rules)."""
    found: list[Command] = []
    pending: list[str] = []
    first = 0
    for offset, raw in enumerate(block.text.splitlines()):
        code, comment = split_comment(raw)
        if not pending:
            first = block.line + offset
        if code.endswith("\\"):
            pending.append(code[:-1].strip())
            continue
        pending.append(code.strip())
        text = " ".join(p for p in pending if p)
        pending = []
        if not text:
            continue
        note = EXIT_NOTE.match(comment)
        expect = int(note.group(1)) if note else 0
        words = shlex.split(text.replace("$(which gradcam)", "gradcam"))
        for unsupported in ("|", ";", ">", ">>", "<", "&", "||"):
            if unsupported in words:
                raise ValueError(f"{rel(block.path)}:{first}: shell syntax {unsupported!r} is not supported: {text}")
        parts: list[list[str]] = [[]]
        for word in words:
            if word == "&&":
                parts.append([])
            else:
                parts[-1].append(word)
        for i, part in enumerate(parts):
            env = []
            while part and ENV_WORD.match(part[0]):
                name, _, value = part.pop(0).partition("=")
                env.append((name, value))
            # in a chain only the last command may fail: `a && b` stops at a failing `a`
            found.append(
                Command(block.path, first, text, tuple(part), tuple(env), expect if i == len(parts) - 1 else 0)
            )
    return found


def file_block_name(block: Block) -> str | None:
    """The file a ```yaml block stands for (its first line is `# NAME.yaml`), else None."""
    if block.lang not in ("yaml", "yml"):
        return None
    first = (block.text.splitlines() or [""])[0]
    match = re.match(r"^#\s*([\w./-]+\.ya?ml)\s*$", first)
    return match.group(1) if match else None


# ------------------------------------------------------------------------------------- what runs, what does not

RUN, PARSE, CHECK = "run", "parse", "check"

# One entry per kind of command: the leading words it starts with (fnmatch patterns, `python` stands for any
# python / python3 / .venv/bin/python), what the suite does with it, and why when it does not simply run it.
#   run:   runs for real, in this process, through Click's CliRunner against gradcam_cli.cli.main; a gradcam
#          command that needs a device this machine lacks (--device cuda*, mps) is parsed instead
#   parse: options and settings are checked (Click parsing of the gradcam command, load_settings and the
#          audit-settings check; torchrun's own options with torchrun's argument parser), nothing is started
#   check: what it names must exist (a make target, a pip extra, a module, a script and its options)
COMMAND_KINDS: list[tuple[tuple[str, ...], str, str]] = [
    (("gradcam",), RUN, ""),
    (("python", "-m", "gradcam_cli"), RUN, ""),
    (
        ("torchrun",),
        PARSE,
        "starts several processes, on GPUs or several nodes; tests/test_distributed.py runs a real 2-process CPU job",
    ),
    (("make",), CHECK, "creates .venv and installs packages; `make test` would run this suite inside itself"),
    (("pip", "install"), CHECK, "installs packages from the package index"),
    (
        ("python", "-m", "gradcam_cli.model.catalog"),
        CHECK,
        "builds and traces every torchvision model (minutes) and rewrites gradcam_cli/model/catalog_table.py",
    ),
    (("ruff", "format"), CHECK, "rewrites a source file of the package"),
    (("python", "bench/*.py"), CHECK, "benchmarks that take 20-30 minutes of an otherwise idle machine"),
    (("python", "docs/make_reference.py"), CHECK, "rewrites docs/reference.md; test_reference_is_current runs it"),
]
PYTHON = re.compile(r"^(.*/)?python(3(\.\d+)?)?$")


def kind_of(argv: Sequence[str]) -> tuple[str, str, int]:
    """(action, reason, number of leading words matched) for a command; ValueError for an unknown kind."""
    words = ["python" if PYTHON.match(w) else w for w in argv]
    for pattern, action, why in COMMAND_KINDS:
        if len(words) >= len(pattern) and all(fnmatch.fnmatchcase(w, p) for w, p in zip(words, pattern, strict=False)):
            return action, why, len(pattern)
    raise ValueError(f"no rule for this kind of command; add one to COMMAND_KINDS in {rel(Path(__file__))}")


# ------------------------------------------------------------------------------------------- the working folder


def write_image(path: Path, size: tuple[int, int] = (128, 96), seed: int = 0, mode: str = "RGB") -> Path:
    """A small smooth random picture (noise and a bright blob) in the format of the file's extension."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
    blob = 200.0 * np.exp(-(((xx - cx) ** 2) + ((yy - cy) ** 2)) / (2 * (0.2 * width) ** 2))
    arr = (rng.integers(0, 60, (height, width, 3)) + blob[..., None]).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode="RGB")
    if mode == "L":
        img = img.convert("L")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


# Image folders the examples use, a few small pictures each (relative path -> size).
IMAGES: dict[str, tuple[int, int]] = {
    "photos/a.jpg": (128, 96),
    "photos/b.png": (96, 128),
    "photos/cats/tom.jpg": (160, 120),
    "imgs/1.jpg": (96, 96),
    "imgs/2.png": (128, 80),
    "val/tabby/1.jpg": (128, 96),
    "val/espresso/2.jpg": (96, 128),
    "incoming/ok.jpg": (120, 90),
}
GREY_IMAGES: dict[str, tuple[int, int]] = {"xrays/1.png": (128, 128), "xrays/2.png": (96, 96)}
# Plain files the examples name but do not create themselves.
FILES: dict[str, str] = {
    # a file that is not an image, under an image name: an `error` row
    "incoming/broken.jpg": "<!DOCTYPE html><html>not a photo</html>\n",
    # ground truth for photos/ (`--truth labels.csv`): paths relative to the input folder
    "labels.csv": "path,label\na.jpg,tabby\nb.png,espresso\ncats/tom.jpg,tabby\n",
    # boxes on photos/ (original pixels)
    "boxes.csv": "path,x0,y0,x1,y1,label\na.jpg,20,10,100,80,*\ncats/tom.jpg,40,20,140,110,tabby\n",
    # the class names of the fine-tuned 10-class model
    "classes.txt": "".join(f"class_{i}\n" for i in range(10)),
    # a CI job's list of changed images: `--files-from changed.txt`
    "changed.txt": "photos/a.jpg\nphotos/cats/tom.jpg\n",
    # a model file next to the command: `--model ./mynet.py:build`
    "mynet.py": (
        "from torch import nn\n\n\n"
        "def build(num_classes: int = 3) -> nn.Module:\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(8, num_classes))\n"
    ),
    # an importable model factory: `--model mypkg.models:build_classifier`
    "mypkg/__init__.py": "",
    "mypkg/models.py": (
        '"""A small classifier factory, as a project would have one."""\n\n'
        "from torch import nn\n\n\n"
        "def build_classifier(num_classes: int = 5) -> nn.Module:\n"
        "    return nn.Sequential(\n"
        "        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),\n"
        "        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),\n"
        "        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),\n"
        "    )\n"
    ),
}


def prepare_workspace(root: Path) -> Path:
    """The working folder every example runs in: sample_images/, configs/ and the inputs the examples name."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    for folder in ("sample_images", "configs"):
        shutil.copytree(REPO / folder, root / folder)
    for seed, (name, size) in enumerate(IMAGES.items()):
        write_image(root / name, size, seed=seed)
    for seed, (name, size) in enumerate(GREY_IMAGES.items()):
        write_image(root / name, size, seed=100 + seed, mode="L")
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    # the factory's checkpoint, saved as training code saves one (under DataParallel's `module.` prefix)
    sys.path.insert(0, str(root))
    try:
        factory = importlib.import_module("mypkg.models").build_classifier
        state = {f"module.{k}": v for k, v in factory().state_dict().items()}
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
            del sys.modules[name]
    torch.save({"state_dict": state}, root / "ckpt.pt")
    save_hf_classifier(root / "models" / "vit-finetuned")
    return root


# The Hugging Face classifier the examples load with `--model hf:models/vit-finetuned`: what `save_pretrained`
# writes for a fine-tuned ViT (config.json with the class names, the weights) plus its image processor's
# preprocessor_config.json; tiny (2 layers, 64 px) and random, since only that the run works is checked.
HF_PROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": 64, "width": 64},
    "resample": 2,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def save_hf_classifier(folder: Path) -> None:
    """A tiny ViTForImageClassification with class names, saved to `folder` (when transformers is there)."""
    import json

    import torch

    try:
        import transformers
    except ImportError:
        return  # the examples that need it then fail and say so
    names = ["tabby", "espresso", "lighthouse"]
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=16,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    transformers.ViTForImageClassification(config).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(HF_PROCESSOR), encoding="utf-8")


def ensure_hub_weights(model: str | None, weights: str | None, hub: Path) -> None:
    """Put a random-init state dict where torchvision looks for `model`'s `weights` in the torch hub cache.

    The examples name pretrained weights (`--weights IMAGENET1K_V2`, a family config's DEFAULT) that cannot be
    downloaded here. torchvision checks a file's hash only when it downloads it, so a state dict of the right
    shapes under the expected name (`Path(weights.url).name`) stands in for it; the maps are then those of a
    random model, which is all these tests look at (exit codes and that the run works).
    """
    import torch
    import torchvision

    spec = weights or "DEFAULT"
    if not model or ":" in model or spec.lower() == "none" or Path(spec).exists():
        return
    try:
        enum = torchvision.models.get_model_weights(model)
    except (ValueError, KeyError):
        return  # not a torchvision classifier with weights: the run reports that itself
    short = spec.split(".")[-1]
    member = enum.DEFAULT if short.upper() == "DEFAULT" else enum.__members__.get(short)
    if member is None:
        return
    target = hub / "checkpoints" / Path(member.url).name
    if target.exists():
        return
    kwargs: dict[str, Any] = {"num_classes": len(member.meta["categories"])}
    if model.startswith("vit_") and member.meta.get("min_size"):
        kwargs["image_size"] = member.meta["min_size"][0]
    torch.manual_seed(0)
    state = torchvision.models.get_model(model, weights=None, **kwargs).state_dict()
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)


@contextmanager
def offline_torch_hub(torch_home: Path) -> Iterator[None]:
    """TORCH_HOME and an empty Hugging Face cache (HF_HUB_CACHE, under it) for the examples, a download that fails
    at once like an offline machine's, one torch thread.

    One intra-op thread: these runs are small, and on a busy 2-core machine two threads spin against other
    processes (measured here: a resnet50 forward of one image 2.6 s with 2 threads, 0.13 s with 1).
    """
    import torch

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network in the doc tests")

    saved_env = {k: os.environ.get(k) for k in ("TORCH_HOME", "HF_HUB_CACHE", "GRADCAM_DEBUG")}
    saved_download = torch.hub.download_url_to_file
    threads = torch.get_num_threads()
    os.environ["TORCH_HOME"] = str(torch_home)
    os.environ["HF_HUB_CACHE"] = str(torch_home / "huggingface-hub")  # what this machine has cached is not used
    os.environ.pop("GRADCAM_DEBUG", None)
    torch.hub.download_url_to_file = offline  # type: ignore[assignment]
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.hub.download_url_to_file = saved_download  # type: ignore[assignment]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ------------------------------------------------------------------------------------------ gradcam commands


@dataclasses.dataclass
class Parsed:
    """A gradcam command as Click and the config see it."""

    name: str  # subcommand, or "" for a group option such as --version
    params: dict[str, Any]
    settings: Any = None  # gradcam_cli.config.Settings for explain / layers / audit / report


def parse_gradcam(args: Sequence[str]) -> Parsed:
    """Parse a gradcam command line as the CLI would, without running it; raises on a bad option or value.

    For `explain`: Click's parsing of every option (unknown options, bad choices, missing -o, a -c file that
    does not exist), then `load_settings(config, **params)` and `check_audit_settings` exactly as the command
    body calls them (bad values, unknown config keys, impossible audit combinations).
    """
    import click

    from gradcam_cli.cli import main
    from gradcam_cli.config import check_audit_settings, load_settings

    args = list(args)
    if not args or args[0].startswith("-"):
        main.make_context("gradcam", args)  # --version / --help exit inside; that is fine for a parse
        return Parsed("", {})
    group_ctx = click.Context(main, info_name="gradcam", **main.context_settings)
    name, cmd, rest = main.resolve_command(group_ctx, args)
    assert name is not None and cmd is not None
    if any(h in rest for h in ("-h", "--help")):
        return Parsed(name, {})
    ctx = cmd.make_context(name, list(rest), parent=group_ctx)
    params = dict(ctx.params)
    parsed = Parsed(name, params)
    if name == "explain":
        flags = {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
        config = flags.pop("config")
        flags.pop("inputs")
        flags.pop("out")
        for key in ("target_layers", "targets", "fail_under", "fail_over"):
            if not flags[key]:
                flags[key] = None
        parsed.settings = load_settings(config, **flags)
        check_audit_settings(parsed.settings)
    elif name == "layers":
        parsed.settings = load_settings(
            params["config"], model=params["model"], weights="none", input_size=params["input_size"]
        )
    elif name == "audit":
        parsed.settings = load_settings(
            None,
            truth=params["truth"],
            worst=params["worst"],
            fail_under=list(params["fail_under"]) or None,
            fail_over=list(params["fail_over"]) or None,
        )
    elif name == "report":
        parsed.settings = load_settings(None, truth=params["truth"])
    return parsed


def device_missing(device: str) -> bool:
    """Whether a --device value names hardware this machine does not have."""
    import torch

    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        return not torch.cuda.is_available() or index >= torch.cuda.device_count()
    if device == "mps":
        return not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    return False


@dataclasses.dataclass
class Outcome:
    action: str  # run, parse or check
    exit_code: int | None = None
    output: str = ""
    why: str = ""


def run_gradcam(args: Sequence[str], env: Sequence[tuple[str, str]], hub: Path) -> Outcome:
    """Parse, then run in this process through CliRunner (parse only when the device is missing)."""
    import click
    from click.testing import CliRunner

    from gradcam_cli.cli import main
    from gradcam_cli.errors import GradcamError

    try:
        parsed: Parsed | None = parse_gradcam(args)
    except (GradcamError, click.ClickException, click.exceptions.Exit):
        parsed = None  # a usage error: the run below reports it, with its exit code
    if parsed is not None and parsed.name == "explain" and parsed.settings is not None:  # not for --help
        settings = parsed.settings
        if device_missing(settings.device):
            return Outcome(PARSE, why=f"--device {settings.device}: not on this machine")
        ensure_hub_weights(settings.model, settings.weights, hub)
    # PYTHONPATH=... before a command: its folders go first on this process's import path for the run
    extra_paths = [str(Path(p).resolve()) for name, value in env if name == "PYTHONPATH" for p in value.split(":") if p]
    run_env: dict[str, str | None] = {name: value for name, value in env if name != "PYTHONPATH"}
    run_env["GRADCAM_DEBUG"] = None
    sys.path[:0] = extra_paths
    before = set(sys.modules)
    try:
        result = CliRunner().invoke(main, list(args), env=run_env, prog_name="gradcam")
    finally:
        del sys.path[: len(extra_paths)]
        if extra_paths:  # modules imported from PYTHONPATH are forgotten with it
            for name in set(sys.modules) - before:
                module = sys.modules[name]
                if any(str(getattr(module, "__file__", "") or "").startswith(p) for p in extra_paths):
                    del sys.modules[name]
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        trace = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"the command raised instead of exiting:\n{result.output[-3000:]}\n{trace}")
    return Outcome(RUN, result.exit_code, result.output)


def parse_torchrun(args: Sequence[str]) -> Outcome:
    """torchrun's options with its own parser; the gradcam command it starts with parse_gradcam."""
    from torch.distributed.run import get_args_parser

    try:
        ns = get_args_parser().parse_args(list(args))
    except SystemExit as exc:  # argparse has printed why
        raise AssertionError(f"torchrun rejects these options (exit {exc.code})") from None
    program = [ns.training_script, *ns.training_script_args]
    if ns.module:
        if ns.training_script != "gradcam_cli":
            raise AssertionError(f"torchrun -m {ns.training_script}: expected -m gradcam_cli")
        gradcam_args = program[1:]
    elif Path(ns.training_script).name == "gradcam":
        gradcam_args = program[1:]
    else:
        raise AssertionError(f"torchrun {ns.training_script}: expected -m gradcam_cli or the gradcam script")
    parse_gradcam(gradcam_args)
    return Outcome(PARSE, why="torchrun")


def check_named(argv: Sequence[str], skip: int) -> None:
    """For CHECK commands: what the command names exists in the repository."""
    words = ["python" if PYTHON.match(w) else w for w in argv]
    rest = list(argv[skip:])
    if words[0] == "make":
        makefile = (REPO / "Makefile").read_text(encoding="utf-8")
        for target in rest or ["demo"]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"Makefile has no target {target!r}"
    elif words[:2] == ["pip", "install"]:
        pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
        section = pyproject.partition("[project.optional-dependencies]")[2].split("\n[", 1)[0]
        known = set(re.findall(r"^([\w-]+)\s*=", section, re.M))
        for spec in (w for w in rest if not w.startswith("-")):
            match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", spec)
            assert match, f"pip install {spec}: expected . or .[extra,...]"
            for extra in filter(None, (match.group(1) or "").split(",")):
                assert extra in known, f"pyproject.toml has no extra {extra!r} (has {sorted(known)})"
    elif words[:3] == ["python", "-m", "gradcam_cli.model.catalog"]:
        assert importlib.util.find_spec("gradcam_cli.model.catalog") is not None
    elif words[:2] == ["ruff", "format"]:
        for name in rest:
            assert (REPO / name).exists(), f"ruff format {name}: no such file in the repository"
    elif words[0] == "python":
        script = REPO / argv[1]
        assert script.is_file(), f"{argv[1]}: no such script in the repository"
        text = script.read_text(encoding="utf-8")
        for option in (w.split("=")[0] for w in argv[2:] if w.startswith("--")):
            assert f'"{option}"' in text, f"{argv[1]} has no option {option}"
    else:
        raise AssertionError(f"no check for {' '.join(argv)}")


def run_command(command: Command, hub: Path) -> Outcome:
    """Run, parse or check one command as COMMAND_KINDS says; the caller compares the exit code."""
    action, why, skip = kind_of(command.argv)
    if action == CHECK:
        check_named(command.argv, skip)
        return Outcome(CHECK, why=why)
    if action == PARSE:
        return parse_torchrun(command.argv[skip:])
    return run_gradcam(command.argv[skip:], command.env, hub)


def run_python(block: Block) -> None:
    """exec() a python block in a fresh namespace (in the current folder)."""
    code = compile(block.text, f"{rel(block.path)}:{block.line}", "exec")
    exec(code, {"__name__": "__main__"})


# ----------------------------------------------------------------------------------------------------- links

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks), with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
            continue
        match = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            found.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every link and image of a Markdown file that is not a URL, outside code blocks."""
    found = []
    in_code = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link
        for match in LINK.finditer(line):
            target = match.group(1) or match.group(2)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, file: ...
                found.append((number, target))
    return found


def broken_link(path: Path, target: str) -> str | None:
    """Why a relative link of `path` does not resolve, or None when it does."""
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    shown = rel(dest) if dest.is_relative_to(REPO) else str(dest)
    if not dest.exists():
        return f"{target}: {shown} does not exist"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: {shown} has no heading with the anchor #{anchor}"
    return None
