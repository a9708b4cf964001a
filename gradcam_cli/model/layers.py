"""Target layers: dotted paths with indexes, resolution to modules, and auto-detection.

Users write `layer4`, `layer4.-1`, `layer4[-1]` or `features.denseblock4`; all resolve through the module
tree the way Python indexing would, and the canonical `named_modules()` name is what we report (so the CSV
says `layer4.1`, not whichever spelling the user typed). Auto-detection runs one dummy forward and picks the
last module, in execution order, whose output still has positions (a (B, C, h, w) or (B, h, w, C) map or a
token grid with h*w > 1; see `layouts`) and whose positions the class score depends on: that is the last
place before global pooling (or the class token's read-out) where "where" still exists.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradcam_cli.errors import GradcamError
from gradcam_cli.model.forward import logits_of
from gradcam_cli.model.layouts import Layout, infer_layout, output_shape, token_hint

_BRACKET = re.compile(r"\[(-?\d+)\]")
# `MODULE:input` names the map a module receives rather than the one it returns: what global pooling
# averages, when the activation before it is functional or a shared module
INPUT_SUFFIX = ":input"


def parse_layer_path(spec: str) -> list[str]:
    """'layer4[-1].conv2' -> ['layer4', '-1', 'conv2']."""
    text = _BRACKET.sub(r".\1", spec.strip())
    parts = [p for p in text.split(".")]
    if not text or any(p == "" for p in parts):
        raise GradcamError(f"layer '{spec}': expected a dotted module path such as 'layer4' or 'layer4.-1'")
    return parts


def _canonical_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    return names


def resolve_layer(model: nn.Module, spec: str) -> tuple[str, nn.Module]:
    """Find the module `spec` names; return its canonical name and the module, or fail listing near names."""
    module: nn.Module = model
    walked: list[str] = []
    for part in parse_layer_path(spec):
        children = dict(module.named_children())
        child = children.get(part)
        if child is None and re.fullmatch(r"-?\d+", part) and children:
            index = int(part)
            items = list(children.values())
            if -len(items) <= index < len(items):
                child = items[index]
        if child is None:
            raise GradcamError(_unknown_layer_message(model, spec, walked, list(children)))
        module = child
        walked.append(part)
    if module is model:
        raise GradcamError(f"layer '{spec}': names the whole model; pick a submodule")
    return _canonical_names(model)[id(module)], module


def resolve_target(model: nn.Module, spec: str) -> tuple[str, nn.Module]:
    """A `--layer` value (a module path, or `MODULE:input`) -> (its canonical name, the module to hook)."""
    if spec.endswith(INPUT_SUFFIX):
        name, module = resolve_layer(model, spec[: -len(INPUT_SUFFIX)])
        return name + INPUT_SUFFIX, module
    return resolve_layer(model, spec)


def _unknown_layer_message(model: nn.Module, spec: str, walked: list[str], children: list[str]) -> str:
    all_names = [n for n, _ in model.named_modules() if n]
    near = difflib.get_close_matches(spec, all_names, n=5, cutoff=0.5)
    if not near:
        prefix = ".".join(walked)
        near = [f"{prefix}.{c}" if prefix else c for c in children[:8]]
    where = f" under '{'.'.join(walked)}'" if walked else ""
    hint = f"; nearest valid names: {', '.join(near)}" if near else ""
    return f"unknown layer '{spec}'{where}{hint} (run `gradcam layers MODEL` to see them all)"


@dataclass(frozen=True)
class LayerInfo:
    """One module as seen by a dummy forward: output shape (None if not one tensor), layout, how often it ran."""

    name: str
    type_name: str
    shape: tuple[int, ...] | None
    calls: int
    order: int  # position of its last completed call in execution order
    layout: Layout | None = None

    @property
    def spatial(self) -> bool:
        """A candidate target: a map or token grid that still has more than one position."""
        return self.layout is not None and self.layout.area > 1


def _trace(
    model: nn.Module, input_size: tuple[int, int], device: torch.device | str
) -> tuple[list[LayerInfo], dict[str, Tensor], Tensor]:
    """The one dummy forward behind `inspect_layers`: every module's output shape and layout, in module-tree
    order, from a seeded random (1, 3, H, W) input.

    The forward records a graph and also returns every spatial output (by module name, the last call's) and
    the top class's score, so liveness needs no second forward. Kept outputs are cloned on their way on, so
    in-place ops further on cannot rewrite them.
    """
    records: dict[str, list] = {}
    kept: dict[str, Tensor] = {}
    counter = [0]
    handles = []
    hint = token_hint(model)

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> object:
            counter[0] += 1
            shape = output_shape(output)
            rec = records.setdefault(name, [None, 0, 0])
            rec[0], rec[1], rec[2] = shape, rec[1] + 1, counter[0]
            if isinstance(output, Tensor) and output.requires_grad:
                layout = infer_layout(shape, input_size, hint) if shape is not None else None
                if layout is not None and layout.area > 1:
                    kept[name] = output
                    return output.clone()
            return None

        return hook

    named = [(n, m) for n, m in model.named_modules() if n]
    was_training = model.training
    try:
        for name, module in named:
            handles.append(module.register_forward_hook(make_hook(name)))
        model.eval()
        x = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.enable_grad():
            score = logits_of(model(x.requires_grad_(True))).max(dim=1).values.sum()
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    out = []
    for name, module in named:
        shape, calls, order = records.get(name, [None, 0, -1])
        layout = infer_layout(shape, input_size, hint) if shape is not None else None
        out.append(LayerInfo(name, type(module).__name__, shape, calls, order, layout))
    return out, kept, score


def _is_live(grad: Tensor | None, layout: Layout) -> bool:
    """Whether the score's gradient reaches more than one position of the map."""
    if grad is None:
        return False
    per_position = layout.to_nchw(grad).abs().sum(dim=1).flatten()
    return int((per_position > 0).sum()) > 1


def inspect_layers(
    model: nn.Module, input_size: tuple[int, int], device: torch.device | str = "cpu"
) -> tuple[list[LayerInfo], str]:
    """Every module's output shape, layout and calls (in module-tree order) and the auto-detected layer, from
    a single dummy forward."""
    infos, kept, score = _trace(model, input_size, device)
    candidates = sorted((i for i in infos if i.spatial and i.calls == 1), key=lambda i: -i.order)
    if not candidates:
        raise GradcamError(
            "could not find a layer with a spatial output ((B, C, h, w), (B, h, w, C) or tokens) to explain; "
            "pass --layer (see `gradcam layers MODEL`)"
        )
    if score.requires_grad:
        with torch.enable_grad():
            # backward in growing chunks, newest layers first: a CNN stops after its head, a ViT a few blocks in
            start, size = 0, 1
            while start < len(candidates):
                chunk = [i for i in candidates[start : start + size] if i.name in kept and i.layout is not None]
                acts = [kept[i.name] for i in chunk]
                grads = torch.autograd.grad(score, acts, retain_graph=True, allow_unused=True) if acts else ()
                for info, grad in zip(chunk, grads, strict=True):
                    if info.layout is not None and _is_live(grad, info.layout):
                        return infos, info.name
                start, size = start + size, size * 2
    return infos, candidates[0].name  # nothing gets gradient (a degenerate model): the last spatial layer


def auto_detect_layer(model: nn.Module, input_size: tuple[int, int], device: torch.device | str = "cpu") -> str:
    """The last module, in execution order, with a spatial output that ran once and that the score depends on.

    Modules called more than once (a shared activation, say) are skipped: hooking them would capture several
    tensors. Among a parent and its last child, which finish with the same tensor, the parent finishes last
    and wins, which gives the familiar names (`layer4`, `features`). "Depends on" matters for transformers:
    a ViT's head reads only the class token, so the last blocks' patch tokens get no gradient and would give
    an empty map; one backward from the top class of a seeded random input finds the last layer whose
    positions do get gradient (for a ViT the last block's `ln_1`, where patches still feed the class token
    through attention). Convolutional nets pass this check at their last spatial layer.
    """
    return inspect_layers(model, input_size, device)[1]


def choose_layers(
    model: nn.Module,
    specs: Sequence[str],
    model_name: str | None,
    input_size: tuple[int, int],
    device: torch.device | str,
    log: Callable[[str], None],
) -> dict[str, nn.Module]:
    """The target layers of a run by canonical name: the `--layer` values, else auto-detected (logged)."""
    if specs:
        return dict(resolve_target(model, spec) for spec in specs)
    family = family_layer(model, input_size)
    if family is not None:
        log(f"target layer: {family[0]} ({family[1]}; set --layer to change)")
        return {family[0]: resolve_layer(model, family[0])[1]}
    name = catalog_layer(model, model_name, input_size) or auto_detect_layer(model, input_size, device)
    log(f"target layer: {name} (auto-detected: last spatial layer before pooling; set --layer to change)")
    return {name: resolve_layer(model, name)[1]}


def family_layer(model: nn.Module, input_size: tuple[int, int]) -> tuple[str, str] | None:
    """(layer, why) for a timm or Hugging Face model, the layer its family calls for; None for the rest.

    Auto-detection answers "the last layer whose positions the score depends on", which for a timm ViT is
    the last block's attention projection and for a Hugging Face ViT its value projection: maps of a linear
    projection inside attention, not of the tokens the block passes on. The families' conventional layers
    (`model.timm_source`, `model.hf_source`) are the ones a practitioner would pick.
    """
    package = type(model).__module__.split(".")[0]
    if package == "timm":
        from gradcam_cli.model.timm_source import timm_default_layer

        found = timm_default_layer(model, input_size)
    elif package == "transformers":
        from gradcam_cli.model.hf_source import hf_default_layer

        found = hf_default_layer(model)
    else:
        return None
    if found is None:
        return None
    try:
        return resolve_layer(model, found[0])[0], found[1]
    except GradcamError:
        return None


def catalog_layer(model: nn.Module, model_name: str | None, input_size: tuple[int, int]) -> str | None:
    """The layer `gradcam models` lists for a torchvision model, when this run is the case it was detected for.

    Auto-detection runs the model forward and backward with a hook on every module, a visible part of a short
    run. The catalog holds its answer for every torchvision classifier at the model's own input size, made with
    the same torchvision version, and tests/test_zoo.py checks that detection still gives it; any other case (a
    factory, another input size or torchvision) is detected. The start-up probe still runs the chosen layer
    once before OUT is touched.
    """
    from gradcam_cli.model.catalog import MODELS, TORCHVISION_VERSION

    entry = MODELS.get(model_name or "")
    if entry is None or loaded_torchvision() != TORCHVISION_VERSION or input_size != (entry[0], entry[0]):
        return None
    try:
        resolve_layer(model, entry[1])
    except GradcamError:
        return None
    return entry[1]


def loaded_torchvision() -> str:
    """The version of the torchvision this process imported (without a local build suffix)."""
    import torchvision

    return str(torchvision.__version__).split("+")[0]
