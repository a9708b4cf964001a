"""Faithfulness by perturbation: deletion and insertion AUC, Average Drop and Increase in Confidence.

The maths is in `measures` (RISE's deletion/insertion curves, Grad-CAM++'s drop/increase); this pass feeds it a
batch's input-size maps. Cost per batch of M maps over B images, with S = --steps: deletion + insertion
M * 2 * (S - 1) + B forwards (the image's own probability is the engine's, the baseline is shared by an
image's maps); drop: M forwards. No backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gradcam_cli.audit import measures as M
from gradcam_cli.audit.batch_maps import BatchContext, LayerMaps, MetricPass


class PerturbationPass(MetricPass):
    metrics = ("deletion", "insertion", "drop")

    def measure(self, ctx: BatchContext, layers: Sequence[LayerMaps]) -> None:
        modes = tuple(m for m in M.PERTURBATION_MODES if m in self.asked)
        base = M.baseline_images(ctx.x, ctx.settings.baseline, ctx.black) if modes else None
        for maps in layers:
            if modes and base is not None:
                curves = M.perturbation_curves(
                    ctx.forward,
                    ctx.x,
                    base,
                    maps.saliency,
                    maps.image_of,
                    maps.classes,
                    ctx.settings.steps,
                    modes=modes,
                    chunk=ctx.chunk,
                    p_image=ctx.result.probs,
                )
                for mode in modes:
                    maps.put(f"{mode}_auc", M.auc(curves[mode]).tolist())
            if "drop" in self.asked:
                self._drop(ctx, maps)

    @staticmethod
    def _drop(ctx: BatchContext, maps: LayerMaps) -> None:
        """Average Drop % and Increase in Confidence: the image times its [0, 1] map, one forward per map."""
        p_full = ctx.result.probs[maps.image_of, maps.classes].float()
        masked_p = []
        for i in range(0, maps.saliency.shape[0], ctx.chunk):
            part = slice(i, i + ctx.chunk)
            masked = M.masked_by_saliency(ctx.x[maps.image_of[part]], maps.saliency[part], ctx.black)
            p = ctx.forward(masked).softmax(dim=1)
            masked_p.append(p[torch.arange(p.shape[0], device=p.device), maps.classes[part]])
        p_masked = torch.cat(masked_p)
        maps.put("avg_drop", M.average_drop(p_full, p_masked).tolist(), digits=4)
        for slot, inc in zip(maps.values, M.increase_in_confidence(p_full, p_masked).tolist(), strict=True):
            slot["increase"] = str(inc)
