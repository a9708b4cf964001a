"""`--model timm:NAME`: a timm model by its registry name, with its weights, preprocessing and default layer.

- Weights: `DEFAULT` (what `--weights` means when not given) is timm's pretrained checkpoint for NAME (or
  NAME.TAG), read from the local Hugging Face cache (or, for the few checkpoints timm still fetches by URL,
  the torch hub cache) and loaded through timm itself (`pretrained_cfg_overlay={"file": ...}`), so timm's own
  key conversions apply; it is never downloaded. `none` is timm's random init, seeded; a PATH is a checkpoint.
- Preprocessing: the model's `pretrained_cfg` (input size, crop_pct, mean, std, interpolation), with a
  fixed-size token model's own image size (`patch_embed.img_size`, from `img_size` in model_kwargs) winning
  over the cfg's 224.
- Class names: ImageNet's for a 1000-class head (`loading` fills them in), timm's ImageNet-21k/22k names for
  those heads, else by index.
- Default layer (`timm_default_layer`): a ViT/DeiT/EVA's last block's `norm1`; otherwise the map timm's
  `forward_features` hands to global pooling, named by its stage (timm's `feature_info`), before a final
  per-position LayerNorm (Swin).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradcam_cli.config import Settings
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.checkpoint import load_checkpoint
from gradcam_cli.model.layouts import infer_layout, token_hint
from gradcam_cli.model.loading import _first_line, _kwargs_with_num_classes
from gradcam_cli.model.sources import SourceModel, cached_hub_file, hf_cache_dir, import_package, offline

# what timm's hub repos hold, in the order timm itself prefers them
HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _pretrained_file(name: str, cfg: Any) -> tuple[Path | None, str]:
    """(the cached checkpoint of `name`'s pretrained cfg or None, where it was looked for)."""
    looked = []
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        filename = getattr(cfg, "hf_hub_filename", None)
        found = cached_hub_file(hub_id, (filename,) if filename else HUB_FILES)
        if found is not None:
            return found, hub_id
        looked.append(f"the Hugging Face cache ({hf_cache_dir()}, repo {hub_id})")
    url = getattr(cfg, "url", None)
    if url and not hub_id:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if path.is_file():
            return path, url
        looked.append(f"the torch hub cache ({path})")
    if not looked:
        raise GradcamError(f"--weights DEFAULT: timm has no pretrained weights for {name}; use none or a path")
    return None, " or ".join(looked)


def _build(timm: Any, name: str, kwargs: dict[str, Any], **extra: Any) -> nn.Module:
    try:
        with offline():
            model = timm.create_model(name, **extra, **kwargs)
    except GradcamError:
        raise
    except Exception as exc:  # a bad tag, a keyword the architecture does not take, a file timm cannot read
        raise GradcamError(
            f"model 'timm:{name}' with model_kwargs {kwargs!r}: {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise GradcamError(f"model 'timm:{name}': timm returned {type(model).__name__}, not an nn.Module")
    return model


def _img_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a patch-embedding model was built for (timm's ViT, DeiT, EVA, Swin), else None."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return (int(size[0]), int(size[1]))
    return None


def _labels(timm: Any, model: nn.Module) -> list[str]:
    """timm's ImageNet-21k/22k class names (first lemma) for such a head; [] otherwise (1000 classes:
    `loading` uses the same ImageNet names as for torchvision)."""
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset or subset == "imagenet-1k":
            return []
        return [d.split(",")[0].strip() for d in ImageNetInfo(subset).label_descriptions()]
    except Exception:  # an older timm without this metadata: classes by index
        return []


def load_timm(name: str, settings: Settings) -> SourceModel:
    """Build timm model `name` (a registry name, optionally NAME.TAG) with `settings.weights`."""
    timm = import_package("timm", f"model 'timm:{name}'")
    kwargs = _kwargs_with_num_classes(settings)
    spec = settings.weights or "DEFAULT"
    notes: list[str] = []
    extra: dict[str, Any] = {}
    checkpoint: Path | None = None
    if spec.upper() == "DEFAULT":
        from timm.models import get_pretrained_cfg

        try:
            cfg = get_pretrained_cfg(name)
        except Exception:  # an unknown tag
            cfg = None
        if cfg is None:
            tags = ", ".join(timm.list_pretrained(name.partition(".")[0] + ".*")[:6]) or "none"
            raise GradcamError(f"--weights DEFAULT: timm has no pretrained weights '{name}' (it has: {tags})")
        classes = getattr(cfg, "num_classes", None)
        if settings.num_classes is not None and classes and settings.num_classes != classes:
            raise GradcamError(
                f"config key 'num_classes': timm's {name} weights have {classes} classes, not "
                f"{settings.num_classes}; for a fine-tuned model pass its checkpoint with --weights PATH"
            )
        path, where = _pretrained_file(name, cfg)
        if path is None:
            raise GradcamError(
                f"--weights DEFAULT: timm's pretrained weights for {name} are not in {where}; nothing is "
                "downloaded here: fetch them once where there is network, or pass --weights none or a PATH"
            )
        extra = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
        notes.append(f"--weights DEFAULT: timm's weights {where} read from {path}")
        weights = f"DEFAULT ({where})"
    elif spec.lower() == "none":
        weights = "none"
    else:
        weights, checkpoint = spec, Path(spec)
        if not checkpoint.is_file():  # before building what may be a large model
            raise GradcamError(f"--weights {spec}: no such file (and not 'none' or 'DEFAULT')")
    if settings.input_size is not None and "img_size" not in kwargs:
        model = _build(timm, name, kwargs, **extra)
        built = _img_size(model)
        if built is not None and built != tuple(settings.input_size):
            kwargs["img_size"] = tuple(settings.input_size)  # a token model is built for its input size
            model = _build(timm, name, kwargs, **extra)
    else:
        model = _build(timm, name, kwargs, **extra)
    if checkpoint is not None:
        notes += load_checkpoint(model, checkpoint)
    preprocessing = _preprocessing(model)
    mode = preprocessing.get("crop_mode")
    if settings.preprocess == "crop" and mode not in (None, "center"):
        notes.append(
            f"timm's {name} was evaluated with crop_mode '{mode}'; --preprocess crop resizes the short side and "
            "crops the center"
        )
    return SourceModel(model, weights, _labels(timm, model), preprocessing, notes)


def _preprocessing(model: nn.Module) -> Mapping[str, Any]:
    """The model's pretrained_cfg, with the input size it was built for when that is fixed and differs."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    built = _img_size(model)
    if built is not None:
        cfg["input_size"] = (3, *built)
    return cfg


def timm_default_layer(model: nn.Module, input_size: tuple[int, int]) -> tuple[str, str] | None:
    """(layer, why) for a timm model, or None to auto-detect.

    Token transformers (ViT, DeiT, EVA, BEiT: `blocks[-1].norm1`) read out the class token after the last
    block, so that block's output patches get no gradient; its `norm1` is the last place where patch tokens
    feed the class token (through attention). Every other family gives its final feature map to global
    pooling: the output of `forward_features`, traced once on a dummy input. Several modules return that very
    tensor (a stage, its last block, an in-place activation, an Identity); the one timm lists as a stage in
    `feature_info` names it (`layer4`, `stages.3`), else the outermost (`bn2`, EfficientNet's post-activation
    head convolution). A final LayerNorm (Swin's `norm`) only rescales each position: the stage before it.
    """
    blocks = getattr(model, "blocks", None)
    if (
        isinstance(blocks, (nn.Sequential, nn.ModuleList))
        and len(blocks) > 0
        and hasattr(blocks[-1], "norm1")
        and isinstance(getattr(model, "num_prefix_tokens", None), int)
    ):
        return f"blocks.{len(blocks) - 1}.norm1", "timm ViT family default: the last block's norm1"
    return _feature_map_layer(model, input_size)


def _feature_map_layer(model: nn.Module, input_size: tuple[int, int]) -> tuple[str, str] | None:
    forward_features = getattr(model, "forward_features", None)
    if not callable(forward_features):
        return None
    modules = {n: m for n, m in model.named_modules() if n}
    outputs: dict[str, object] = {}
    inputs: dict[str, object] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[object, ...], output: object) -> None:
            outputs[name] = output
            inputs[name] = args[0] if args else None

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    try:
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        x = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            features = forward_features(x)
    except Exception:
        return None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    stages = {f.get("module") for f in getattr(model, "feature_info", None) or [] if isinstance(f, Mapping)}

    def producer(target: object) -> str | None:
        names = [n for n in modules if outputs.get(n) is target]
        return next((n for n in names if n in stages), names[0] if names else None)

    name = producer(features)
    why = "timm: the final feature map, which global pooling averages"
    if name is not None and isinstance(modules[name], nn.LayerNorm):
        name = producer(inputs[name])
        why = "timm: the last stage's output, before the final per-position LayerNorm"
    output = outputs.get(name) if name is not None else None
    if name is None or not isinstance(output, Tensor):
        return None
    layout = infer_layout(tuple(output.shape), input_size, token_hint(model))
    return (name, why) if layout is not None and layout.area > 1 else None
