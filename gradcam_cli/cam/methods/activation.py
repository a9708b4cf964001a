"""Eigen-CAM (Muhammad & Yeasin 2020): the first principal component of the activations alone.

No gradient and no class: the same map for every target, "what the layer responds to at all".
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradcam_cli.cam.methods.base import CamMethod, LayerContext, first_component


def eigencam(activations: Tensor) -> Tensor:
    """(N, K, h, w) -> (N, h, w): ReLU of the first principal component of A (sign: see `base`)."""
    return torch.relu(first_component(activations))


class EigenCam(CamMethod):
    def layer_maps(self, ctx: LayerContext) -> Tensor:
        b, _, h, w = ctx.activations.shape
        t = ctx.targets.shape[1]
        return eigencam(ctx.activations)[:, None].expand(b, t, h, w).reshape(b * t, h, w)
