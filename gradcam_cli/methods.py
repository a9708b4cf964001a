"""CAM methods as pure functions of the target layer's activations and gradients.

Each takes A and dY/dA, both (N, K, h, w) float32 on the compute device, and returns the ReLU'd map
(N, h, w) at layer resolution. No hooks, no files, no state: the engine does the plumbing once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CamMethod = Callable[[Tensor, Tensor], Tensor]


def gradcam(activations: Tensor, gradients: Tensor) -> Tensor:
    """Grad-CAM (Selvaraju et al. 2017): alpha_k = mean_ij dy^c/dA_k[i, j]; map = ReLU(sum_k alpha_k A_k)."""
    weights = gradients.mean(dim=(2, 3))
    return torch.relu(torch.einsum("nk,nkhw->nhw", weights, activations))


METHODS: dict[str, CamMethod] = {"gradcam": gradcam}
