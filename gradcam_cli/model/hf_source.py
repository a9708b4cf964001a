"""`--model hf:PATH_OR_REPO_ID`: a Hugging Face image classifier (`AutoModelForImageClassification`).

- Where: a local folder (what `save_pretrained` writes: config.json, the weights, preprocessor_config.json),
  or a repo id (`org/name`) whose snapshot is already in the Hugging Face cache. Everything is read with
  `local_files_only=True` from that folder; nothing is downloaded, and a model that is not there is one line
  saying where it was looked for.
- Weights: the folder's own (`--weights DEFAULT`, also when not given), `none` (the config's architecture with
  transformers' random init, seeded) or a checkpoint PATH (a state dict of this architecture).
- Class names: `config.id2label` (transformers' placeholders `LABEL_0`, ... count as none).
- Preprocessing: the model's image processor (`AutoImageProcessor`, from preprocessor_config.json) mapped onto
  our resize: its output size (the crop when it crops, else its resize), its crop fraction (crop / resize, for
  `--preprocess crop`), mean and std (rescaled when its rescale factor is not 1/255) and resample filter.
- Logits: `.logits` of the output object (`forward.logits_of`).
- Default layer (`hf_default_layer`): ViT, DeiT, BEiT, ... the last encoder layer's `layernorm_before` (the
  head reads the class token after the last layer, as in timm's ViT); ConvNeXt, ResNet, RegNet: the last
  stage (`encoder.stages.N`); Swin: the final `layernorm` over the last stage's tokens (its stages return
  tuples, which have no single layout).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from gradcam_cli.config import Settings
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.checkpoint import load_checkpoint
from gradcam_cli.model.loading import _first_line
from gradcam_cli.model.sources import SourceModel, cached_hub_file, hf_cache_dir, import_package, offline

# PIL's resampling numbers, which image processors store as `resample`
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' progress bars and warnings off for a load (only the CLI talks to the terminal), and
    offline; restored afterwards."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with offline():
            yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def locate(spec: str) -> Path:
    """The local folder of `hf:SPEC`: SPEC itself when it is a folder, else the cached snapshot of repo SPEC."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GradcamError(f"model 'hf:{spec}': {path} has no config.json (not a saved Hugging Face model)")
        return path
    looks_like_path = spec.startswith((".", "/", "~")) or "\\" in spec or not REPO_ID.match(spec)
    if looks_like_path or path.exists():
        raise GradcamError(f"model 'hf:{spec}': no such folder ({path.resolve()})")
    found = cached_hub_file(spec, ("config.json",))
    if found is None:
        cache = hf_cache_dir() / f"models--{spec.replace('/', '--')}"
        raise GradcamError(
            f"model 'hf:{spec}': not a folder here and not in the Hugging Face cache ({cache}); nothing is "
            "downloaded: fetch it once where there is network, or pass a folder saved with save_pretrained"
        )
    return found.parent


def _labels(config: Any) -> list[str]:
    """config.id2label in index order; [] when absent or only transformers' `LABEL_i` placeholders."""
    raw = getattr(config, "id2label", None) or {}
    count = int(getattr(config, "num_labels", len(raw)) or 0)
    by_index = {int(k): str(v) for k, v in raw.items()}
    names = [by_index.get(i, "") for i in range(count)]
    if not names or all(n == f"LABEL_{i}" or not n for i, n in enumerate(names)):
        return []
    return [n or str(i) for i, n in enumerate(names)]


def _field(obj: Any, key: str) -> Any:
    """A key of a size dict (a plain dict in older transformers, a SizeDict in newer ones), or None."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    if isinstance(obj, int):
        return obj if key == "shortest_edge" else None
    return getattr(obj, key, None)


def processor_cfg(processor: Any) -> dict[str, Any]:
    """An image processor's preprocessing as timm-style keys (input_size, crop_pct, mean, std, interpolation).

    Output size: the center crop when the processor crops (`do_center_crop`), else its resize. crop_pct is the
    crop's share of the resize (`--preprocess crop` resizes the short side to size / crop_pct, then crops);
    ConvNeXt's processor keeps its own crop_pct below 384 px and warps (crop_pct 1) from 384 up.
    Normalisation: processors compute (p * r - mean) / std on 0-255 pixels p with rescale factor r (1/255 by
    default; 1 without rescaling); ours is (p / 255 - mean') / std', so mean' = mean / (255 r) and likewise std.
    """
    size = getattr(processor, "size", None)
    height, width, short = _field(size, "height"), _field(size, "width"), _field(size, "shortest_edge")
    resize = (height, width) if height and width else ((short, short) if short else None)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    crop_hw = (_field(crop, "height"), _field(crop, "width"))
    cfg: dict[str, Any] = {}
    if crop_hw[0] and crop_hw[1]:
        cfg["input_size"] = (3, int(crop_hw[0]), int(crop_hw[1]))
        if resize is not None:
            cfg["crop_pct"] = min(crop_hw) / min(resize)
    elif resize is not None:
        cfg["input_size"] = (3, int(resize[0]), int(resize[1]))
        crop_pct = getattr(processor, "crop_pct", None)
        if short and not height and isinstance(crop_pct, (int, float)) and short < 384:
            cfg["crop_pct"] = float(crop_pct)
        else:
            cfg["crop_pct"] = 1.0
    rescale = float(getattr(processor, "rescale_factor", 1 / 255)) if getattr(processor, "do_rescale", True) else 1.0
    scale = 255.0 * rescale
    if getattr(processor, "do_normalize", True):
        mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
        if isinstance(mean, (int, float)):
            mean = [mean] * 3
        if isinstance(std, (int, float)):
            std = [std] * 3
        if mean is not None and std is not None and len(mean) == 3 and len(std) == 3:
            cfg["mean"] = tuple(float(m) / scale for m in mean)
            cfg["std"] = tuple(float(s) / scale for s in std)
    else:
        cfg["mean"], cfg["std"] = (0.0, 0.0, 0.0), (1.0 / scale,) * 3
    resample = getattr(processor, "resample", None)  # a PIL number or enum, or a torchvision InterpolationMode
    value = getattr(resample, "value", resample)
    if isinstance(value, int):
        cfg["interpolation"] = PIL_RESAMPLE.get(value, str(value))
    elif resample is not None:
        cfg["interpolation"] = str(getattr(resample, "name", resample)).lower()
    return cfg


def _preprocessing(transformers: Any, folder: Path, config: Any) -> tuple[dict[str, Any], list[str]]:
    """(timm-style cfg, notes) from the folder's image processor; the config's image_size when it has none."""
    if not (folder / "preprocessor_config.json").is_file():
        size = getattr(config, "image_size", None)
        cfg: dict[str, Any] = {"input_size": (3, size, size)} if isinstance(size, int) else {}
        return cfg, [
            f"{folder} has no preprocessor_config.json: ImageNet mean and std"
            + (f" at the config's image_size {size}" if cfg else "")
        ]
    try:
        with _quiet(transformers):
            processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise GradcamError(
            f"{folder / 'preprocessor_config.json'}: transformers cannot read it: {_first_line(exc)}"
        ) from None
    cfg = processor_cfg(processor)
    return cfg, [f"preprocessing from {folder.name}'s {type(processor).__name__}"]


def load_hf(spec: str, settings: Settings) -> SourceModel:
    """Load `hf:SPEC` with `settings.weights` (DEFAULT/unset: the folder's, none, or a checkpoint PATH)."""
    transformers = import_package("transformers", f"model 'hf:{spec}'")
    folder = locate(spec)
    kwargs = dict(settings.model_kwargs)
    try:
        with _quiet(transformers):
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise GradcamError(f"model 'hf:{spec}': cannot read {folder / 'config.json'}: {_first_line(exc)}") from None
    if settings.num_classes is not None and settings.num_classes != config.num_labels:
        raise GradcamError(
            f"config key 'num_classes': hf:{spec} has {config.num_labels} classes (config.json's id2label); "
            "a Hugging Face model's classes come from its config"
        )
    weights = settings.weights or "DEFAULT"
    auto = transformers.AutoModelForImageClassification
    try:
        with _quiet(transformers):
            if weights.upper() == "DEFAULT":
                model = auto.from_pretrained(str(folder), local_files_only=True, **kwargs)
            else:
                model = auto.from_config(config, **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            kind = getattr(config, "model_type", "?")
            raise GradcamError(
                f"model 'hf:{spec}': a '{kind}' model, which transformers' AutoModelForImageClassification "
                "does not know; gradcam explains image classifiers"
            ) from None
        raise GradcamError(f"model 'hf:{spec}': {_first_line(exc)}") from None
    except Exception as exc:
        raise GradcamError(f"model 'hf:{spec}': {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise GradcamError(f"model 'hf:{spec}': transformers returned {type(model).__name__}, not an nn.Module")
    notes: list[str] = []
    if weights.upper() == "DEFAULT":
        # a cached repo: its id and snapshot, not the cache's path (which differs from machine to machine)
        cached = folder != Path(spec).expanduser()
        weights = f"DEFAULT ({spec} snapshot {folder.name})" if cached else f"DEFAULT ({folder})"
    elif weights.lower() == "none":
        weights = "none"
    else:
        notes += load_checkpoint(model, Path(weights))
    cfg, more = _preprocessing(transformers, folder, config)
    return SourceModel(model, weights, _labels(config), cfg, notes + more)


def hf_default_layer(model: nn.Module) -> tuple[str, str] | None:
    """(layer, why) for a transformers image classifier by its module names; None to auto-detect."""
    names = [n for n, _ in model.named_modules() if n]
    # a ViT layer sits right under `layers` (`encoder.layer` in transformers 4); Swin's blocks are deeper
    before = [n for n in names if re.search(r"(^|\.)(layers|encoder\.layer)\.\d+\.layernorm_before$", n)]
    if before:
        return before[-1], "Hugging Face ViT family default: the last encoder layer's layernorm_before"
    stages = [n for n in names if re.search(r"(^|\.)encoder\.stages\.\d+$", n)]
    if stages:
        return stages[-1], "Hugging Face CNN default: the last stage's output, which global pooling averages"
    base = getattr(model, "base_model_prefix", "")
    if f"{base}.layernorm" in names and f"{base}.encoder.layers" in names:
        return f"{base}.layernorm", "Hugging Face Swin default: the final layernorm over the last stage's tokens"
    return None
