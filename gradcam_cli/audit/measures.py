"""Explanation-quality metrics as batched tensor functions on the compute device. No files, no hooks, no state.

Conventions shared by every function here:

- `x` is a batch of model inputs (N, 3, h, w), already normalised as the model expects.
- a saliency map is (N, h, w) at the model-input resolution (for the perturbation metrics) or (H, W) at the
  original image resolution (for pointing and energy); larger means "more important".
- `black` is the normalised value of a black pixel, (1, 3, 1, 1) = (0 - mean) / std. Every "pixel-space"
  operation (masking an image by a map, the zero baseline) is an interpolation between `black` and `x`, which
  is exactly the pixel-space operation because normalisation is a per-channel affine map.
- `forward(x) -> logits` is the model; probabilities are softmax(logits) of the explained (target) class.

The metrics (their columns, directions and gates: `audit.metrics`):

- deletion / insertion (Petsiuk, Das & Saenko, "RISE", BMVC 2018): order the pixels by saliency, most salient
  first; step k of `steps` replaces (deletion) or reveals (insertion) the first round(k * n / steps) of the n
  pixels, starting from / towards a baseline image; the score is the trapezoidal area under the curve of the
  target-class probability over the fraction of pixels perturbed, in [0, 1]. A good map makes deletion fall
  fast (low AUC) and insertion rise fast (high AUC).
- Average Drop % and Increase in Confidence (Chattopadhay et al., "Grad-CAM++", WACV 2018): with Y the
  target-class probability on the image and O on the image multiplied pixel-wise by the [0, 1] map,
  drop = 100 * max(0, Y - O) / Y and increase = [O > Y]; the summary averages them over images.
- pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016 / IJCV 2018): a
  hit when the map's maximum lies on an annotated instance of the target class, with a 15-pixel tolerance.
- energy-based pointing game (Wang et al., "Score-CAM", CVPRW 2020): sum of the map inside the annotated
  region / sum of the map everywhere, in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Forward = Callable[[Tensor], Tensor]

POINTING_TOLERANCE = 15.0  # pixels of the original image, as in Zhang et al.
BLUR_KERNEL = 11  # Petsiuk et al.'s insertion substrate: an 11-tap Gaussian with sigma 5 (their `gkern(11, 5)`)
BLUR_SIGMA = 5.0
PERTURBATION_MODES: tuple[str, ...] = ("deletion", "insertion")


# ------------------------------------------------------------------------------------------------ baselines


def gaussian_blur(x: Tensor, size: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> Tensor:
    """Separable Gaussian blur of (N, C, h, w) with reflect padding (borders keep their colour).

    k(t) = exp(-t^2 / (2 sigma^2)) / sum_t exp(...), t = -(size//2) .. size//2; applied along w, then h.
    The kernel sums to 1, so a constant image is unchanged (and blurring commutes with normalisation).
    """
    half = size // 2
    t = torch.arange(size, device=x.device, dtype=x.dtype) - half
    k = torch.exp(-(t**2) / (2.0 * sigma * sigma))
    k = k / k.sum()
    channels = x.shape[1]
    pad_w = min(half, x.shape[3] - 1)
    pad_h = min(half, x.shape[2] - 1)
    # reflect padding needs pad < side; tiny inputs fall back to replicate for the rest
    out = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w > 0 else x
    if pad_w < half:
        out = F.pad(out, (half - pad_w, half - pad_w, 0, 0), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
    out2 = F.pad(out, (0, 0, pad_h, pad_h), mode="reflect") if pad_h > 0 else out
    if pad_h < half:
        out2 = F.pad(out2, (0, 0, half - pad_h, half - pad_h), mode="replicate")
    return F.conv2d(out2, k.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)


def baseline_images(x: Tensor, kind: str, black: Tensor) -> Tensor:
    """What deletion replaces pixels with and insertion starts from, per image (N, 3, h, w).

    blur: `gaussian_blur(x)` (Petsiuk et al.'s insertion substrate); zero: a black image; mean: the image's
    own per-channel mean colour.
    """
    if kind == "blur":
        return gaussian_blur(x)
    if kind == "zero":
        return black.to(x.dtype).expand_as(x).contiguous()
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    raise ValueError(f"unknown baseline {kind!r}")


# --------------------------------------------------------------------------------------- deletion/insertion


def saliency_ranks(saliency: Tensor) -> Tensor:
    """(N, h, w) -> (N, h*w) rank of each pixel, 0 = most salient. Ties keep raster order (stable sort).

    The rank form lets a step's mask be one comparison `ranks < count` instead of a scatter per step.
    """
    flat = saliency.flatten(1)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks


def step_counts(n_pixels: int, steps: int) -> list[int]:
    """Pixels perturbed at step k = 0..steps: round(k * n / steps) (half up), so step 0 is 0 and the last is n."""
    return [(k * n_pixels * 2 + steps) // (2 * steps) for k in range(steps + 1)]


def perturbation_curves(
    forward: Forward,
    x: Tensor,
    base: Tensor,
    saliency: Tensor,
    image_of: Tensor,
    targets: Tensor,
    steps: int,
    modes: Sequence[str] = PERTURBATION_MODES,
    chunk: int = 64,
    p_image: Tensor | None = None,
) -> dict[str, Tensor]:
    """Target-class probability curves, (M, steps + 1) per mode, for M maps over N images.

    Map m explains image `image_of[m]` (x and base are per image, (N, 3, h, w)) for class `targets[m]`;
    `saliency` is (M, h, w). Deletion step k shows the image with its round(k*n/steps) most salient pixels
    replaced by the baseline; insertion step k shows the baseline with them revealed. So deletion[0] and
    insertion[steps] are the image itself (taken from `p_image` (N, C) when given, which saves M forwards), and
    deletion[steps] and insertion[0] are the baseline (one forward per image, shared by its maps).

    Every perturbed image of every map, step and mode goes through `forward` in chunks of `chunk` images: one
    large batch per chunk instead of one forward per step per image. Memory is O(chunk), whatever M and steps.
    """
    m_maps, (h, w) = saliency.shape[0], saliency.shape[1:]
    n_pixels = h * w
    counts = torch.tensor(step_counts(n_pixels, steps), device=x.device)
    ranks = saliency_ranks(saliency).view(m_maps, 1, h, w)
    curves = {mode: torch.empty(m_maps, steps + 1, device=x.device, dtype=torch.float32) for mode in modes}
    deletion_index = modes.index("deletion") if "deletion" in modes else -1

    # the two ends: the image itself and the baseline
    with torch.no_grad():
        p_base = _probs(forward, base, chunk)
        p_full = p_image if p_image is not None else _probs(forward, x, chunk)
    full_t = p_full[image_of, targets].float()
    base_t = p_base[image_of, targets].float()
    for mode in modes:
        first, last = (full_t, base_t) if mode == "deletion" else (base_t, full_t)
        curves[mode][:, 0] = first
        curves[mode][:, steps] = last

    # the inner steps: jobs (mode, map, k) for k = 1 .. steps-1, enumerated flat and built chunk by chunk
    inner = steps - 1
    per_mode = m_maps * inner
    total = per_mode * len(modes)
    for start in range(0, total, chunk):
        job = torch.arange(start, min(start + chunk, total), device=x.device)
        mode_i = job // per_mode
        rest = job % per_mode
        m = rest // inner
        k = rest % inner + 1
        img = image_of[m]
        covered = ranks[m] < counts[k].view(-1, 1, 1, 1)  # (c, 1, h, w): the k-th step's most salient pixels
        # deletion: covered pixels come from the baseline; insertion: the uncovered ones do
        deleting = (mode_i == deletion_index).view(-1, 1, 1, 1)
        from_base = torch.where(deleting, covered, ~covered)
        perturbed = torch.where(from_base, base[img], x[img])
        with torch.no_grad():
            p = forward(perturbed).float().softmax(dim=1)
        values = p[torch.arange(len(job), device=x.device), targets[m]]
        for mi, mode in enumerate(modes):
            sel = mode_i == mi
            curves[mode][m[sel], k[sel]] = values[sel]
    return curves


def _probs(forward: Forward, x: Tensor, chunk: int) -> Tensor:
    return torch.cat([forward(x[i : i + chunk]).float().softmax(dim=1) for i in range(0, x.shape[0], chunk)])


def auc(curves: Tensor) -> Tensor:
    """Trapezoidal area under (M, K+1) curves sampled at 0, 1/K, ..., 1: (sum - (first + last) / 2) / K."""
    k = curves.shape[1] - 1
    return (curves.sum(dim=1) - 0.5 * (curves[:, 0] + curves[:, -1])) / k


# ------------------------------------------------------------------------------------------- drop/increase


def masked_by_saliency(x: Tensor, saliency01: Tensor, black: Tensor) -> Tensor:
    """The image multiplied pixel-wise by a [0, 1] map, in normalised space: black + s * (x - black).

    In pixel space that is exactly p * s (normalisation is affine per channel), the "explanation map"
    E_c (.) I of Chattopadhay et al.
    """
    s = saliency01.unsqueeze(1).to(x.dtype)
    return black.to(x.dtype) + s * (x - black.to(x.dtype))


def average_drop(p_full: Tensor, p_masked: Tensor) -> Tensor:
    """Per image 100 * max(0, Y - O) / Y (percent); averaging it over images gives Average Drop %."""
    return 100.0 * (p_full - p_masked).clamp(min=0) / p_full.clamp(min=torch.finfo(p_full.dtype).tiny)


def increase_in_confidence(p_full: Tensor, p_masked: Tensor) -> Tensor:
    """Per image 1 when O > Y else 0; its mean over images is the Increase in Confidence rate."""
    return (p_masked > p_full).to(torch.int64)


# -------------------------------------------------------------------------------------------- maps, pointing


def normalize_maps(maps: Tensor) -> Tensor:
    """Min-max normalise (N, h, w) maps to [0, 1] per map; a map with no range becomes all zeros."""
    flat = maps.flatten(1)
    lo = flat.amin(dim=1).view(-1, 1, 1)
    hi = flat.amax(dim=1).view(-1, 1, 1)
    span = hi - lo
    out = (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.zeros_like(out))


def input_maps(cams: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, h', w') layer-resolution CAMs -> (N, h, w) [0, 1] maps at the model-input size (bilinear,
    align_corners=False, as the heatmaps are made). A constant CAM becomes all zeros, as in render."""
    src = cams.float()
    up = F.interpolate(src.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    flat = src.flatten(1)
    has_range = (flat.amax(dim=1) > flat.amin(dim=1)).view(-1, 1, 1)
    return torch.where(has_range, normalize_maps(up), torch.zeros_like(up))


def peak(heat: Tensor) -> tuple[int, int] | None:
    """(x, y) of the first maximum in raster order (as the CSV's peak_x/peak_y); None for an all-zero map."""
    if not bool(heat.amax() > 0):
        return None
    y, x = divmod(int(torch.argmax(heat).item()), heat.shape[1])
    return x, y


def box_region(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """(K, 4) boxes x0, y0, x1, y1 in original pixels -> (H, W) bool union.

    A pixel (px, py) is inside a box when its centre (px + 0.5, py + 0.5) lies in [x0, x1) x [y0, y1): integer
    boxes cover pixels x0 .. x1 - 1, and fractional (COCO) boxes are rasterised by pixel centres.
    """
    height, width = size
    region = torch.zeros(height, width, dtype=torch.bool, device=boxes.device)
    if boxes.numel() == 0:
        return region
    cx = torch.arange(width, device=boxes.device, dtype=torch.float32) + 0.5
    cy = torch.arange(height, device=boxes.device, dtype=torch.float32) + 0.5
    b = boxes.float()
    inside_x = (cx.view(1, -1) >= b[:, 0:1]) & (cx.view(1, -1) < b[:, 2:3])  # (K, W)
    inside_y = (cy.view(1, -1) >= b[:, 1:2]) & (cy.view(1, -1) < b[:, 3:4])  # (K, H)
    return (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)).any(dim=0)


def distance_to_boxes(point: tuple[int, int], boxes: Tensor) -> Tensor:
    """Euclidean distance from pixel `point`'s centre to each (K, 4) box (0 inside), in pixels."""
    px, py = point[0] + 0.5, point[1] + 0.5
    b = boxes.float()
    dx = torch.clamp(torch.maximum(b[:, 0] - px, px - b[:, 2]), min=0)
    dy = torch.clamp(torch.maximum(b[:, 1] - py, py - b[:, 3]), min=0)
    return torch.sqrt(dx * dx + dy * dy)


def distance_to_mask(point: tuple[int, int], mask: Tensor, radius: float) -> float:
    """Distance from pixel `point`'s centre to the nearest pixel of the (H, W) bool mask, each mask pixel taken as
    its unit square (so a mask rasterised from a box gives the same distance as the box); looked up within
    `radius`, math.inf when nothing is that close."""
    r = int(math.floor(radius)) + 1
    x, y = point
    height, width = mask.shape
    y0, y1, x0, x1 = max(0, y - r), min(height, y + r + 1), max(0, x - r), min(width, x + r + 1)
    window = mask[y0:y1, x0:x1]
    if not bool(window.any()):
        return math.inf
    yy, xx = torch.nonzero(window, as_tuple=True)
    dy = ((yy + y0 - y).abs().float() - 0.5).clamp(min=0)
    dx = ((xx + x0 - x).abs().float() - 0.5).clamp(min=0)
    return float(torch.sqrt(dx * dx + dy * dy).min().item())


def pointing_hit(heat: Tensor, boxes: Tensor, mask: Tensor | None, tolerance: float = POINTING_TOLERANCE) -> int | None:
    """Pointing game for one (H, W) map: 1 hit, 0 miss, None when there is no annotation to point at.

    Hit when the map's maximum is within `tolerance` pixels of a target-class box or of the mask: the distance
    from the peak pixel's centre to the box (or to the nearest mask pixel's square) is at most `tolerance`.
    An all-zero map has no maximum: a miss.
    """
    if boxes.numel() == 0 and mask is None:
        return None
    top = peak(heat)
    if top is None:
        return 0
    if boxes.numel() and bool((distance_to_boxes(top, boxes) <= tolerance).any()):
        return 1
    if mask is not None and distance_to_mask(top, mask, tolerance) <= tolerance:
        return 1
    return 0


def energy_in_region(heat: Tensor, region: Tensor) -> float:
    """sum(heat inside region) / sum(heat), in [0, 1]; 0 for an all-zero map (no energy anywhere)."""
    total = heat.sum()
    if not bool(total > 0):
        return 0.0
    return float((heat * region).sum().item() / total.item())
