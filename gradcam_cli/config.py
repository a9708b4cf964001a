"""Settings: YAML config + command-line flags -> one validated, frozen `Settings`.

Precedence is flag > config file > default. Every value passes through the same validator whether it came
from YAML or a flag, so a wrong value is reported the same way, naming the config key (or flag) and what
was expected. No torch import here: config errors must answer instantly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcam_cli.audit.diff.gates import DIFF_GATE_KEYS, DIFF_GATES_OVER, DIFF_GATES_UNDER
from gradcam_cli.audit.metrics import (
    ACCURACY,
    ANNOTATED_METRICS,
    BY_GATE,
    GATES_OVER,
    GATES_UNDER,
    METRIC_NAMES,
    gap_gate,
)
from gradcam_cli.cam.methods import BUILT_IN_METHODS, method_names
from gradcam_cli.errors import GradcamError
from gradcam_cli.out.names import SAVE_KINDS
from gradcam_cli.render.colormaps import COLORMAP_NAMES

METHOD_NAMES: tuple[str, ...] = BUILT_IN_METHODS  # the --method choices; Settings also accept registered ones
FUSE_MODES: tuple[str, ...] = ("none", "mean", "max")
PREPROCESS_MODES: tuple[str, ...] = ("full", "crop")
AMP_MODES: tuple[str, ...] = ("none", "bf16", "fp16")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
TARGET_PATTERN = re.compile(r"^(pred|label|topk:[1-9]\d*)$")
GROUP_FOLDERS_PATTERN = re.compile(r"^folders:([1-9]\d*)$")
# values a group needs of a number (accuracy, a metric) to take part in the gaps between groups: one image
# alone makes any gap, so a group must be a few images before its mean is compared
GROUP_MIN_COUNT = 3
# Pillow's own default for Image.MAX_IMAGE_PIXELS (it only warns there and refuses at twice that); we refuse at it
DEFAULT_MAX_PIXELS = 89_478_485
# where JPEGs are decoded: Pillow in the DataLoader workers, or torchvision.io on the compute device (nvJPEG)
DECODE_MODES: tuple[str, ...] = ("auto", "workers", "device")
MAX_INPUT_SIDE = 4096
BASELINES: tuple[str, ...] = ("blur", "zero", "mean")
RANDOMIZATION_MODES: tuple[str, ...] = ("head", "cascade")


@dataclass(frozen=True)
class Settings:
    """Everything a run needs to know, already validated. Tuples, not lists, so it can be hashed and shared."""

    model: str | None = None
    weights: str | None = None
    target_layers: tuple[str, ...] = ()
    method: str = "gradcam"
    targets: tuple[str, ...] = ("pred",)
    batch_size: int = 16
    device: str = "auto"
    workers: int = 2
    save: tuple[str, ...] = ("heatmap", "overlay")
    colormap: str = "jet"
    alpha: float = 0.5
    preprocess: str = "full"
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    labels: str | None = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    limit: int | None = None
    quiet: bool = False
    amp: str = "none"
    channels_last: bool | None = None  # None = auto: on for the CPU (measured faster there), off on CUDA
    decode: str = "auto"  # auto: JPEGs decoded on the device on CUDA, by Pillow in the workers otherwise
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    resume: bool = False
    fsync: bool = False  # files, folders, the CSV and run.json synced to the disk: a power cut loses <= a batch
    # audit: metrics, annotations, summary, gates, sampling
    metrics: tuple[str, ...] = ()
    steps: int = 20
    baseline: str = "blur"
    metric_batch_size: int | None = None
    randomization: str = "head"  # head: the layers after the target at once; cascade: then block by block down
    sensitivity_samples: int = 10
    sensitivity_radius: float = 0.05  # half-width of the uniform noise, in pixel units of [0, 1] images
    groups: str | None = None  # a CSV of path,<attribute>... or folders:N
    group_min_count: int = GROUP_MIN_COUNT
    boxes: str | None = None
    masks: str | None = None
    summary: bool = False
    truth: str = "auto"
    worst: int = 10
    fail_under: tuple[tuple[str, float], ...] = ()
    fail_over: tuple[tuple[str, float], ...] = ()
    only_below: float | None = None
    sample_rate: float | None = None
    files_from: str | None = None
    compare_to: str | None = None  # an earlier explain output to diff this run against
    dist_timeout: float = 120.0
    # method options
    counterfactual: bool = False
    aug_smooth: bool = False
    eigen_smooth: bool = False
    chunk_size: int = 32
    fuse: str = "none"

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` validated as if they were flags (so the API gets the same checks as the CLI)."""
        return dataclasses.replace(self, **_validate_all(changes, source="argument"))


FLAG_NAMES: dict[str, str] = {"target_layers": "--layer", "targets": "--target"}


def flag_name(key: str) -> str:
    """The command-line spelling of a settings key (`batch_size` -> `--batch-size`)."""
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def _where(key: str, source: str) -> str:
    if source == "config":
        return f"config key '{key}'"
    if source == "option":
        return f"option {flag_name(key)}"
    return f"{source} '{key}'"


def _fail(key: str, source: str, expected: str, value: Any) -> GradcamError:
    where = _where(key, source)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return GradcamError(f"{where}: expected {expected}, got {shown}")


def _str_list(value: Any) -> list[str] | None:
    """Accept 'a,b', ['a', 'b'] or a single scalar; None when the shape is wrong."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        return [str(v).strip() for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return [str(value)]
    return None


def _v_optional_str(key: str, value: Any, source: str) -> str | None:
    if value is None:
        return None
    # names and paths: a NUL byte can name no file and would surface later as a ValueError deep in os/torch
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise _fail(key, source, "a non-empty string", value)
    return value.strip()


def _v_layers(key: str, value: Any, source: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in items):
        raise _fail(key, source, "a layer path or a list of layer paths such as 'layer4' or 'features.-1'", value)
    return tuple(v.strip() for v in items)


def _v_choice(choices: tuple[str, ...]) -> Callable[[str, Any, str], str]:
    def check(key: str, value: Any, source: str) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise _fail(key, source, "one of " + ", ".join(choices), value)
        return value.strip().lower()

    return check


def _v_method(key: str, value: Any, source: str) -> str:
    """A registered method name (`cam.methods.register` adds to them at run time)."""
    return _v_choice(method_names())(key, value, source)


def _v_targets(key: str, value: Any, source: str) -> tuple[str, ...]:
    items = _str_list(value)
    if not items:
        raise _fail(key, source, "'pred', 'label', 'topk:K', class indexes or class names", value)
    for item in items:
        if item.lower().startswith("topk") and not TARGET_PATTERN.match(item.lower()):
            raise _fail(key, source, "'topk:K' with K a positive integer", item)
        if item.lstrip("-").isdigit() and int(item) < 0:
            raise _fail(key, source, "class indexes >= 0", item)
    return tuple(i.lower() if TARGET_PATTERN.match(i.lower()) else i for i in items)


def _v_positive_int(key: str, value: Any, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(key, source, "a positive integer", value)
    return value


def _v_optional_positive_int(key: str, value: Any, source: str) -> int | None:
    return None if value is None else _v_positive_int(key, value, source)


def _v_nonneg_int(key: str, value: Any, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(key, source, "an integer >= 0", value)
    return value


def _v_device(key: str, value: Any, source: str) -> str:
    if not isinstance(value, str) or not DEVICE_PATTERN.match(value.strip().lower()):
        raise _fail(key, source, "auto, cpu, cuda, cuda:N or mps", value)
    return value.strip().lower()


def _v_save(key: str, value: Any, source: str) -> tuple[str, ...]:
    items = _str_list(value)
    if items is None or not all(i.lower() in SAVE_KINDS for i in items):
        raise _fail(key, source, "a comma-separated subset of " + ",".join(SAVE_KINDS), value)
    lowered = [i.lower() for i in items]
    return tuple(k for k in SAVE_KINDS if k in lowered)


def _v_alpha(key: str, value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise _fail(key, source, "a number between 0 and 1", value)
    return float(value)


def _v_input_size(key: str, value: Any, source: str) -> tuple[int, int] | None:
    if value is None:
        return None

    def side(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= MAX_INPUT_SIDE

    if side(value):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(side(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise _fail(key, source, f"an integer from 8 to {MAX_INPUT_SIDE} or [height, width]", value)


def _v_triple(key: str, value: Any, source: str) -> tuple[float, float, float] | None:
    if value is None:
        return None
    # a std of 0 (or NaN/inf anywhere) would turn every input into NaN and every image into an error row
    positive = key == "std"
    if (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and (not positive or all(v > 0 for v in value))
    ):
        return (float(value[0]), float(value[1]), float(value[2]))
    what = "positive numbers" if positive else "finite numbers"
    raise _fail(key, source, f"a list of three {what} (one per RGB channel, images scaled to [0, 1])", value)


def _v_kwargs(key: str, value: Any, source: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _fail(key, source, "a mapping of keyword arguments", value)
    return dict(value)


def _v_positive_number(key: str, value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < float("inf"):
        raise _fail(key, source, "a number of seconds > 0", value)
    return float(value)


def _v_bool(key: str, value: Any, source: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, source, "true or false", value)
    return value


def _v_auto_bool(key: str, value: Any, source: str) -> bool | None:
    """true, false, or auto (None: the run decides by device)."""
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return None
    if not isinstance(value, bool):
        raise _fail(key, source, "true, false or auto", value)
    return value


def _v_metrics(key: str, value: Any, source: str) -> tuple[str, ...]:
    items = _str_list(value)
    if items is None or not all(i.lower() in METRIC_NAMES for i in items):
        raise _fail(key, source, "a comma-separated subset of " + ",".join(METRIC_NAMES), value)
    lowered = {i.lower() for i in items}
    return tuple(m for m in METRIC_NAMES if m in lowered)


def _v_steps(key: str, value: Any, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 1000:
        raise _fail(key, source, "an integer from 2 to 1000", value)
    return value


def _v_fraction(key: str, value: Any, source: str) -> float | None:
    """A number in (0, 1]; 'P%' is accepted too (`--sample-rate 5%`)."""
    if value is None:
        return None
    number = _number(value)
    if number is None or not 0.0 < number <= 1.0:
        raise _fail(key, source, "a number greater than 0 and at most 1 (or a percentage such as 10%)", value)
    return number


def _number(value: Any) -> float | None:
    """A finite float from a number, a numeric string, or a percentage string ('80%' -> 0.8); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        scale = 1.0
        if text.endswith("%"):
            text, scale = text[:-1].strip(), 0.01
        try:
            number = float(text) * scale
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _v_gates(allowed: tuple[str, ...], gaps: bool = False) -> Callable[[str, Any, str], tuple[tuple[str, float], ...]]:
    """KEY=VALUE gates, from flags ('pointing=0.8', repeatable), a YAML mapping or a list of 'KEY=VALUE';
    with `gaps`, also gap:KEY and gap:ATTRIBUTE:KEY (gates on the gap between groups)."""

    def known(gate: str) -> bool:
        return gate in allowed or (gaps and gap_gate(gate) is not None)

    def check(key: str, value: Any, source: str) -> tuple[tuple[str, float], ...]:
        gap_keys = " (or gap:KEY, gap:ATTRIBUTE:KEY on the gap between --groups)" if gaps else ""
        expected = (
            "KEY=VALUE with KEY one of " + ", ".join(allowed) + gap_keys + " and VALUE a number (or a percentage)"
        )
        if value is None:
            return ()
        pairs: list[tuple[Any, Any]] = []
        if isinstance(value, Mapping):
            pairs = list(value.items())
        else:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise _fail(key, source, expected, value)
            for item in items:
                if not isinstance(item, str) or "=" not in item:
                    raise _fail(key, source, expected, item)
                name, _, text = item.partition("=")
                pairs.append((name, text))
        gates: dict[str, float] = {}
        for name, raw in pairs:
            gate = str(name).strip().lower()
            number = _number(raw)
            if not gaps and gap_gate(gate) is not None:
                raise _fail(key, source, "a gap gate as --fail-over (a gap is worse the larger it is)", gate)
            if not known(gate) or number is None:
                raise _fail(key, source, expected, f"{name}={raw}")
            gates[gate] = number
        return tuple(sorted(gates.items()))

    return check


def _v_groups(key: str, value: Any, source: str) -> str | None:
    """A CSV file of path,<attribute>..., folders:N (N >= 1) or none; the file is read when the images are known."""
    text = _v_optional_str(key, value, source)
    if text is None:
        return None
    keyword = text.lower().startswith("folders:") or text.lower() == "none"
    if keyword and not (text.lower() == "none" or GROUP_FOLDERS_PATTERN.match(text.lower())):
        raise _fail(key, source, "folders:N with N a folder level from 1, or a CSV file of path,<attribute>...", value)
    return text.lower() if keyword else text


def _v_truth(key: str, value: Any, source: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, source, "auto, folders, none or a CSV file of path,label", value)
    text = value.strip()
    return text.lower() if text.lower() in ("auto", "folders", "none") else text


VALIDATORS: dict[str, Callable[[str, Any, str], Any]] = {
    "model": _v_optional_str,
    "weights": _v_optional_str,
    "target_layers": _v_layers,
    "method": _v_method,
    "targets": _v_targets,
    "batch_size": _v_positive_int,
    "device": _v_device,
    "workers": _v_nonneg_int,
    "save": _v_save,
    "colormap": _v_choice(COLORMAP_NAMES),
    "alpha": _v_alpha,
    "preprocess": _v_choice(PREPROCESS_MODES),
    "input_size": _v_input_size,
    "mean": _v_triple,
    "std": _v_triple,
    "labels": _v_optional_str,
    "model_kwargs": _v_kwargs,
    "num_classes": _v_optional_positive_int,
    "limit": _v_optional_positive_int,
    "quiet": _v_bool,
    "amp": _v_choice(AMP_MODES),
    "channels_last": _v_auto_bool,
    "decode": _v_choice(DECODE_MODES),
    "seed": _v_nonneg_int,
    "max_pixels": _v_positive_int,
    "resume": _v_bool,
    "fsync": _v_bool,
    "metrics": _v_metrics,
    "steps": _v_steps,
    "baseline": _v_choice(BASELINES),
    "metric_batch_size": _v_optional_positive_int,
    "randomization": _v_choice(RANDOMIZATION_MODES),
    "sensitivity_samples": _v_positive_int,
    "sensitivity_radius": _v_positive_number,
    "groups": _v_groups,
    "group_min_count": _v_positive_int,
    "boxes": _v_optional_str,
    "masks": _v_optional_str,
    "summary": _v_bool,
    "truth": _v_truth,
    "worst": _v_nonneg_int,
    "fail_under": _v_gates(GATES_UNDER + DIFF_GATES_UNDER),
    "fail_over": _v_gates(GATES_OVER + DIFF_GATES_OVER, gaps=True),
    "only_below": _v_fraction,
    "sample_rate": _v_fraction,
    "files_from": _v_optional_str,
    "compare_to": _v_optional_str,
    "dist_timeout": _v_positive_number,
    "counterfactual": _v_bool,
    "aug_smooth": _v_bool,
    "eigen_smooth": _v_bool,
    "chunk_size": _v_positive_int,
    "fuse": _v_choice(FUSE_MODES),
}
assert set(VALIDATORS) == {f.name for f in dataclasses.fields(Settings)}


def _validate_all(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if key not in VALIDATORS:
            import difflib

            near = difflib.get_close_matches(str(key), list(VALIDATORS), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise GradcamError(
                f"unknown {'config key' if source == 'config' else source} {str(key)!r}{hint}; "
                f"valid keys: {', '.join(VALIDATORS)}"
            )
        clean[key] = VALIDATORS[key](key, value, source)
    return clean


def read_config(path: str | Path) -> dict[str, Any]:
    """Parse a YAML config with the safe loader; the result is validated but not yet merged."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise GradcamError(f"cannot read config {p}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise GradcamError(f"cannot read config {p}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise GradcamError(f"config {p}{where}: {problem}") from None
    except Exception as exc:  # the safe loader still raises ValueError (bad dates), RecursionError (deep nesting)...
        raise GradcamError(f"config {p}: invalid YAML value ({type(exc).__name__}: {exc})") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise GradcamError(f"config {p}: expected a mapping of keys to values at the top level")
    clean = _validate_all(data, source="config")
    # a relative path in a config means relative to the config file, which is how people write configs
    for key in ("labels", "boxes", "masks", "groups", "truth", "files_from", "weights", "compare_to"):
        value = clean.get(key)
        if value and _is_relative_path(key, value, p.parent):
            clean[key] = str(p.parent / value)
    return clean


# checkpoint file endings: a `weights` value with one is a path even when the file is missing (so the error names it)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".tar")


def _is_relative_path(key: str, value: str, folder: Path) -> bool:
    """Whether a config value is a relative file path (to be read relative to the config's folder).

    `truth` may be a keyword, `files_from` may be `-` (standard input), and `weights` may name weights rather
    than a file (`DEFAULT`, `none`, `IMAGENET1K_V2`): those count as paths only when they look like one or
    name a file next to the config.
    """
    if Path(value).is_absolute():
        return False
    if key == "truth":
        return value not in ("auto", "folders", "none")
    if key == "groups":
        return value != "none" and not GROUP_FOLDERS_PATTERN.match(value)
    if key == "files_from":
        return value != "-"
    if key == "weights":
        return (
            any(sep in value for sep in "/\\")
            or value.lower().endswith(CHECKPOINT_SUFFIXES)
            or (folder / value).is_file()
        )
    return True


def check_audit_settings(settings: Settings) -> None:
    """Combinations of audit settings that cannot work, caught before anything runs (one line, exit 2)."""
    metrics = set(settings.metrics)
    annotated = bool(settings.boxes or settings.masks)
    needs = [m for m in ANNOTATED_METRICS if m in metrics]
    if needs and not annotated:
        raise GradcamError(f"--metrics {','.join(needs)} needs annotations: --boxes FILE and/or --masks DIR")
    if annotated and not needs:
        raise GradcamError(
            f"--boxes/--masks are used by --metrics {','.join(ANNOTATED_METRICS)}; add one of them to --metrics"
        )
    for flag, gates in (("--fail-under", settings.fail_under), ("--fail-over", settings.fail_over)):
        for key, _value in gates:
            inner = gap_gate(key)
            gate = inner[1] if inner else key
            if gate in BY_GATE and BY_GATE[gate].metric not in metrics:
                raise GradcamError(f"{flag} {key}=...: needs --metrics {BY_GATE[gate].metric}")
            if settings.truth == "none" and gate == ACCURACY:
                raise GradcamError(f"{flag} {key}=...: needs ground truth, but --truth is none")
    check_gap_gates(settings)
    check_diff_gates(settings)


def check_gap_gates(settings: Settings) -> None:
    """A gate on the gap between groups (`gap:KEY`) needs groups: --groups FILE or --groups folders:N."""
    if settings.groups not in (None, "none"):
        return
    for key, _value in settings.fail_over:
        if gap_gate(key) is not None:
            raise GradcamError(
                f"--fail-over {key}=...: a gate on the gap between groups; add --groups FILE (a CSV of "
                "path,<attribute>...) or --groups folders:N"
            )


def check_diff_gates(settings: Settings) -> None:
    """A gate of `gradcam diff` (spearman, flips, ...) needs a run to compare with: `--compare-to`."""
    if settings.compare_to is not None:
        return
    for flag, gates in (("--fail-under", settings.fail_under), ("--fail-over", settings.fail_over)):
        for key, _value in gates:
            if key in DIFF_GATE_KEYS:
                raise GradcamError(
                    f"{flag} {key}=...: a gate on the comparison with an earlier run; add --compare-to OUT_A "
                    "(or run gradcam diff OUT_A OUT_B)"
                )


def load_settings(config: str | Path | None = None, **flags: Any) -> Settings:
    """Merge defaults, the config file and flags (None means "flag not given") into validated `Settings`."""
    merged: dict[str, Any] = read_config(config) if config is not None else {}
    merged.update(_validate_all({k: v for k, v in flags.items() if v is not None}, source="option"))
    return Settings(**merged)
