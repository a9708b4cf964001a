"""Activation layouts: where the positions are in a layer's output, and its (B, C, h, w) view for Grad-CAM.

CNN layers give channels-first maps (B, C, h, w). Swin and ConvNeXt blocks compute channels-last (B, h, w, C),
and ViT-style transformers emit token sequences (B, N, C) whose first N - h*w tokens (class, distillation or
register tokens) have no position while the rest are patches in row-major order: token i sits at row i // w,
column i % w of the grid. Grad-CAM wants the channels-first view of the activations and of their gradients;
the view only selects and permutes entries, so the view of the gradient is exactly the gradient of the view.

The layout is inferred from the output's shape and the actual input size, never from a fixed 14x14: two dims
(a, b) form a plausible grid of an H x W input when one stride s maps H to a and W to b, within the +-1 that
padding and rounding produce. A model's patch size and prefix-token count, when it declares them
(torchvision's ViT `patch_size`/`class_token`, timm's `patch_embed.patch_size`/`num_prefix_tokens`), decide
token grids exactly; otherwise the grid is the factorisation of the token count that matches the input's shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradcam_cli.errors import GradcamError

MAX_PREFIX_TOKENS = 8  # class + distillation + register tokens seen in practice stay well below this


@dataclass(frozen=True)
class Layout:
    """How one layer's output maps onto a spatial grid.

    kind: `nchw` (B, C, h, w), `nhwc` (B, h, w, C) or `tokens` (B, prefix + h*w, C).
    """

    kind: str
    grid: tuple[int, int]
    prefix: int = 0

    def to_nchw(self, t: Tensor) -> Tensor:
        """The (B, C, h, w) view of an activation (or its gradient) laid out like this."""
        if self.kind == "nchw":
            return t
        if self.kind == "nhwc":
            return t.permute(0, 3, 1, 2)
        h, w = self.grid
        if t.dim() != 3 or t.shape[1] != self.prefix + h * w:
            raise GradcamError(
                f"token activations {tuple(t.shape)} do not fit the {h}x{w} grid + {self.prefix} prefix tokens "
                "inferred from the input size"
            )
        return t[:, self.prefix :, :].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)

    @property
    def area(self) -> int:
        return self.grid[0] * self.grid[1]

    def describe(self) -> str:
        """A short phrase for `gradcam layers` and run logs."""
        h, w = self.grid
        if self.kind == "nhwc":
            return f"channels-last {h}x{w} map, transposed to channels-first"
        if self.kind == "tokens":
            dropped = f", first {self.prefix} token{'s' if self.prefix > 1 else ''} (class/prefix) dropped"
            return f"tokens as a {h}x{w} grid{dropped if self.prefix else ''}"
        return f"{h}x{w} map"


@dataclass(frozen=True)
class TokenHint:
    """What a model says about its tokens: patch size (ph, pw) and how many prefix tokens precede the patches."""

    patch: tuple[int, int] | None = None
    prefix: int | None = None


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return (int(value[0]), int(value[1]))
    return None


def token_hint(model: nn.Module) -> TokenHint:
    """Read patch size and prefix-token count from the attributes torchvision and timm models carry."""
    patch = _pair(getattr(model, "patch_size", None))
    embed = getattr(model, "patch_embed", None)
    if patch is None and embed is not None:
        patch = _pair(getattr(embed, "patch_size", None))
    prefix = getattr(model, "num_prefix_tokens", None)
    if not isinstance(prefix, int) or isinstance(prefix, bool) or prefix < 0:
        prefix = None
    if prefix is None and isinstance(getattr(model, "class_token", None), Tensor):
        prefix = 1  # torchvision's VisionTransformer: one class token, always first
    return TokenHint(patch=patch, prefix=prefix)


def plausible_grid(h: int, w: int, input_hw: tuple[int, int]) -> bool:
    """Whether (h, w) can be an H x W input seen through one stride s (h ~ H / s and w ~ W / s, +-1)."""
    height, width = input_hw
    if h < 1 or w < 1:
        return False
    lo = max(height / (h + 1), width / (w + 1))
    hi = min(height / (h - 1) if h > 1 else math.inf, width / (w - 1) if w > 1 else math.inf)
    return lo < hi


def _token_grid(n: int, input_hw: tuple[int, int], hint: TokenHint) -> tuple[tuple[int, int], int] | None:
    """(grid, prefix) for n tokens, or None when no grid of this input explains n."""
    if hint.patch is not None:
        grid = (input_hw[0] // hint.patch[0], input_hw[1] // hint.patch[1])
        prefix = n - grid[0] * grid[1]
        if (hint.prefix is None and 0 <= prefix <= MAX_PREFIX_TOKENS) or prefix == hint.prefix:
            return grid, prefix
    prefixes = [hint.prefix] if hint.prefix is not None else []
    prefixes += [k for k in range(MAX_PREFIX_TOKENS + 1) if k not in prefixes]
    target = math.log(input_hw[0] / input_hw[1])
    for prefix in prefixes:
        m = n - prefix
        if m < 2:
            continue
        pairs = [(h, m // h) for h in range(1, m + 1) if m % h == 0 and plausible_grid(h, m // h, input_hw)]
        if pairs:
            return min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1]) - target)), prefix
    return None


def infer_layout(
    shape: tuple[int, ...], input_hw: tuple[int, int], hint: TokenHint | None = None, strict: bool = True
) -> Layout | None:
    """The layout of an output of `shape` for an input of `input_hw` (H, W); None when it has no positions.

    A 4-D output is channels-first when its last two dims form a grid of the input, else channels-last when
    its middle two do. When neither does (an adaptive pool's fixed 7x7 of a non-square input, a transformer's
    window partition), `strict` says it has no layout, which keeps such tensors out of auto-detection;
    `strict=False` reads it as channels-first, as the engine always did for a layer the user chose.
    3-D outputs are tokens when a grid of the input explains their count.
    """
    if len(shape) == 4:
        if plausible_grid(shape[2], shape[3], input_hw):
            return Layout("nchw", (shape[2], shape[3]))
        if plausible_grid(shape[1], shape[2], input_hw):
            return Layout("nhwc", (shape[1], shape[2]))
        return None if strict else Layout("nchw", (shape[2], shape[3]))
    if len(shape) == 3:
        found = _token_grid(shape[1], input_hw, hint or TokenHint())
        if found is not None:
            return Layout("tokens", found[0], found[1])
    return None


def output_shape(output: object) -> tuple[int, ...] | None:
    """The shape of a module output when it is one tensor (tuples and dicts have no single layout)."""
    return tuple(output.shape) if isinstance(output, torch.Tensor) else None
