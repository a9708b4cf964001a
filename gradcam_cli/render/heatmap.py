"""Layer-resolution CAM -> full-size heatmap and its peak; guided maps -> pictures.

Upsampling is bilinear with align_corners=False (pixel centres line up, as in OpenCV's resize); the map is
then min-max normalised per image, and a map with no range (all zero, or constant) becomes all zeros. With
`--preprocess crop` the model saw a box of the original: the map covers that box and is zero outside. The
heatmap is computed on the compute device and leaves it as uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in original pixels: what the model input shows


@dataclass
class Heatmap:
    """One (image, target, layer) map: uint8 (H, W) on the compute device and its peak in original pixels."""

    pixels: Tensor
    peak_x: int
    peak_y: int


def _region(size: tuple[int, int], box: Box) -> tuple[bool, tuple[int, int]]:
    """(whether the box covers the whole image, the (h, w) the map is upsampled to)."""
    height, width = size
    x0, y0, x1, y1 = box
    full = x0 <= 0 and y0 <= 0 and x1 >= width and y1 >= height
    if full:
        return True, (height, width)
    return False, (max(1, int(round(y1 - y0))), max(1, int(round(x1 - x0))))


def _paste(up: Tensor, size: tuple[int, int], box: Box) -> Tensor:
    """Put the crop-region map where the crop lies in the original; zeros elsewhere (crop may overhang by rounding)."""
    height, width = size
    canvas = torch.zeros(height, width, dtype=up.dtype, device=up.device)
    top, left = int(round(box[1])), int(round(box[0]))
    src_y0, src_x0 = max(0, -top), max(0, -left)
    dst_y0, dst_x0 = max(0, top), max(0, left)
    rows = min(up.shape[0] - src_y0, height - dst_y0)
    cols = min(up.shape[1] - src_x0, width - dst_x0)
    if rows > 0 and cols > 0:
        canvas[dst_y0 : dst_y0 + rows, dst_x0 : dst_x0 + cols] = up[src_y0 : src_y0 + rows, src_x0 : src_x0 + cols]
    return canvas


def _upsample(cam: Tensor, region: tuple[int, int]) -> tuple[Tensor, bool]:
    src = cam.float()
    up = F.interpolate(src[None, None], size=region, mode="bilinear", align_corners=False)[0, 0]
    # "no range" is decided on the source map: bilinear weights do not sum to exactly 1 in float32, so a constant
    # map comes out with rounding noise that normalisation would stretch to [0, 1]
    has_range = bool(src.amax() > src.amin())
    return up, has_range


def upsample_normalize(cam: Tensor, size: tuple[int, int], box: Box) -> Tensor:
    """(h, w) CAM -> (H, W) float map in [0, 1] covering `box` of the original image, zeros outside it: the
    saved heatmap before rounding (the pointing game and energy-in-box are measured on it)."""
    full, region = _region(size, box)
    up, has_range = _upsample(cam, region)
    lo, hi = torch.aminmax(up)
    if has_range and bool(hi > lo):
        up = up.sub_(lo).div_(hi - lo)
    else:
        up = torch.zeros_like(up)
    return up if full else _paste(up, size, box)


def to_uint8(norm: Tensor) -> Tensor:
    """[0, 1] float -> round(255 * v) as uint8."""
    return (norm * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def heatmap(cam: Tensor, size: tuple[int, int], box: Box) -> Heatmap:
    """The saved heatmap, round(255 * min-max normalised upsampled CAM), in as few full-size passes as possible.

    Full-size passes dominate on the CPU, so: one interpolate, one aminmax, one fused multiply-add to the
    rounded value, one cast. floor(v + 0.5) is used for rounding (it differs from round-half-even only on
    exact .5 ties). The peak is the argmax of the float map, before rounding merges near-equal pixels.
    """
    full, region = _region(size, box)
    up, has_range = _upsample(cam, region)
    lo, hi = torch.aminmax(up)
    if has_range and bool(hi > lo):
        scale = 255.0 / (hi - lo)
        pixels = torch.addcmul(0.5 - lo * scale, up, scale).to(torch.uint8)
        # numpy's argmax is several times faster than torch's on a CPU map (first maximum in both)
        flat = int(up.detach().numpy().argmax()) if up.device.type == "cpu" else int(torch.argmax(up).item())
    else:
        pixels = torch.zeros(region, dtype=torch.uint8, device=up.device)
        flat = 0
    peak_y, peak_x = divmod(flat, region[1])
    if not full:
        pixels = _paste(pixels, size, box)
        peak_y = min(max(peak_y + int(round(box[1])), 0), size[0] - 1)
        peak_x = min(max(peak_x + int(round(box[0])), 0), size[1] - 1)
    return Heatmap(pixels=pixels, peak_x=peak_x, peak_y=peak_y)


def render_guided(guided: Tensor, size: tuple[int, int], box: Box) -> Tensor:
    """(3, h, w) guided-backprop map at model-input resolution -> (H, W, 3) uint8 picture at the original size.

    The usual display of guided backprop: per image, (g - mean) / std * 0.1 + 0.5 clipped to [0, 1], so a zero
    gradient is mid-grey and the sign of each colour channel shows. Resampled like the heatmaps (bilinear,
    align_corners=False, onto `box`); outside a crop box the picture is mid-grey. Returned on the host.
    """
    g = guided.float()
    std = g.std()
    scaled = (g - g.mean()) / torch.where(std > 0, std, torch.ones_like(std)) * 0.1 + 0.5
    full, region = _region(size, box)
    up = F.interpolate(scaled[None], size=region, mode="bilinear", align_corners=False)[0].clamp_(0, 1)
    if not full:
        up = torch.stack([_paste(channel - 0.5, size, box) for channel in up]) + 0.5
    return to_uint8(up).permute(1, 2, 0).contiguous().cpu()
