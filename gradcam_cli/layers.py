"""Target layers: dotted paths with indexes, resolution to modules, and auto-detection.

Users write `layer4`, `layer4.-1`, `layer4[-1]` or `features.denseblock4`; all resolve through the module
tree the way Python indexing would, and the canonical `named_modules()` name is what we report (so the CSV
says `layer4.1`, not whichever spelling the user typed). Auto-detection runs one dummy forward and picks the
last module, in execution order, whose output is a spatial (B, C, h, w) map with h*w > 1: that is the last
place before global pooling where "where" still exists.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch
from torch import nn

from gradcam_cli.errors import GradcamError

_BRACKET = re.compile(r"\[(-?\d+)\]")


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
    """One module as seen by a dummy forward: its output shape (None if not a tensor) and how often it ran."""

    name: str
    type_name: str
    shape: tuple[int, ...] | None
    calls: int
    order: int  # position of its last completed call in execution order

    @property
    def spatial(self) -> bool:
        """A candidate target: a (B, C, h, w) map that still has more than one position."""
        return self.shape is not None and len(self.shape) == 4 and self.shape[2] * self.shape[3] > 1


def trace_layers(model: nn.Module, input_size: tuple[int, int], device: torch.device | str = "cpu") -> list[LayerInfo]:
    """Run one dummy (1, 3, H, W) forward and record every module's output shape, in module-tree order."""
    records: dict[str, list] = {}
    counter = [0]
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            counter[0] += 1
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            rec = records.setdefault(name, [None, 0, 0])
            rec[0], rec[1], rec[2] = shape, rec[1] + 1, counter[0]

        return hook

    named = [(n, m) for n, m in model.named_modules() if n]
    try:
        for name, module in named:
            handles.append(module.register_forward_hook(make_hook(name)))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size, device=device))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, module in named:
        shape, calls, order = records.get(name, [None, 0, -1])
        out.append(LayerInfo(name, type(module).__name__, shape, calls, order))
    return out


def auto_detect_layer(model: nn.Module, input_size: tuple[int, int], device: torch.device | str = "cpu") -> str:
    """The last module (in execution order) with a spatial output that ran exactly once.

    Modules called more than once (a shared activation, say) are skipped: hooking them would capture several
    tensors. Among a parent and its last child, which finish with the same tensor, the parent finishes last
    and wins, which gives the familiar names (`layer4`, `features`).
    """
    infos = [i for i in trace_layers(model, input_size, device) if i.spatial and i.calls == 1]
    if not infos:
        raise GradcamError(
            "could not find a layer with a spatial (B, C, h, w) output to explain; pass --layer "
            "(see `gradcam layers MODEL`)"
        )
    return max(infos, key=lambda i: i.order).name
