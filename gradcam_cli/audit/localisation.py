"""Localisation against annotations: the pointing game and energy-in-box.

Measured on each map at the original image size, as its heatmap is saved (`render.heatmap.upsample_normalize`);
no forward. A map whose class has no annotation on its image is left empty, as the pointing game excludes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradcam_cli.audit import measures as M
from gradcam_cli.audit.annotations import Annotations, read_mask
from gradcam_cli.audit.batch_maps import BatchContext, LayerMaps, MetricPass, PassSetup
from gradcam_cli.render.heatmap import upsample_normalize


class AnnotationPass(MetricPass):
    metrics = ("pointing", "energy")

    def __init__(self, setup: PassSetup) -> None:
        super().__init__(setup)
        self.annotations: Annotations | None = setup.annotations

    def measure(self, ctx: BatchContext, layers: Sequence[LayerMaps]) -> None:
        assert self.annotations is not None
        batch = ctx.batch
        masks: dict[int, Tensor | None] = {}
        for maps in layers:
            for k, (pos, cls) in enumerate(zip(maps.image_of.tolist(), maps.classes.tolist(), strict=True)):
                rel, size = batch.rels[pos], batch.sizes[pos]
                boxes = self.annotations.boxes_for(rel, cls)
                if pos not in masks:
                    path = self.annotations.mask_path(rel)
                    masks[pos] = None if path is None else torch.from_numpy(read_mask(path, size)).to(ctx.x.device)
                mask = masks[pos]
                if not boxes and mask is None:
                    continue  # nothing annotated for this class: excluded, as in the pointing game
                heat = upsample_normalize(maps.cams[k], size, batch.boxes[pos])
                box_t = torch.tensor([[b.x0, b.y0, b.x1, b.y1] for b in boxes], device=ctx.x.device).view(-1, 4)
                if "pointing" in self.asked:
                    hit = M.pointing_hit(heat, box_t, mask)
                    maps.values[k]["pointing_hit"] = "" if hit is None else str(hit)
                if "energy" in self.asked:
                    region = M.box_region(box_t, size)
                    if mask is not None:
                        region = region | mask
                    maps.values[k]["energy_in_box"] = f"{M.energy_in_region(heat, region):.6f}"
