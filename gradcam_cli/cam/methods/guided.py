"""Guided backprop (Springenberg et al. 2015) and Guided Grad-CAM (Selvaraju et al. 2017).

Both need the guided input gradient, (N, 3, H, W) at input resolution, which the engine computes with every
ReLU's backward also zeroing negative incoming gradients (`cam.relu_swap`). Guided backprop's map is that
gradient's per-pixel magnitude; Guided Grad-CAM multiplies it by the upsampled Grad-CAM map.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from gradcam_cli.cam.methods import MethodSpec
from gradcam_cli.cam.methods.base import CamMethod, GradientMethod
from gradcam_cli.cam.methods.gradient import gradcam


def guided_saliency(guided: Tensor) -> Tensor:
    """(N, 3, H, W) guided-backprop gradients -> (N, H, W) heatmap: max over colour channels of |g|."""
    return guided.abs().amax(dim=1)


def guided_gradcam(guided: Tensor, cams: Tensor) -> Tensor:
    """guided (N, 3, H, W) x the bilinear-upsampled CAM (N, h, w)."""
    up = F.interpolate(cams[:, None].float(), size=guided.shape[-2:], mode="bilinear", align_corners=False)
    return guided * up


class GuidedBackprop(CamMethod):
    def input_maps(self, input_grads: Tensor) -> Tensor:
        return guided_saliency(input_grads)

    def picture(self, input_grads: Tensor, cams: Tensor | None) -> Tensor:
        return input_grads


class GuidedGradCam(GradientMethod):
    def __init__(self, spec: MethodSpec) -> None:
        super().__init__(spec, gradcam)

    def picture(self, input_grads: Tensor, cams: Tensor | None) -> Tensor:
        assert cams is not None
        return guided_gradcam(input_grads, cams)
