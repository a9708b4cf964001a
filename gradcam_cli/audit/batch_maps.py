"""What a metric pass is given for one batch, and the shape every pass has.

A batch's explained maps are grouped by map name (a layer, the fused map, or `input`): `LayerMaps` holds the m
maps of one name that have an `ok` row, with the image each explains (`image_of`, its position in the batch),
its target slot and class. `BatchContext` holds what they came from (the normalised inputs, the engine's
result) and the two ways a pass may call the model again: `forward` (logits, no autograd) and `explain` (the
run's method again, on other inputs or with other fixed target classes, through the same hooks).

A pass (`MetricPass`) writes CSV values into `LayerMaps.values`, one dict per map, keyed by column name. Passes
run one after the other on the same batch; each is timed on its own (`metric:<name>` in run.json's stages).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from gradcam_cli.audit import measures as M
from gradcam_cli.audit.annotations import Annotations
from gradcam_cli.cam.engine import CamResult
from gradcam_cli.config import Settings
from gradcam_cli.data.batches import Batch
from gradcam_cli.model.loading import LoadedModel
from gradcam_cli.out.names import OutputNames
from gradcam_cli.out.writer import Encoder

Forward = Callable[[Tensor], Tensor]
# (x (B, 3, h, w), fixed targets (B, T)) -> the engine's result for those classes, under the run's --amp
Explain = Callable[[Tensor, Tensor], CamResult]
Files = list[tuple[str, Encoder]]


@dataclass
class LayerMaps:
    """The m measured maps of one map name in a batch.

    cams: (m, h', w') as the method made them (layer resolution; the input's for `input`); image_of, slots,
    classes: (m,) long, the image's position in the batch, its target slot in `CamResult.targets`, the class;
    rels: the image paths; input_size: the model input's (h, w); values: what the passes write, one per map.
    """

    name: str
    cams: Tensor
    image_of: Tensor
    slots: Tensor
    classes: Tensor
    rels: list[str]
    input_size: tuple[int, int]
    values: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.values:
            self.values = [{} for _ in self.rels]

    @cached_property
    def saliency(self) -> Tensor:
        """(m, h, w) maps at the model-input size, min-max normalised to [0, 1] (`measures.input_maps`): the maps
        every input-space metric reads, so that they measure what the heatmaps show."""
        return M.input_maps(self.cams, self.input_size)

    def pick(self, result: CamResult) -> Tensor:
        """This set's maps out of another result of the same batch (same slots): (m, h', w')."""
        return result.cams[self.name][self.image_of, self.slots]

    def put(self, column: str, numbers: Sequence[float | None], digits: int = 6) -> None:
        """Write one value per map into column `column` (None leaves the cell empty)."""
        for slot, value in zip(self.values, numbers, strict=True):
            if value is not None:
                slot[column] = f"{value:.{digits}f}"


@dataclass
class BatchContext:
    """One batch as the passes see it. `x` (B, 3, h, w) normalised inputs; `black` (1, 3, 1, 1) a black pixel,
    normalised; `chunk` images per forward in metric passes (--metric-batch-size); `files` collects what a pass
    wants written to OUT (paths relative to OUT, written with the batch's rows)."""

    settings: Settings
    batch: Batch
    x: Tensor
    result: CamResult
    black: Tensor
    chunk: int
    forward: Forward
    explain: Explain
    files: Files = field(default_factory=list)


@dataclass(frozen=True)
class PassSetup:
    """What a pass may prepare itself from, once per run: the settings, the model as loaded (module, labels,
    preprocessing), its target layers by name, the compute device, the annotations (pointing/energy), and
    the output names (for files of its own, such as randomization curves)."""

    settings: Settings
    loaded: LoadedModel
    layers: Mapping[str, nn.Module]
    device: torch.device
    annotations: Annotations | None
    outputs: OutputNames | None


class MetricPass:
    """One family of metrics: the `--metrics` names it serves (known before it is built, so a family that was
    not asked for costs nothing), its per-batch measurement, and what run.json's `audit` block records about
    how it measured (seeds, re-initialised layers, ...). A family prepares what it needs once, from the setup."""

    metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, setup: PassSetup) -> None:
        self.asked = set(setup.settings.metrics)

    def measure(self, ctx: BatchContext, layers: Sequence[LayerMaps]) -> None:
        raise NotImplementedError

    def manifest(self) -> dict[str, Any]:
        return {}
