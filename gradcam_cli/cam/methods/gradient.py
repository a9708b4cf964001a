"""Gradient methods: Grad-CAM and its variants, each a plain function of A (N, K, h, w) and G = dy/dA.

They differ only in how the channel weights (or the per-position products) are made from one backward to
the layer; see `base` for the shapes and the sign convention of the principal-component maps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradcam_cli.cam.methods.base import channel_sum, first_component, safe_div, weighted_sum


def gradcam(activations: Tensor, gradients: Tensor, eigen_smooth: bool = False) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): alpha_k = mean_ij dy/dA_k[i, j]; map = ReLU(sum_k alpha_k A_k)."""
    return weighted_sum(gradients.mean(dim=(2, 3)), activations, eigen_smooth)


def gradcampp(activations: Tensor, gradients: Tensor, eigen_smooth: bool = False, eps: float = 0.0) -> Tensor:
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19 with the exponential-score simplification).

    alpha_k[i, j] = g^2 / (2 g^2 + (sum_ab A_k[a, b]) g^3) with g = dy/dA_k[i, j], and 0 where g = 0 (or the
    denominator is 0); w_k = sum_ij alpha_k[i, j] ReLU(g); map = ReLU(sum_k w_k A_k). `eps` (default 0, the
    paper) is added to the denominator only to reproduce implementations that add one.
    """
    g2 = gradients.pow(2)
    g3 = g2 * gradients
    sum_a = activations.sum(dim=(2, 3), keepdim=True)
    denom = 2 * g2 + sum_a * g3 + eps
    alpha = torch.where(gradients != 0, safe_div(g2, denom), torch.zeros_like(g2))
    weights = (alpha * torch.relu(gradients)).sum(dim=(2, 3))
    return weighted_sum(weights, activations, eigen_smooth)


def xgradcam(activations: Tensor, gradients: Tensor, eigen_smooth: bool = False) -> Tensor:
    """XGrad-CAM (Fu et al. 2020): w_k = sum_ij (A_k[i, j] / sum_ab A_k[a, b]) dy/dA_k[i, j] (0 if sum is 0)."""
    weights = safe_div((gradients * activations).sum(dim=(2, 3)), activations.sum(dim=(2, 3)))
    return weighted_sum(weights, activations, eigen_smooth)


def hirescam(activations: Tensor, gradients: Tensor, eigen_smooth: bool = False) -> Tensor:
    """HiResCAM (Draelos & Carin 2020): map = ReLU(sum_k G_k * A_k), element-wise, no spatial averaging."""
    return channel_sum(gradients * activations, eigen_smooth)


def layercam(activations: Tensor, gradients: Tensor, eigen_smooth: bool = False) -> Tensor:
    """LayerCAM (Jiang et al. 2021): map = ReLU(sum_k ReLU(G_k) * A_k), element-wise positive gradients."""
    return channel_sum(torch.relu(gradients) * activations, eigen_smooth)


def eigengradcam(activations: Tensor, gradients: Tensor, eigen_smooth: bool = False) -> Tensor:
    """Eigen-Grad-CAM: ReLU of the first principal component of G * A (sign: see `base`)."""
    return torch.relu(first_component(gradients * activations))
