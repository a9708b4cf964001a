"""Several layers' maps fused into one (`--fuse mean|max`), and the min-max normalisation it needs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from gradcam_cli.cam.methods.base import safe_div
from gradcam_cli.errors import GradcamError


def minmax(maps: Tensor) -> Tensor:
    """Per-map min-max over the last two dims to [0, 1]; a map without range becomes all zero.

    A map holding NaN stays NaN, so that a fused map of a non-finite layer map is reported as an error row
    like the layer map itself would be.
    """
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return safe_div(maps - lo, hi - lo)


def fuse_maps(maps: Sequence[Tensor], mode: str) -> Tensor:
    """Fuse maps of several layers, each (N, h_i, w_i), into one (N, H, W) at the largest layer's resolution.

    Each map is bilinearly upsampled (align_corners=False) to the largest h_i * w_i, min-max normalised per
    map (layers differ in scale by orders of magnitude, so raw values would let one layer win), then averaged
    (`mean`) or combined by element-wise maximum (`max`).
    """
    if mode not in ("mean", "max"):
        raise GradcamError(f"--fuse: expected mean or max, got {mode!r}")
    size = max((tuple(m.shape[-2:]) for m in maps), key=lambda s: s[0] * s[1])
    scaled = []
    for m in maps:
        if tuple(m.shape[-2:]) != size:
            m = F.interpolate(m[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        scaled.append(minmax(m.float()))
    stacked = torch.stack(scaled, dim=0)
    return stacked.mean(dim=0) if mode == "mean" else stacked.amax(dim=0)


def fused_name(names: Sequence[str]) -> str:
    """The CSV `layer` value of a fused map: `fused(layer3+layer4)`."""
    return "fused(" + "+".join(names) + ")"
