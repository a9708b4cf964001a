"""CAM (Zhou et al. 2016), for models ending in global average pooling + one Linear layer.

map = ReLU(sum_k W[c, k] A_k), W the final Linear's weight. For such models dy/dA_k = W[c, k] / (h w) at
every position, so CAM = h w x Grad-CAM; it needs no backward pass, but it needs the layer to be exactly
what the pooling averages, which is checked on every batch: logits == W mean_ij(A) + b.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradcam_cli.cam.methods.base import CamMethod, LayerContext, weighted_sum
from gradcam_cli.errors import GradcamError

HINT = "use gradcam (for GAP+FC models it equals CAM up to a constant factor)"


def cam(activations: Tensor, class_weights: Tensor, eigen_smooth: bool = False) -> Tensor:
    """ReLU(sum_k W[c, k] A_k) with class_weights (N, K) the rows W[c] of the targets."""
    return weighted_sum(class_weights, activations, eigen_smooth)


class Cam(CamMethod):
    def layer_maps(self, ctx: LayerContext) -> Tensor:
        weight = final_linear(ctx)
        return cam(ctx.repeated, ctx.options.sign * weight[ctx.targets.flatten()].float(), ctx.options.eigen_smooth)


def final_linear(ctx: LayerContext) -> Tensor:
    """The weight (C, K) of the model's last Linear layer, after checking logits == W mean_ij(A) + b."""
    linears = [m for m in ctx.options.model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise GradcamError(f"method 'cam' needs a model ending in global average pooling + a Linear layer; {HINT}")
    fc = linears[-1]
    a, logits = ctx.activations, ctx.logits
    k = a.shape[1]
    if fc.in_features != k or fc.out_features != logits.shape[1]:
        raise GradcamError(
            f"method 'cam': layer '{ctx.name}' has {k} channels but the final Linear layer maps "
            f"{fc.in_features} -> {fc.out_features}; pick the layer right before global average pooling, or {HINT}"
        )
    weight = fc.weight.detach()
    predicted = a.mean(dim=(2, 3)) @ weight.float().t()
    if fc.bias is not None:
        predicted = predicted + fc.bias.detach().float()
    scale = max(1.0, float(logits.abs().max()))
    tol = 3e-2 if ctx.low_precision else 1e-3  # bf16/fp16 logits under --amp carry ~3 significant digits
    if not torch.allclose(predicted, logits, rtol=tol, atol=tol * scale):
        raise GradcamError(
            f"method 'cam': layer '{ctx.name}' does not feed global average pooling + the final Linear layer "
            "directly (its logits != fc(mean(A))); pick the map that the pooling averages (e.g. "
            f"POOLING_MODULE:input when an activation sits in between), or {HINT}"
        )
    return weight
