"""What a CAM method sees of one layer of one batch, the method interface, and the maths methods share.

Shapes used throughout: A = activations (N, K, h, w) and G = d(sign * y)/dA (N, K, h, w), float32 on the
compute device, where N = images x target slots flattened and y is the pre-softmax score of the target class
(sign is -1 with --counterfactual). Every method returns the ReLU'd map (N, h, w) at layer resolution
("where is the evidence FOR the class").

Sign convention of the principal-component maps (eigencam, eigengradcam, --eigen-smooth): an SVD fixes a
singular vector only up to its sign, so the projection is flipped, per image, to correlate positively with
the channel sum of the tensor it projects (for eigencam: with the mean activation). That makes the maps
deterministic and, unlike an arbitrary sign, point at what the layer responds to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradcam_cli.cam.methods import MethodSpec
from gradcam_cli.model.layouts import Layout

GradientFn = Callable[..., Tensor]  # fn(A, G, eigen_smooth=False) -> (N, h, w)


@dataclass(frozen=True)
class EngineOptions:
    """What an engine's methods share for every batch: the model, `forward(x)` (its logits on another input,
    the hooks passing everything through), the score's sign (-1 with --counterfactual), --eigen-smooth, and
    `chunk_size`, the rows per forward of the methods' own passes."""

    model: nn.Module
    forward: Callable[[Tensor], Tensor]
    sign: float
    eigen_smooth: bool
    chunk_size: int


@dataclass(frozen=True)
class LayerContext:
    """One target layer of one batch: B images, T target slots, K channels, an (h, w) map.

    `activations` is the (B, K, h, w) view of what the layer gave, `raw` the tensor as hooked (its own
    layout: tokens or channels-last, see `layout`), `gradients` (B*T, K, h, w) when the method asked for
    layer gradients. `forward_replacing(x, output)` runs the model with this layer's output replaced.
    """

    name: str
    activations: Tensor
    raw: Tensor
    layout: Layout
    gradients: Tensor | None
    x: Tensor  # (B, 3, H, W)
    logits: Tensor  # (B, C), float32
    targets: Tensor  # (B, T)
    low_precision: bool  # logits came from autocast (--amp)
    options: EngineOptions
    forward_replacing: Callable[[Tensor, Tensor], Tensor]

    @property
    def repeated(self) -> Tensor:
        """The activations once per target slot: (B*T, K, h, w), image-major like `gradients`."""
        b, k, h, w = self.activations.shape
        t = self.targets.shape[1]
        return self.activations.unsqueeze(1).expand(b, t, k, h, w).reshape(b * t, k, h, w)


class CamMethod:
    """A method that needs more than (A, G): it gets the whole `LayerContext`. One instance per engine."""

    spec: MethodSpec

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec

    def layer_maps(self, ctx: LayerContext) -> Tensor:
        """(B*T, h, w) ReLU'd maps of one layer."""
        raise NotImplementedError

    def probe_passes(self, ctx: LayerContext) -> None:
        """Methods with passes of their own (`spec.extra_passes`): run the first chunk of them for the first
        image and throw the result away, so the start-up probe fails on what would fail every batch (a dtype
        under --amp, a head that rejects the layer's output) at the cost of one chunk, not the whole method."""

    def input_maps(self, input_grads: Tensor) -> Tensor | None:
        """Guided methods without a layer: (N, H, W) maps from the (N, 3, H, W) guided input gradients."""
        return None

    def picture(self, input_grads: Tensor, cams: Tensor | None) -> Tensor:
        """Guided methods: the (N, 3, H, W) high-resolution map saved under guided/, from the guided input
        gradients and, for a layer, its (N, h, w) maps."""
        raise NotImplementedError


class GradientMethod(CamMethod):
    """A Grad-CAM variant written as a plain function of (A, G)."""

    def __init__(self, spec: MethodSpec, fn: GradientFn) -> None:
        super().__init__(spec)
        self.fn = fn

    def layer_maps(self, ctx: LayerContext) -> Tensor:
        assert ctx.gradients is not None
        if ctx.options.eigen_smooth:
            return self.fn(ctx.repeated, ctx.gradients, eigen_smooth=True)
        return self.fn(ctx.repeated, ctx.gradients)


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


def channel_sum(elementwise: Tensor, eigen_smooth: bool) -> Tensor:
    """ReLU of the channel sum of (N, K, h, w), or of its first principal component."""
    return torch.relu(first_component(elementwise) if eigen_smooth else elementwise.sum(dim=1))


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den where den != 0, else 0 (no eps: an eps changes the result when the values are small)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def build_method(method: str | CamMethod | GradientFn) -> CamMethod:
    """A registered method's name, a CamMethod, or a custom gradient function fn(A, G) -> (N, h, w)."""
    from gradcam_cli.cam.methods import get_spec, implementation

    if isinstance(method, CamMethod):
        return method
    if isinstance(method, str):
        spec, impl = get_spec(method), implementation(method)
        return impl(spec) if isinstance(impl, type) else GradientMethod(spec, impl)
    name = getattr(method, "__name__", "custom")
    return GradientMethod(
        MethodSpec(name, "", "a custom gradient method", layer_grads=True, eigen_smooth=False), method
    )
