"""Ablation-CAM (Desai & Ramaswamy 2020): channel weights from the score drop when the channel is removed.

w_k = (y - y_k) / |y|, y the target score and y_k the score with channel k of the layer set to 0; map =
ReLU(sum_k w_k A_k). The paper divides by y; we divide by |y| so that a negative score does not flip every
weight's sign (a channel whose removal lowers the score always counts as evidence for the class); y = 0
divides by 1. Only the part of the model after the layer does real work: the ablated activations replace
the layer's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from gradcam_cli.cam.methods import MethodSpec
from gradcam_cli.cam.methods.base import CamMethod, LayerContext, weighted_sum
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.forward import split_on_oom
from gradcam_cli.model.layouts import Layout

# ways to run the part of the model before the target layer, cheapest first (see AblationCam.head)
PREFIXES: tuple[str, ...] = ("single", "small", "full")


def ablationcam(activations: Tensor, base: Tensor, ablated: Tensor, eigen_smooth: bool = False) -> Tensor:
    """base (N,) target scores, ablated (N, K) scores without channel k, A (N, K, h, w) -> (N, h, w)."""
    scale = torch.where(base != 0, base.abs(), torch.ones_like(base))
    return weighted_sum((base[:, None] - ablated) / scale[:, None], activations, eigen_smooth)


def zero_channels(batch: Tensor, layout: Layout, rows: Tensor, channels: Tensor) -> None:
    """In place: batch[rows[j]] gets channel channels[j] set to 0 at every position, in the layer's layout
    (token layouts: the patch tokens, not the class/prefix tokens, which have no position)."""
    if layout.kind == "nchw":
        batch[rows, channels] = 0
    elif layout.kind == "nhwc":
        batch[rows, :, :, channels] = 0
    else:
        batch[rows, layout.prefix :, channels] = 0


class AblationCam(CamMethod):
    def __init__(self, spec: MethodSpec) -> None:
        super().__init__(spec)
        self.prefix = PREFIXES[0]  # moves down PREFIXES when a cheaper way fails for this model

    def layer_maps(self, ctx: LayerContext) -> Tensor:
        b, k = ctx.activations.shape[:2]
        t = ctx.targets.shape[1]
        base, ablated = self.scores(ctx)
        sign, smooth = ctx.options.sign, ctx.options.eigen_smooth
        return ablationcam(ctx.repeated, sign * base.flatten(), sign * ablated.reshape(b * t, k), smooth)

    def scores(self, ctx: LayerContext) -> tuple[Tensor, Tensor]:
        """(B, T) target scores and (B, T, K) scores with each channel of the layer set to zero.

        Rows per image: one intact control, then one per ablated channel, `chunk_size` at a time, in the
        layer's own layout (`raw`).
        """
        b, t = ctx.targets.shape
        k = ctx.layout.to_nchw(ctx.raw[:1]).shape[1]
        base = torch.empty(b, t, device=ctx.raw.device)
        ablated = torch.empty(b, k, t, device=ctx.raw.device)
        for i in range(b):
            for start in range(0, k + 1, ctx.options.chunk_size):
                rows, scores = self._chunk(ctx, i, start, k)
                ablate = rows > 0
                if start == 0:
                    base[i] = scores[0]
                ablated[i, rows[ablate] - 1] = scores[ablate]
        return base, ablated.transpose(1, 2)

    def probe_passes(self, ctx: LayerContext) -> None:
        """The first chunk of image 0; the way found for the head is forgotten (the probe's input is blank)."""
        prefix = self.prefix
        try:
            self._chunk(ctx, 0, 0, ctx.layout.to_nchw(ctx.raw[:1]).shape[1])
        finally:
            self.prefix = prefix

    def _chunk(self, ctx: LayerContext, i: int, start: int, k: int) -> tuple[Tensor, Tensor]:
        """Rows start.. of image i (row 0 the intact control, row r > 0 channel r - 1 zeroed) and their (n, T)
        target scores. On device OOM the rows are halved (`split_on_oom`), not the way the head is run."""
        raw, targets = ctx.raw, ctx.targets
        rows = torch.arange(start, min(start + ctx.options.chunk_size, k + 1), device=raw.device)
        batch = raw[i : i + 1].expand(len(rows), *raw.shape[1:]).clone()
        ablate = rows > 0
        zero_channels(batch, ctx.layout, ablate.nonzero()[:, 0], rows[ablate] - 1)
        xi = ctx.x[i : i + 1]
        expected = ctx.logits[i] if start == 0 else None

        def head(part: Tensor, first: int, stop: int) -> Tensor:
            return self.head(ctx, xi, part, expected if first == 0 else None).float()

        out = split_on_oom(head, batch, lambda parts: torch.cat(list(parts)))
        return rows, out.gather(1, targets[i : i + 1].expand(len(rows), targets.shape[1]))

    def head(self, ctx: LayerContext, xi: Tensor, batch: Tensor, expected: Tensor | None) -> Tensor:
        """Logits of the model with the layer's output replaced by `batch` (n rows); xi (1, 3, H, W).

        What runs before the layer is thrown away, so it is run as cheaply as the model allows, trying in turn
        (PREFIXES): `single`, one reduced-size copy of the image (the head broadcasts nothing from before the
        layer); `small`, n reduced-size copies (models that reshape with the input's batch size); `full`, n
        full-size copies, which is always exact. A way is kept while its output has n rows and the control
        row (`expected`, the intact activations) reproduces the model's logits (to bf16/fp16 rounding under
        --amp); a skip connection around the layer, or a model that needs its input size, fails that and moves
        to the next way. Running out of device memory is no reason to move: it goes to the caller's splitter.
        """
        n = batch.shape[0]
        while self.prefix != "full":
            side = (max(32, xi.shape[-2] // 8), max(32, xi.shape[-1] // 8))
            small = F.interpolate(xi, size=(min(side[0], xi.shape[-2]), min(side[1], xi.shape[-1])), mode="area")
            feed = small if self.prefix == "single" else small.expand(n, *small.shape[1:])
            try:
                out = ctx.forward_replacing(feed, batch)
                ok = out.dim() == 2 and out.shape[0] == n
                if ok and expected is not None:
                    scale = max(1.0, float(expected.abs().max()))
                    tol = 3e-2 if ctx.low_precision else 1e-4  # bf16/fp16 logits carry ~3 significant digits
                    ok = torch.allclose(out[0].float(), expected, rtol=tol, atol=tol * scale)
                if ok:
                    return out
            except torch.cuda.OutOfMemoryError:
                raise
            except (RuntimeError, ValueError, AssertionError, IndexError, GradcamError):
                pass
            self.prefix = PREFIXES[PREFIXES.index(self.prefix) + 1]
        return ctx.forward_replacing(xi.expand(n, *xi.shape[1:]), batch)
