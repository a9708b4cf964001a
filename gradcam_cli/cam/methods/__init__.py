"""The CAM method registry: every `--method` name, what it needs from the engine, and where it is written.

This module imports no torch, so `--help` and config validation read the names from it at once. An
implementation is imported only when an engine is built for it (`build`): either a function
`fn(activations, gradients, eigen_smooth=False) -> maps` of a gradient method, or a `CamMethod` subclass for a
method that needs more than one backward (Score-CAM's masked forwards, Ablation-CAM's head forwards, CAM's
final Linear layer, guided backprop's input gradients). The engine owns hooks, the forward and the batched
backward; a method only turns what they captured into maps. Users can add their own with `register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gradcam_cli.errors import GradcamError


@dataclass(frozen=True)
class MethodSpec:
    """What a method needs from the engine, and one line on when to use it (`--help`, docs).

    layer_grads: one backward to the target layers (dy/dA); input_grads: a ReLU-guided backward to the input;
    uses_layer: explains target layers (guided-backprop explains the input itself); class_specific: depends
    on the target class (so --counterfactual means something); eigen_smooth: is a channel-weighted sum
    (so --eigen-smooth applies); extra_passes: runs model passes of its own (the start-up probe runs their first
    chunk only).
    """

    name: str
    impl: str  # "module:attribute" under gradcam_cli.cam.methods
    when: str
    layer_grads: bool = False
    input_grads: bool = False
    uses_layer: bool = True
    class_specific: bool = True
    eigen_smooth: bool = True
    extra_passes: bool = False


_SPECS: tuple[MethodSpec, ...] = (
    MethodSpec("gradcam", "gradient:gradcam", "the default: fast, robust, coarse", layer_grads=True),
    MethodSpec(
        "gradcampp",
        "gradient:gradcampp",
        "several instances of the class in one image; weights positive gradients per position",
        layer_grads=True,
    ),
    MethodSpec(
        "xgradcam",
        "gradient:xgradcam",
        "like Grad-CAM with activation-weighted gradients (satisfies sensitivity/conservation axioms)",
        layer_grads=True,
    ),
    MethodSpec(
        "hirescam",
        "gradient:hirescam",
        "faithful to what the model computes at each position (no gradient averaging)",
        layer_grads=True,
    ),
    MethodSpec(
        "layercam",
        "gradient:layercam",
        "earlier, higher-resolution layers, where Grad-CAM gets noisy",
        layer_grads=True,
    ),
    MethodSpec(
        "eigencam",
        "activation:EigenCam",
        "what the layer responds to at all, without gradients; class-agnostic (same map for every class)",
        class_specific=False,
        eigen_smooth=False,
    ),
    MethodSpec(
        "eigengradcam",
        "gradient:eigengradcam",
        "a cleaner, class-specific principal-component map of gradients x activations",
        layer_grads=True,
        eigen_smooth=False,
    ),
    MethodSpec(
        "scorecam",
        "score:ScoreCam",
        "no gradients at all (saturated or noisy gradients); one forward per channel: slow",
        extra_passes=True,
    ),
    MethodSpec(
        "ablationcam",
        "ablation:AblationCam",
        "gradient-free, measures the score drop when each channel is removed; head-only forwards",
        extra_passes=True,
    ),
    MethodSpec(
        "cam",
        "linear:Cam",
        "the original CAM for models ending in global average pooling + Linear; no backward pass",
    ),
    MethodSpec(
        "guided-backprop",
        "guided:GuidedBackprop",
        "pixel-level edges and textures the score is sensitive to; not class-discriminative",
        input_grads=True,
        uses_layer=False,
        eigen_smooth=False,
    ),
    MethodSpec(
        "guided-gradcam",
        "guided:GuidedGradCam",
        "Grad-CAM's localisation with guided backprop's pixel detail (guided/ output)",
        layer_grads=True,
        input_grads=True,
    ),
)
BUILT_IN_METHODS: tuple[str, ...] = tuple(spec.name for spec in _SPECS)
_REGISTRY: dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}
_CUSTOM: dict[str, Any] = {}


def method_names() -> tuple[str, ...]:
    """Every registered method, in the order `--help` and the docs list them."""
    return tuple(_REGISTRY)


def get_spec(name: str) -> MethodSpec:
    """The spec of method `name`; an unknown name is a usage error listing the known ones."""
    if name not in _REGISTRY:
        raise GradcamError(f"--method {name}: expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def register(spec: MethodSpec, impl: Callable[..., Any] | type | None = None) -> None:
    """Add a method: `impl` a gradient function fn(A, G, eigen_smooth=False) or a CamMethod subclass, or None
    when `spec.impl` names a module:attribute to import."""
    _REGISTRY[spec.name] = spec
    if impl is not None:
        _CUSTOM[spec.name] = impl


def implementation(name: str) -> Any:
    """The function or class that computes method `name` (imported on first use: it needs torch)."""
    if name in _CUSTOM:
        return _CUSTOM[name]
    module, _, attribute = get_spec(name).impl.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), attribute)


def check_options(
    spec: MethodSpec, counterfactual: bool, eigen_smooth: bool, fuse: str | None, n_layers: int, chunk_size: int
) -> None:
    """One-line errors for option combinations that have no meaning with `spec` (before anything runs)."""
    if counterfactual and not spec.class_specific:
        raise GradcamError(
            f"--counterfactual: {spec.name} is class-agnostic (no class score to negate); use eigengradcam"
        )
    if eigen_smooth and not spec.eigen_smooth:
        raise GradcamError(f"--eigen-smooth: has no effect with {spec.name} (it is not a channel-weighted sum)")
    if fuse is not None:
        if not spec.uses_layer:
            raise GradcamError(f"--fuse {fuse}: {spec.name} does not use target layers")
        if fuse not in ("mean", "max"):
            raise GradcamError(f"--fuse: expected none, mean or max, got {fuse!r}")
        if n_layers < 2:
            raise GradcamError(f"--fuse {fuse}: needs two or more --layer values (got {n_layers})")
    if spec.uses_layer and n_layers < 1:
        raise GradcamError(f"method '{spec.name}' needs at least one target layer")
    if chunk_size < 1:
        raise GradcamError(f"--chunk-size: expected a positive integer, got {chunk_size}")
