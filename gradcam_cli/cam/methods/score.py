"""Score-CAM (Wang et al. 2020): channel weights from the target score of the input masked by each channel.

w = softmax_k(y(x * M_k)), M_k channel k's map upsampled to the input and min-max normalised; map =
ReLU(sum_k w_k A_k). The softmax over channels is shift-invariant, so subtracting the baseline score (the
paper's "increase of confidence") would change nothing. One forward per (image, channel): slow, but rows run
`chunk_size` at a time, so memory is bounded by the chunk, not by B x K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gradcam_cli.cam.methods.base import CamMethod, LayerContext, safe_div, weighted_sum
from gradcam_cli.model.forward import split_on_oom


def normalized_masks(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(M, h, w) activation maps -> (M, H, W) masks in [0, 1].

    Bilinear upsampling with align_corners=True (as pytorch-grad-cam's Score-CAM), then min-max per map; a
    constant map becomes an all-zero mask.
    """
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=True)[:, 0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    return safe_div(up - lo, hi - lo)


def scorecam(activations: Tensor, scores: Tensor, eigen_smooth: bool = False) -> Tensor:
    """ReLU(sum_k softmax_k(scores) A_k): scores (N, K) of the masked inputs, A (N, K, h, w)."""
    return weighted_sum(torch.softmax(scores.float(), dim=1), activations, eigen_smooth)


def masked_scores(ctx: LayerContext) -> Tensor:
    """(B, T, K): target scores of the input masked by each channel's normalised upsampled map."""
    b, k = ctx.activations.shape[:2]
    t = ctx.targets.shape[1]
    scores = torch.empty(b * k, t, device=ctx.activations.device)
    for start in range(0, b * k, ctx.options.chunk_size):
        rows, chunk = chunk_scores(ctx, start)
        scores[rows] = chunk
    return scores.view(b, k, t).transpose(1, 2)


def chunk_scores(ctx: LayerContext, start: int) -> tuple[Tensor, Tensor]:
    """Rows start.. (row r: image r // K masked by channel r % K), `chunk_size` of them, and their (n, T)
    target scores. On device OOM the rows are halved (`split_on_oom`)."""
    x, a, targets = ctx.x, ctx.activations, ctx.targets
    b, k = a.shape[:2]
    rows = torch.arange(start, min(start + ctx.options.chunk_size, b * k), device=a.device)
    image = rows // k
    masks = normalized_masks(a.reshape(b * k, *a.shape[2:])[rows], (x.shape[-2], x.shape[-1])).to(x.dtype)

    def forward(part: Tensor, first: int, stop: int) -> Tensor:
        return ctx.options.forward(part).float().gather(1, targets[image[first:stop]])

    return rows, split_on_oom(forward, x[image] * masks[:, None], lambda parts: torch.cat(list(parts)))


class ScoreCam(CamMethod):
    def probe_passes(self, ctx: LayerContext) -> None:
        chunk_scores(ctx, 0)

    def layer_maps(self, ctx: LayerContext) -> Tensor:
        b, k = ctx.activations.shape[:2]
        scores = masked_scores(ctx).reshape(b * ctx.targets.shape[1], k)
        return scorecam(ctx.repeated, ctx.options.sign * scores, ctx.options.eigen_smooth)
