"""Models: a name or `module:callable` -> (model, preprocessing, labels), ready for explaining.

Modelled on torchvision's registry: one place turns a name into everything a run needs. torchvision names
get their weights enum, its transforms (input size, mean, std) and its class names; factories get the same
from the config (`input_size`, `mean`, `std`, `labels`) with ImageNet defaults.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcam_cli.config import Settings
from gradcam_cli.errors import GradcamError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes a model input.

    `full` resizes the whole image to `size` (H, W) so the heatmap covers every original pixel; `crop`
    resizes the short side to `resize_size` and center-crops `size`, as the weights' own transforms do.
    """

    size: tuple[int, int]
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "full"


@dataclass
class LoadedModel:
    """A model in eval mode plus what is needed to feed it and to name its outputs."""

    model: nn.Module
    name: str
    weights: str
    spec: InputSpec
    labels: list[str]


def classification_model_names() -> list[str]:
    """torchvision's classification models (the top-level `torchvision.models` namespace)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names from torchvision's weights metadata (shipped in the wheel, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def read_labels(path: str | Path) -> list[str]:
    """One name per line, or a JSON list (or {"0": name, ...} mapping)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GradcamError(f"config key 'labels': cannot read {p}: {exc}") from None
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GradcamError(f"config key 'labels': {p} is not valid JSON ({exc.msg})") from None
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return data
        if isinstance(data, dict):
            try:
                return [str(data[k]) for k in sorted(data, key=lambda k: int(k))]
            except ValueError:
                pass
        raise GradcamError(f"config key 'labels': {p} must hold a JSON list of names or an index->name mapping")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _import_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise GradcamError(f"model '{spec}': expected 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise GradcamError(f"model '{spec}': cannot import module '{module_name}': {exc}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise GradcamError(f"model '{spec}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise GradcamError(f"model '{spec}': '{attr}' is not callable")
    return obj


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a state dict saved with torch.save; only tensors and plain containers are unpickled."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GradcamError(
            f"--weights {path}: not a loadable state dict (loaded with weights_only=True): {first[:200]}"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GradcamError(f"--weights {path}: expected a state dict (parameter name -> tensor)")
    state = dict(obj)
    expected = set(model.state_dict())
    for prefix in ("module.", "model."):
        if state and not (set(state) & expected) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise GradcamError(f"--weights {path}: keys do not match the model: {'; '.join(parts)}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        line = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise GradcamError(f"--weights {path}: {line[:240]}") from None


def _torchvision_model(name: str, weights: str, kwargs: Mapping[str, Any]) -> tuple[nn.Module, Any, str]:
    """Build a torchvision model; returns (model, weights enum member or None, description of weights)."""
    import torchvision

    try:
        enum_cls = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        enum_cls = None
    spec = weights
    if spec.lower() == "none" or Path(spec).exists():
        member = None
    else:
        if enum_cls is None:
            raise GradcamError(f"--weights {spec}: {name} has no pretrained weights in torchvision; use none or a path")
        short = spec.split(".")[-1]
        if short.upper() == "DEFAULT":
            member = enum_cls.DEFAULT
        elif short in enum_cls.__members__:
            member = enum_cls[short]
        else:
            raise GradcamError(
                f"--weights {spec}: not a path, 'none', 'DEFAULT' or one of {name}'s weights: "
                + ", ".join(enum_cls.__members__)
            )
    kwargs = dict(kwargs)
    if member is None:
        try:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        except Exception as exc:
            raise GradcamError(f"model '{name}' with model_kwargs {kwargs!r}: {type(exc).__name__}: {exc}") from None
        if spec.lower() != "none":
            _load_checkpoint(model, Path(spec))
            return model, None, str(spec)
        return model, None, "none"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(member.url)
    try:
        model = torchvision.models.get_model(name, weights=member, **kwargs)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise GradcamError(
            f"weights {type(member).__name__}.{member.name} are not in the torch hub cache ({cached}) and could not "
            f"be downloaded ({reason}); download that file there or pass --weights PATH"
        ) from None
    return model, member, f"{type(member).__name__}.{member.name}"


def _input_spec(settings: Settings, member: Any, default_enum: Any) -> InputSpec:
    size = settings.input_size
    resize = None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    source = member if member is not None else default_enum
    if source is not None:
        tf = source.transforms()
        crop = tf.crop_size[0] if hasattr(tf, "crop_size") else 224
        resize = tf.resize_size[0] if hasattr(tf, "resize_size") else None
        mean = tuple(getattr(tf, "mean", mean))  # type: ignore[assignment]
        std = tuple(getattr(tf, "std", std))  # type: ignore[assignment]
        size = size or (crop, crop)
    size = size or (224, 224)
    if resize is None or settings.input_size is not None:
        resize = int(round(min(size) / 0.875))
    return InputSpec(
        size=size,
        resize_size=resize,
        mean=settings.mean or mean,  # type: ignore[arg-type]
        std=settings.std or std,  # type: ignore[arg-type]
        mode=settings.preprocess,
    )


def _num_outputs(model: nn.Module) -> int | None:
    """Classes of the last Linear layer, when there is one (used to default the labels)."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module.out_features
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
            last = module.out_channels if last is None else last
    return last


def load_model(settings: Settings) -> LoadedModel:
    """Turn settings.model/weights into an eval-mode model with its input spec and class names."""
    name = settings.model
    if not name:
        raise GradcamError("no model given: pass --model NAME (a torchvision model or package.module:callable)")
    default_enum = None
    # random init (`--weights none`, layers a checkpoint does not cover) is the same in every run
    torch.manual_seed(settings.seed)
    if ":" in name:
        factory = _import_factory(name)
        try:
            model = factory(**dict(settings.model_kwargs))
        except GradcamError:
            raise
        except Exception as exc:  # whatever a user's factory raises for the kwargs it was given
            raise GradcamError(
                f"model '{name}': calling the factory with model_kwargs {dict(settings.model_kwargs)!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(model, nn.Module):
            raise GradcamError(f"model '{name}': the factory returned {type(model).__name__}, not a torch nn.Module")
        weights = settings.weights or "none"
        member = None
        if weights.lower() != "none":
            _load_checkpoint(model, Path(weights))
        labels = list(getattr(model, "class_names", []) or [])
    else:
        names = classification_model_names()
        if name not in names:
            near = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
            hint = f"; did you mean {', '.join(near)}?" if near else "; `gradcam models` lists them"
            raise GradcamError(f"unknown model '{name}'{hint}")
        import torchvision

        try:
            default_enum = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, KeyError, AttributeError):
            default_enum = None
        model, member, weights = _torchvision_model(name, settings.weights or "DEFAULT", settings.model_kwargs)
        labels = list(member.meta.get("categories") or []) if member is not None else []
    if settings.labels:
        labels = read_labels(settings.labels)
    elif not labels and _num_outputs(model) == 1000:
        labels = imagenet_labels()
    model.eval()
    return LoadedModel(
        model=model, name=name, weights=weights, spec=_input_spec(settings, member, default_enum), labels=labels
    )


def label_of(labels: Sequence[str], index: int) -> str:
    """The class name, or the index as text when the model has more classes than names."""
    return labels[index] if 0 <= index < len(labels) else str(index)
