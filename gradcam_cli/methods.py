"""CAM methods as pure functions of target-layer tensors; the engine does all the plumbing (hooks, passes).

Shapes used throughout: A = activations (N, K, h, w) and G = dy/dA (N, K, h, w), float32 on the compute
device, where N = images x target slots flattened and y is the pre-softmax score of the target class.
Every CAM function returns the ReLU'd map (N, h, w) at layer resolution ("where is the evidence FOR the
class"). No hooks, no files, no state. `METHOD_INFO` says what each method needs from the engine.

Sign convention of the principal-component maps (eigencam, eigengradcam, --eigen-smooth): an SVD fixes a
singular vector only up to its sign, so the projection is flipped, per image, to correlate positively with
the channel sum of the tensor it projects (for eigencam: with the mean activation). That makes the maps
deterministic and, unlike an arbitrary sign, point at what the layer responds to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gradcam_cli.errors import GradcamError

CamMethod = Callable[[Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------------- shared reductions


def first_component(x: Tensor) -> Tensor:
    """(N, K, h, w) -> (N, h, w): projection of every position onto the first principal component.

    Per image: X = x viewed as (h*w positions, K channels), centred per channel over positions;
    X = U S V^T; map = X v_1 (= s_1 u_1), signed so that <map, sum_k x_k> >= 0. Non-finite input gives a NaN
    map for that image (the caller reports it) instead of an SVD failure for the whole batch.
    """
    n, k, h, w = x.shape
    m = x.reshape(n, k, h * w).transpose(1, 2)  # (N, hw, K)
    finite = torch.isfinite(m).flatten(1).all(dim=1)
    m = torch.nan_to_num(m, nan=0.0, posinf=0.0, neginf=0.0)
    m = m - m.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    proj = (m @ vh[:, 0, :, None])[..., 0]  # (N, hw)
    reference = m.sum(dim=2)  # channel sum, centred over positions
    sign = torch.where((proj * reference).sum(dim=1) < 0, -1.0, 1.0).to(proj.dtype)
    proj = proj * sign[:, None]
    proj = torch.where(finite[:, None], proj, torch.full_like(proj, float("nan")))
    return proj.view(n, h, w)


def weighted_sum(weights: Tensor, activations: Tensor, eigen_smooth: bool = False) -> Tensor:
    """ReLU(sum_k w_k A_k): weights (N, K), A (N, K, h, w) -> (N, h, w); eigen_smooth projects w_k A_k instead."""
    if eigen_smooth:
        return torch.relu(first_component(weights[:, :, None, None] * activations))
    return torch.relu(torch.einsum("nk,nkhw->nhw", weights, activations))


def _reduce(elementwise: Tensor, eigen_smooth: bool) -> Tensor:
    """ReLU of the channel sum of (N, K, h, w), or of its first principal component."""
    return torch.relu(first_component(elementwise) if eigen_smooth else elementwise.sum(dim=1))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den != 0, else 0 (no eps: an eps changes the result when the values are small)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


# ---------------------------------------------------------------------------------- gradient methods


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
    alpha = torch.where(gradients != 0, _safe_div(g2, denom), torch.zeros_like(g2))
    weights = (alpha * torch.relu(gradients)).sum(dim=(2, 3))
    return weighted_sum(weights, activations, eigen_smooth)


def xgradcam(activations: Tensor, gradients: Tensor, eigen_smooth: bool = False) -> Tensor:
    """XGrad-CAM (Fu et al. 2020): w_k = sum_ij (A_k[i, j] / sum_ab A_k[a, b]) dy/dA_k[i, j] (0 if sum is 0)."""
    weights = _safe_div((gradients * activations).sum(dim=(2, 3)), activations.sum(dim=(2, 3)))
    return weighted_sum(weights, activations, eigen_smooth)


def hirescam(activations: Tensor, gradients: Tensor, eigen_smooth: bool = False) -> Tensor:
    """HiResCAM (Draelos & Carin 2020): map = ReLU(sum_k G_k * A_k), element-wise, no spatial averaging."""
    return _reduce(gradients * activations, eigen_smooth)


def layercam(activations: Tensor, gradients: Tensor, eigen_smooth: bool = False) -> Tensor:
    """LayerCAM (Jiang et al. 2021): map = ReLU(sum_k ReLU(G_k) * A_k), element-wise positive gradients."""
    return _reduce(torch.relu(gradients) * activations, eigen_smooth)


def eigengradcam(activations: Tensor, gradients: Tensor, eigen_smooth: bool = False) -> Tensor:
    """Eigen-Grad-CAM: ReLU of the first principal component of G * A (sign: see the module docstring)."""
    return torch.relu(first_component(gradients * activations))


# --------------------------------------------------------------------------------- gradient-free ones


def eigencam(activations: Tensor) -> Tensor:
    """Eigen-CAM (Muhammad & Yeasin 2020): ReLU of the first principal component of A. Class-agnostic."""
    return torch.relu(first_component(activations))


def cam(activations: Tensor, class_weights: Tensor, eigen_smooth: bool = False) -> Tensor:
    """CAM (Zhou et al. 2016) for GAP+FC models: map = ReLU(sum_k W[c, k] A_k), W the final Linear's weight.

    class_weights (N, K) are the rows W[c] of the targets. For such models dy/dA_k = W[c, k] / (h w) at every
    position, so CAM = h w x Grad-CAM; it needs no backward pass.
    """
    return weighted_sum(class_weights, activations, eigen_smooth)


def normalized_masks(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Score-CAM masks: (M, h, w) activation maps -> (M, H, W) in [0, 1].

    Bilinear upsampling with align_corners=True (as pytorch-grad-cam's Score-CAM), then min-max per map; a
    constant map becomes an all-zero mask.
    """
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=True)[:, 0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    return _safe_div(up - lo, hi - lo)


def scorecam(activations: Tensor, scores: Tensor, eigen_smooth: bool = False) -> Tensor:
    """Score-CAM (Wang et al. 2020): w = softmax_k(y(x * M_k)); map = ReLU(sum_k w_k A_k).

    scores (N, K) is the target score of the input masked by channel k's normalised upsampled map M_k. The
    softmax over channels is shift-invariant, so subtracting the baseline score (the paper's "increase of
    confidence") would change nothing.
    """
    return weighted_sum(torch.softmax(scores.float(), dim=1), activations, eigen_smooth)


def ablationcam(activations: Tensor, base: Tensor, ablated: Tensor, eigen_smooth: bool = False) -> Tensor:
    """Ablation-CAM (Desai & Ramaswamy 2020): w_k = (y - y_k) / |y|; map = ReLU(sum_k w_k A_k).

    base (N,) is the target score y, ablated (N, K) the score y_k with channel k of the layer set to 0. The
    paper divides by y; we divide by |y| so that a negative score does not flip every weight's sign (a
    channel whose removal lowers the score always counts as evidence for the class); y = 0 divides by 1.
    """
    scale = torch.where(base != 0, base.abs(), torch.ones_like(base))
    return weighted_sum((base[:, None] - ablated) / scale[:, None], activations, eigen_smooth)


# ------------------------------------------------------------------------------------- guided methods


def guided_saliency(guided: Tensor) -> Tensor:
    """(N, 3, H, W) guided-backprop gradients -> (N, H, W) heatmap: max over colour channels of |g|."""
    return guided.abs().amax(dim=1)


def guided_gradcam(guided: Tensor, cams: Tensor) -> Tensor:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided (N, 3, H, W) x bilinear-upsampled CAM (N, h, w)."""
    up = F.interpolate(cams[:, None].float(), size=guided.shape[-2:], mode="bilinear", align_corners=False)
    return guided * up


# ------------------------------------------------------------------------------------------- fusion


def minmax(maps: Tensor) -> Tensor:
    """Per-map min-max over the last two dims to [0, 1]; a map without range becomes all zero.

    Unlike metrics.normalize_maps (which zeroes them), a map holding NaN stays NaN, so that a fused map of a
    non-finite layer map is reported as an error row like the layer map itself would be.
    """
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return _safe_div(maps - lo, hi - lo)


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


# ------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class MethodInfo:
    """What a method needs from the engine, and one line on when to use it (README table, `--help`).

    kind: `gradient` (fn(A, G) after one backward to the layer), `activation` (fn(A), no backward), `linear`
    (final Linear weights, no backward), `score` (masked-input forwards), `ablation` (head forwards with
    channels zeroed), `guided` (ReLU-guided backward to the input; `guided-gradcam` also needs layer grads).
    """

    name: str
    kind: str
    class_specific: bool = True
    eigen_smooth: bool = True
    uses_layer: bool = True
    layer_grads: bool = False
    input_grads: bool = False
    fn: Callable[..., Tensor] | None = None
    when: str = ""


METHOD_INFO: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo("gradcam", "gradient", layer_grads=True, fn=gradcam, when="the default: fast, robust, coarse"),
        MethodInfo(
            "gradcampp",
            "gradient",
            layer_grads=True,
            fn=gradcampp,
            when="several instances of the class in one image; weights positive gradients per position",
        ),
        MethodInfo(
            "xgradcam",
            "gradient",
            layer_grads=True,
            fn=xgradcam,
            when="like Grad-CAM with activation-weighted gradients (satisfies sensitivity/conservation axioms)",
        ),
        MethodInfo(
            "hirescam",
            "gradient",
            layer_grads=True,
            fn=hirescam,
            when="faithful to what the model computes at each position (no gradient averaging)",
        ),
        MethodInfo(
            "layercam",
            "gradient",
            layer_grads=True,
            fn=layercam,
            when="earlier, higher-resolution layers, where Grad-CAM gets noisy",
        ),
        MethodInfo(
            "eigencam",
            "activation",
            class_specific=False,
            eigen_smooth=False,
            when="what the layer responds to at all, without gradients; class-agnostic (same map for every class)",
        ),
        MethodInfo(
            "eigengradcam",
            "gradient",
            eigen_smooth=False,
            layer_grads=True,
            fn=eigengradcam,
            when="a cleaner, class-specific principal-component map of gradients x activations",
        ),
        MethodInfo(
            "scorecam",
            "score",
            when="no gradients at all (saturated or noisy gradients); one forward per channel: slow",
        ),
        MethodInfo(
            "ablationcam",
            "ablation",
            when="gradient-free, measures the score drop when each channel is removed; head-only forwards",
        ),
        MethodInfo(
            "cam",
            "linear",
            when="the original CAM for models ending in global average pooling + Linear; no backward pass",
        ),
        MethodInfo(
            "guided-backprop",
            "guided",
            eigen_smooth=False,
            uses_layer=False,
            input_grads=True,
            when="pixel-level edges and textures the score is sensitive to; not class-discriminative",
        ),
        MethodInfo(
            "guided-gradcam",
            "guided",
            layer_grads=True,
            input_grads=True,
            fn=gradcam,
            when="Grad-CAM's localisation with guided backprop's pixel detail (guided/ output)",
        ),
    )
}

METHODS: dict[str, Callable[..., Tensor]] = {
    name: info.fn for name, info in METHOD_INFO.items() if info.kind == "gradient" and info.fn is not None
}
