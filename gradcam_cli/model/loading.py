"""Models: a name or `module:callable` -> (model, preprocessing, labels), ready for explaining.

Modelled on torchvision's registry: one place turns a name into everything a run needs. torchvision names
get their weights enum, its transforms (input size, mean, std) and its class names; factories get the same
from the config (`input_size`, `mean`, `std`, `labels`), else from the model's own `pretrained_cfg` (timm),
else ImageNet defaults. Checkpoints: `checkpoint`; class names: `labels`.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcam_cli.config import Settings
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.checkpoint import load_checkpoint, num_outputs
from gradcam_cli.model.labels import imagenet_labels, read_labels
from gradcam_cli.model.sources import load_external

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes a model input.

    `full` resizes the whole image to `size` (H, W) so the heatmap covers every original pixel; `crop`
    resizes the short side to `resize_size` and center-crops `size`, as the weights' own transforms do.
    `interpolation` is the resize filter (`INTERPOLATIONS`): bilinear unless a model source (timm's
    `pretrained_cfg`, a Hugging Face image processor) asks for bicubic, as its weights were trained with.
    """

    size: tuple[int, int]
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str = "full"
    interpolation: str = "bilinear"


INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic")


@dataclass
class LoadedModel:
    """A model in eval mode plus what is needed to feed it and to name its outputs."""

    model: nn.Module
    name: str
    weights: str
    spec: InputSpec
    labels: list[str]
    notes: list[str] = field(default_factory=list)  # what loading adapted (checkpoint keys, ...): tell the user


def classification_model_names() -> list[str]:
    """torchvision's classification models (the top-level `torchvision.models` namespace)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _import_factory(spec: str) -> Any:
    """`module:callable` or `path/to/file.py:callable` -> the callable.

    Modules are looked up from the current folder first, then sys.path, as `python -m`, uvicorn and gunicorn
    do, so a `mynet.py` next to where the command runs works without PYTHONPATH. A file path is imported
    from that file, with its folder on sys.path for its own sibling imports. Anything that fails while
    importing is the user's code or environment: a usage error naming the module or file and why.
    """
    module_name, _, attr = spec.rpartition(":")  # rpartition: a Windows path has a drive colon
    if not module_name or not attr:
        raise GradcamError(f"model '{spec}': expected 'package.module:callable' or 'path/to/file.py:callable'")
    is_file = module_name.endswith(".py") or any(sep in module_name for sep in "/\\")
    module = _import_file(spec, Path(module_name)) if is_file else _import_module(spec, module_name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise GradcamError(f"model '{spec}': {module_name} has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise GradcamError(f"model '{spec}': '{attr}' is not callable")
    return obj


def _import_failed(spec: str, what: str, exc: BaseException) -> GradcamError:
    where = ""
    tb = exc.__traceback__
    while tb is not None:  # the innermost frame in the user's code says where it broke
        if "importlib" not in tb.tb_frame.f_code.co_filename:
            where = f" ({tb.tb_frame.f_code.co_filename}, line {tb.tb_lineno})"
        tb = tb.tb_next
    message = _first_line(exc)
    if isinstance(exc, SyntaxError):
        message, where = str(exc.msg), f" ({exc.filename}, line {exc.lineno})" if exc.filename else ""
    return GradcamError(f"model '{spec}': importing {what} failed: {type(exc).__name__}: {message}{where}")


def _import_module(spec: str, module_name: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise GradcamError(
                f"model '{spec}': cannot import module '{module_name}': no {exc.name.replace('.', '/')}.py or package "
                f"'{exc.name}' in the current folder ({cwd}) or on sys.path"
            ) from None
        raise _import_failed(spec, f"module '{module_name}'", exc) from None
    except Exception as exc:  # the module's own code failed: a syntax error, an import it needs, ...
        raise _import_failed(spec, f"module '{module_name}'", exc) from None


def _import_file(spec: str, path: Path) -> Any:
    import importlib.util

    if not path.is_file():
        raise GradcamError(f"model '{spec}': no such file: {path}")
    resolved = path.resolve()
    # one module name per file, so the same file imported twice (a second run in one process) is the same module
    name = "gradcam_user_" + hashlib.sha1(str(resolved).encode("utf-8", "surrogateescape")).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise GradcamError(f"model '{spec}': {path} is not an importable Python file")
    module = importlib.util.module_from_spec(module_spec)
    folder = str(resolved.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise _import_failed(spec, str(path), exc) from None
    return module


# builders whose architecture fixes the input size, and the keyword that sets it (random weights only)
SIZE_KWARGS = {"vit_": "image_size", "maxvit_": "input_size"}
# keyword defaults that select what torchvision does anyway, minus its FutureWarning about it
QUIET_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"init_weights": True},
    "inception_v3": {"init_weights": True},
}


def _size_kwarg(name: str) -> str | None:
    return next((kw for prefix, kw in SIZE_KWARGS.items() if name.startswith(prefix)), None)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _weights_member(name: str, spec: str) -> Any:
    """The weights enum member `spec` names, or None for `none` and checkpoint paths."""
    import torchvision

    try:
        enum_cls = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        enum_cls = None
    if spec.lower() == "none" or Path(spec).exists():
        return None
    if enum_cls is None:
        raise GradcamError(f"weights {spec}: {name} has no pretrained weights in torchvision; use none or a path")
    short = spec.split(".")[-1]
    if short.upper() == "DEFAULT":
        return enum_cls.DEFAULT
    if short in enum_cls.__members__:
        return enum_cls[short]
    if any(c in spec for c in "/\\") or spec.endswith((".pt", ".pth", ".ckpt", ".bin")):
        raise GradcamError(f"weights {spec}: no such file")
    choices = ", ".join(enum_cls.__members__)
    raise GradcamError(f"weights {spec}: not a path, 'none', 'DEFAULT' or one of {name}'s weights: {choices}")


def _kwargs_with_num_classes(settings: Settings) -> dict[str, Any]:
    """model_kwargs with the `num_classes` key folded in (both builders and factories take it as a keyword)."""
    kwargs = dict(settings.model_kwargs)
    if settings.num_classes is not None:
        if kwargs.get("num_classes", settings.num_classes) != settings.num_classes:
            raise GradcamError(
                f"config key 'num_classes' is {settings.num_classes} but model_kwargs sets num_classes "
                f"{kwargs['num_classes']}; keep one"
            )
        kwargs["num_classes"] = settings.num_classes
    return kwargs


def _torchvision_kwargs(name: str, settings: Settings, member: Any) -> dict[str, Any]:
    """model_kwargs plus what num_classes and input_size imply for this builder, checked against the weights."""
    kwargs = _kwargs_with_num_classes(settings)
    if (
        settings.num_classes is not None
        and member is not None
        and settings.num_classes != len(member.meta["categories"])
    ):
        raise GradcamError(
            f"config key 'num_classes': {type(member).__name__}.{member.name} has "
            f"{len(member.meta['categories'])} classes, not {settings.num_classes}; for a fine-tuned model "
            "pass its checkpoint with --weights PATH"
        )
    size_kw = _size_kwarg(name)
    if size_kw and settings.input_size is not None and size_kw not in kwargs:
        height, width = settings.input_size
        if member is not None:
            fixed = tuple(member.meta.get("min_size", ()))
            if fixed and fixed != (height, width):
                raise GradcamError(
                    f"config key 'input_size': {name} with weights {member.name} takes exactly "
                    f"{fixed[0]}x{fixed[1]} inputs (its size is part of the architecture); drop input_size or use "
                    "--weights none"
                )
        elif size_kw == "image_size":
            if height != width:
                raise GradcamError(f"config key 'input_size': {name} takes square inputs, got {height}x{width}")
            kwargs[size_kw] = height
        else:
            kwargs[size_kw] = (height, width)
    if member is None:
        for key, value in QUIET_DEFAULTS.get(name, {}).items():
            kwargs.setdefault(key, value)
    return kwargs


def _torchvision_model(name: str, settings: Settings) -> tuple[nn.Module, Any, str, list[str]]:
    """Build a torchvision model; returns (model, weights enum member or None, description of weights, notes)."""
    import torchvision

    spec = settings.weights or "DEFAULT"
    member = _weights_member(name, spec)
    kwargs = _torchvision_kwargs(name, settings, member)
    if member is None:
        try:
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        except Exception as exc:
            raise GradcamError(f"model '{name}' with model_kwargs {kwargs!r}: {type(exc).__name__}: {exc}") from None
        if spec.lower() != "none":
            return model, None, str(spec), load_checkpoint(model, Path(spec))
        return model, None, "none", _wake_zero_heads(model, name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(member.url)
    try:
        # torch.hub announces a download on stdout; stdout is for what scripts parse, so it goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            model = torchvision.models.get_model(name, weights=member, **kwargs)
    except (TypeError, ValueError) as exc:
        raise GradcamError(f"model '{name}' with weights {member.name}: {_first_line(exc)}") from None
    except Exception as exc:
        raise GradcamError(
            f"weights {type(member).__name__}.{member.name} are not in the torch hub cache ({cached}) and could not "
            f"be downloaded ({_first_line(exc)[:160]}); download that file there or pass --weights PATH"
        ) from None
    return model, member, f"{type(member).__name__}.{member.name}", []


def _wake_zero_heads(model: nn.Module, name: str) -> list[str]:
    """Give all-zero Linear layers (torchvision's ViT heads) a small seeded random init.

    A zero head makes every class score 0 whatever the image, so every gradient and every map would be empty:
    random weights are for trying the tool out, and an all-zero explanation explains nothing.
    """
    woken = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not module.weight.detach().any():
            with torch.no_grad():
                module.weight.normal_(0.0, 0.01)  # from the RNG `seed` set before construction: reproducible
            woken.append(module_name)
    if not woken:
        return []
    return [
        f"--weights none: torchvision initialises {', '.join(woken)} of {name} to zero, which would make every "
        "class score 0 and every map empty; gave it a random N(0, 0.01) init instead (seeded like the rest)"
    ]


def _fixed_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size an architecture was built for, when it accepts no other (torchvision's ViT; timm's
    patch embedding with `strict_img_size`, whose `img_size` model_kwargs may set apart from pretrained_cfg)."""
    size = getattr(model, "image_size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        return (size, size)
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if getattr(embed, "strict_img_size", False) and isinstance(size, tuple) and len(size) == 2:
        return (int(size[0]), int(size[1]))
    return None


def _model_cfg(model: nn.Module) -> Mapping[str, Any]:
    """timm-style preprocessing metadata (`pretrained_cfg` or `default_cfg`), or {}."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, Mapping):
            return cfg
    return {}


def _input_spec(
    settings: Settings, member: Any, default_enum: Any, model: nn.Module, own_cfg: Mapping[str, Any] | None = None
) -> InputSpec:
    """The preprocessing: the config's keys over the weights' transforms, a model source's own cfg
    (`own_cfg`, timm-style keys: input_size, crop_pct, mean, std, interpolation), or a factory model's
    `pretrained_cfg`. Only a model source's cfg sets the interpolation: factories keep bilinear as before."""
    size = settings.input_size
    resize = None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    source = member if member is not None else default_enum
    fixed = _fixed_size(model)
    cfg = own_cfg if own_cfg is not None else (_model_cfg(model) if source is None else {})
    interpolation = own_cfg.get("interpolation") if own_cfg is not None else None
    if source is not None:
        tf = source.transforms()
        crop = tf.crop_size[0] if hasattr(tf, "crop_size") else 224
        resize = tf.resize_size[0] if hasattr(tf, "resize_size") else None
        mean = tuple(getattr(tf, "mean", mean))  # type: ignore[assignment]
        std = tuple(getattr(tf, "std", std))  # type: ignore[assignment]
        if member is None and fixed is not None and fixed[0] != crop:
            crop, resize = fixed[0], None  # random weights: the architecture's size, not the default weights'
        size = size or (crop, crop)
    elif cfg:
        shape = cfg.get("input_size")
        if isinstance(shape, (tuple, list)) and len(shape) == 3 and all(isinstance(v, int) for v in shape):
            size = size or fixed or (int(shape[1]), int(shape[2]))
            crop_pct = cfg.get("crop_pct")
            if isinstance(crop_pct, (int, float)) and 0 < crop_pct <= 1 and settings.input_size is None:
                resize = int(round(min(size) / crop_pct))
        for key in ("mean", "std"):
            value = cfg.get(key)
            if isinstance(value, (tuple, list)) and len(value) == 3:
                if key == "mean":
                    mean = tuple(float(v) for v in value)  # type: ignore[assignment]
                else:
                    std = tuple(float(v) for v in value)  # type: ignore[assignment]
    size = size or fixed or (224, 224)
    if fixed is not None and size != fixed:
        raise GradcamError(
            f"config key 'input_size': the model takes exactly {fixed[0]}x{fixed[1]} inputs, got {size[0]}x{size[1]}"
        )
    if resize is None or settings.input_size is not None:
        resize = int(round(min(size) / 0.875))
    return InputSpec(
        size=size,
        resize_size=resize,
        mean=settings.mean or mean,  # type: ignore[arg-type]
        std=settings.std or std,  # type: ignore[arg-type]
        mode=settings.preprocess,
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
    )


def _not_a_classifier(name: str) -> str | None:
    """Why a torchvision name that is not in the classification zoo cannot be explained, if it is one."""
    import torchvision

    if name.startswith("quantized_") or name in torchvision.models.list_models(module=torchvision.models.quantization):
        base = name.removeprefix("quantized_")
        return (
            f"model '{name}' is a quantized (int8) model: its integer kernels have no gradients, so Grad-CAM "
            f"cannot run on it; explain the float model '{base}' instead (same architecture)"
        )
    for kind in ("detection", "segmentation", "video", "optical_flow"):
        module = getattr(torchvision.models, kind, None)
        if module is not None and name in torchvision.models.list_models(module=module):
            return (
                f"model '{name}' is a torchvision {kind.replace('_', ' ')} model; gradcam explains image "
                "classifiers (`gradcam models` lists them; any other model works as package.module:callable)"
            )
    return None


def _factory_model(name: str, settings: Settings) -> tuple[nn.Module, str, list[str]]:
    """Call a `module:callable` factory with model_kwargs (+ num_classes) and load its checkpoint, if any."""
    factory = _import_factory(name)
    kwargs = _kwargs_with_num_classes(settings)
    try:
        model = factory(**kwargs)
    except GradcamError:
        raise
    except Exception as exc:  # whatever a user's factory raises for the kwargs it was given
        raise GradcamError(
            f"model '{name}': calling the factory with model_kwargs {kwargs!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise GradcamError(f"model '{name}': the factory returned {type(model).__name__}, not a torch nn.Module")
    weights = settings.weights or "none"
    notes = load_checkpoint(model, Path(weights)) if weights.lower() != "none" else []
    return model, weights, notes


def load_model(settings: Settings) -> LoadedModel:
    """Turn settings.model/weights into an eval-mode model with its input spec and class names."""
    name = settings.model
    if not name:
        raise GradcamError(
            "no model given: pass --model NAME (a torchvision name, timm:NAME, hf:PATH, module:callable or "
            "file.py:callable)"
        )
    default_enum = member = own_cfg = None
    # random init (`--weights none`, layers a checkpoint does not cover) is the same in every run
    torch.manual_seed(settings.seed)
    external = load_external(name, settings)  # timm:NAME, hf:PATH_OR_REPO_ID (model/sources.py)
    if external is not None:
        model, weights, notes, labels = external.model, external.weights, external.notes, external.labels
        own_cfg = external.cfg
    elif ":" in name:
        model, weights, notes = _factory_model(name, settings)
        labels = list(getattr(model, "class_names", []) or [])
    else:
        names = classification_model_names()
        if name not in names:
            reason = _not_a_classifier(name)
            if reason:
                raise GradcamError(reason)
            near = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
            hint = f"; did you mean {', '.join(near)}?" if near else "; `gradcam models` lists them"
            raise GradcamError(f"unknown model '{name}'{hint}")
        import torchvision

        try:
            default_enum = torchvision.models.get_model_weights(name).DEFAULT
        except (ValueError, KeyError, AttributeError):
            default_enum = None
        model, member, weights, notes = _torchvision_model(name, settings)
        labels = list(member.meta.get("categories") or []) if member is not None else []
    classes = settings.num_classes or num_outputs(model)
    if settings.labels:
        labels = read_labels(settings.labels)
        if classes is not None and len(labels) != classes:
            message = (
                f"config key 'labels': {settings.labels} has {len(labels)} names but the model has {classes} classes"
            )
            if settings.num_classes is not None:
                raise GradcamError(message)
            notes.append(message + "; classes without a name are shown by index")
    elif not labels and classes == 1000:
        labels = imagenet_labels()
    model.eval()
    spec = _input_spec(settings, member, default_enum, model, own_cfg)
    return LoadedModel(model=model, name=name, weights=weights, spec=spec, labels=labels, notes=notes)
