"""Random logit (Sixt, Granz & Landgraf, "When Explanations Lie", ICML 2020; Quantus `RandomLogit`): is the map
of the explained class different from the map of another class?

Per map of class c: SSIM(map of c, map of c'), c' a random class other than c, both at the model-input size in
[0, 1] (`LayerMaps.saliency`, `measures.input_maps`), SSIM with scikit-image's defaults and data_range 1
(`map_similarity.ssim`). Lower is better: a map that looks the same whatever class it is asked for is not
class-specific. SSIM is defined for constant maps too (two all-zero maps score 1), so every map gets a value.

The other class: r drawn uniformly from 0..C-2, c' = r if r < c else r + 1 (uniform over the C - 1 other
classes, the way Quantus indexes the classes left after removing c). r is the draw of the image's target slot
t from `torch.Generator().manual_seed(seed + crc32(path))`: draws t = 0, 1, ... in order, path as in the CSV,
so the class depends on the image, the slot and --seed only, never on which images share a batch.

Cost per batch: one explain (the run's method, forward and backward) for all the batch's maps.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradcam_cli.audit import measures as M
from gradcam_cli.audit.batch_maps import BatchContext, Explain, LayerMaps, MetricPass, PassSetup
from gradcam_cli.audit.map_similarity import ssim


def other_class(rel: str, slot: int, cls: int, num_classes: int, seed: int) -> int:
    """A class other than `cls`, uniform over the other num_classes - 1, drawn for image `rel`'s target `slot`."""
    generator = torch.Generator().manual_seed(seed + zlib.crc32(rel.encode("utf-8")))
    r = int(torch.randint(0, num_classes - 1, (slot + 1,), generator=generator)[slot])
    return r if r < cls else r + 1


def other_classes(maps: LayerMaps, num_classes: int, seed: int) -> Tensor:
    """(m,) long: `other_class` of each map of the set."""
    drawn = [
        other_class(rel, slot, cls, num_classes, seed)
        for rel, slot, cls in zip(maps.rels, maps.slots.tolist(), maps.classes.tolist(), strict=True)
    ]
    return torch.tensor(drawn, dtype=torch.long, device=maps.classes.device)


def random_logit_values(
    explain: Explain, x: Tensor, targets: Tensor, layers: Sequence[LayerMaps], others: Sequence[Tensor]
) -> list[Tensor]:
    """Per map set, (m,) SSIM of each map with the map of its other class `others[i]` (m,), from one explain of
    `x` with each map's slot of `targets` (B, T) set to its other class."""
    swapped = targets.clone()
    for maps, other in zip(layers, others, strict=True):
        swapped[maps.image_of, maps.slots] = other.to(swapped.device)
    result = explain(x, swapped)
    return [ssim(maps.saliency, M.input_maps(maps.pick(result), maps.input_size)) for maps in layers]


class RandomLogitPass(MetricPass):
    metrics = ("random_logit",)

    def __init__(self, setup: PassSetup) -> None:
        super().__init__(setup)
        self.seed = setup.settings.seed

    def manifest(self) -> dict[str, Any]:
        rule = "r = randint(0, C - 1) from torch.Generator().manual_seed(seed + crc32(path)), slot t's draw"
        return {"random_logit": {"seed": self.seed, "other_class": rule + "; c' = r + (r >= c)"}}

    def measure(self, ctx: BatchContext, layers: Sequence[LayerMaps]) -> None:
        num_classes = int(ctx.result.logits.shape[1])
        if num_classes < 2:  # no other class to draw: the column stays empty
            return
        others = [other_classes(maps, num_classes, self.seed) for maps in layers]
        values = random_logit_values(ctx.explain, ctx.x, ctx.result.targets, layers, others)
        for maps, value in zip(layers, values, strict=True):
            maps.put("random_logit", value.tolist())
