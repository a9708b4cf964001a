"""Render: layer-resolution CAM -> full-size heatmap, peak and overlay, as tensor ops on the compute device.

Everything here stays on the device until it is uint8, so the host copy is the smallest it can be.
Upsampling is bilinear with align_corners=False (pixel centres line up, as in OpenCV's resize); the map
is then min-max normalised per image, and a map with no range (all zero, or constant) becomes all zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Rendered:
    """One image's outputs, uint8 on the host: heatmap (H, W), overlay (H, W, 3) or None, and the peak."""

    heatmap: Tensor
    overlay: Tensor | None
    peak_x: int
    peak_y: int


def upsample_normalize(cam: Tensor, size: tuple[int, int], box: tuple[float, float, float, float]) -> Tensor:
    """(h, w) CAM -> (H, W) float map in [0, 1] covering `box` of the original image, zeros outside it."""
    height, width = size
    x0, y0, x1, y1 = box
    full = x0 <= 0 and y0 <= 0 and x1 >= width and y1 >= height
    if full:
        region = (height, width)
    else:
        region = (max(1, int(round(y1 - y0))), max(1, int(round(x1 - x0))))
    src = cam.float()
    up = F.interpolate(src[None, None], size=region, mode="bilinear", align_corners=False)[0, 0]
    lo, hi = up.min(), up.max()
    # "no range" is decided on the source map: bilinear weights do not sum to exactly 1 in float32, so a
    # constant map comes out with rounding noise that normalisation would stretch to [0, 1]
    span = torch.where(src.amax() > src.amin(), hi - lo, torch.zeros_like(hi))
    up = torch.where(span > 0, (up - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(up))
    if full:
        return up
    canvas = torch.zeros(height, width, dtype=up.dtype, device=up.device)
    # paste the crop region where it lies in the original; the crop may extend past the border by rounding
    top, left = int(round(y0)), int(round(x0))
    src_y0, src_x0 = max(0, -top), max(0, -left)
    dst_y0, dst_x0 = max(0, top), max(0, left)
    rows = min(region[0] - src_y0, height - dst_y0)
    cols = min(region[1] - src_x0, width - dst_x0)
    if rows > 0 and cols > 0:
        canvas[dst_y0 : dst_y0 + rows, dst_x0 : dst_x0 + cols] = up[src_y0 : src_y0 + rows, src_x0 : src_x0 + cols]
    return canvas


def to_uint8(norm: Tensor) -> Tensor:
    """[0, 1] float -> round(255 * v) as uint8."""
    return (norm * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def blend(original: Tensor, heatmap: Tensor, lut: Tensor, alpha: float) -> Tensor:
    """Colour the heatmap through the (256, 3) LUT and mix: (1 - alpha) * image + alpha * colour, uint8."""
    colour = lut[heatmap.long()]
    mixed = original.float().mul_(1.0 - alpha).add_(colour.float().mul_(alpha))
    return mixed.round_().clamp_(0, 255).to(torch.uint8)


def render(
    cam: Tensor,
    size: tuple[int, int],
    box: tuple[float, float, float, float],
    original: Tensor | None,
    lut: Tensor,
    alpha: float,
) -> Rendered:
    """All outputs for one (image, target, layer): heatmap, optional overlay, and the peak position."""
    norm = upsample_normalize(cam, size, box)
    heat = to_uint8(norm)
    flat = int(torch.argmax(norm).item())
    overlay = None
    if original is not None:
        overlay = blend(original.to(norm.device, non_blocking=True), heat, lut, alpha).cpu()
    return Rendered(heatmap=heat.cpu(), overlay=overlay, peak_x=flat % size[1], peak_y=flat // size[1])
