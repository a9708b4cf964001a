"""Per-batch evaluation during `explain`: the metric columns and the `--only-below` selection.

The batch loop makes two calls into an `Evaluator` (there is none when neither a metric nor --only-below is
asked for): `skip_confident` before the engine runs, and `add_columns` after the rows are made. The metrics
come in families (`PASSES`), each a `MetricPass` in a module of its own that measures a batch's maps
(`batch_maps`); this module groups a batch's maps by name, runs the passes that were asked for, times each
(`metric:<names>` in run.json's stages), and puts their values into the matching rows.

Every forward a pass makes goes through the model `metric_batch_size` images at a time, without autograd,
under the run's --amp and --channels-last settings; what each pass costs per map is in its docstring.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradcam_cli.audit.annotations import load_annotations
from gradcam_cli.audit.batch_maps import BatchContext, Files, LayerMaps, MetricPass, PassSetup
from gradcam_cli.audit.concentration import ConcentrationPass
from gradcam_cli.audit.faithfulness import PerturbationPass
from gradcam_cli.audit.groups import groups_source
from gradcam_cli.audit.localisation import AnnotationPass
from gradcam_cli.audit.random_logit import RandomLogitPass
from gradcam_cli.audit.randomization import RandomizationPass
from gradcam_cli.audit.road import RoadPass
from gradcam_cli.audit.sensitivity import SensitivityPass
from gradcam_cli.cam.engine import CamEngine, CamResult, run_batch
from gradcam_cli.config import Settings
from gradcam_cli.data.batches import Batch, subset_batch
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.forward import autocast, logits_of, split_on_oom
from gradcam_cli.model.labels import label_of
from gradcam_cli.model.loading import LoadedModel
from gradcam_cli.out.names import OutputNames
from gradcam_cli.out.table import Row

Rows = dict[int, list[Row]]

# every metric family, in the order they run on a batch (the cheap ones first)
PASSES: tuple[type[MetricPass], ...] = (
    ConcentrationPass,
    AnnotationPass,
    PerturbationPass,
    RandomLogitPass,
    RandomizationPass,
    SensitivityPass,
    RoadPass,
)


def audit_manifest(s: Settings, evaluator: Evaluator | None = None) -> dict[str, Any]:
    """The audit settings of a run for run.json, so that `gradcam audit`/`report` can tell how OUT was made;
    with the evaluator, also what each metric pass records about how it measured (seeds, layers, ...)."""
    passes: dict[str, Any] = {}
    if evaluator is not None:
        for metric_pass in evaluator.passes:
            passes.update(metric_pass.manifest())
    return {
        "metrics": list(s.metrics),
        "steps": s.steps,
        "baseline": s.baseline,
        "boxes": str(Path(s.boxes).resolve()) if s.boxes else None,
        "masks": str(Path(s.masks).resolve()) if s.masks else None,
        "groups": groups_source(s.groups) if s.groups else None,
        "group_min_count": s.group_min_count,
        "only_below": s.only_below,
        "sample_rate": s.sample_rate,
        "seed": s.seed,
        **passes,
    }


class Evaluator:
    """Metric columns and `--only-below` for one run; build with `Evaluator.create` (None when not needed)."""

    def __init__(self, setup: PassSetup) -> None:
        settings, loaded, device = setup.settings, setup.loaded, setup.device
        self.settings = settings
        self.model = loaded.model
        self.labels = list(loaded.labels)
        mean = torch.tensor(loaded.spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(loaded.spec.std, device=device).view(1, 3, 1, 1)
        self.black = (0.0 - mean) / std  # a black pixel, normalised
        self.metrics = tuple(settings.metrics)
        self.chunk = settings.metric_batch_size or 4 * settings.batch_size
        asked = set(self.metrics)
        self.passes: list[MetricPass] = [make(setup) for make in PASSES if asked & set(make.metrics)]
        self.stage_seconds = {"select": 0.0} if settings.only_below else {}
        self.stage_seconds["metrics"] = 0.0
        self.stage_seconds.update({self._stage(p): 0.0 for p in self.passes})

    def _stage(self, metric_pass: MetricPass) -> str:
        return "metric:" + "+".join(m for m in metric_pass.metrics if m in self.metrics)

    @staticmethod
    def create(
        settings: Settings,
        loaded: LoadedModel,
        rels: Sequence[str],
        device: torch.device,
        layers: Mapping[str, nn.Module] | None = None,
        outputs: OutputNames | None = None,
    ) -> Evaluator | None:
        """An evaluator for a run over images `rels`, or None when it needs none (no metrics, no --only-below).

        `layers` are the run's target layers by name, `outputs` its file names. Annotations are read and their
        labels resolved here, before anything runs: a typo is one line, exit 2.
        """
        if not settings.metrics and settings.only_below is None:
            return None
        annotations = None
        if settings.boxes or settings.masks:
            annotations = load_annotations(settings.boxes, settings.masks, loaded.labels)
            matched, annotated = annotations.matched(rels)
            if annotations.boxes and matched == 0 and annotations.masks is None:
                raise GradcamError(
                    f"--boxes {settings.boxes}: none of its {annotated} annotated paths matches an input image "
                    "(paths are relative to the INPUT folder, as in predictions.csv)"
                )
        return Evaluator(PassSetup(settings, loaded, dict(layers or {}), device, annotations, outputs))

    def forward(self, x: Tensor) -> Tensor:
        """Logits without autograd, as the run's forward (amp, channels_last); halves the chunk on device OOM."""

        def run(part: Tensor, start: int, stop: int) -> Tensor:
            with torch.no_grad(), autocast(part.device, self.settings.amp):
                if self.settings.channels_last:
                    part = part.contiguous(memory_format=torch.channels_last)
                return logits_of(self.model(part)).float()

        return split_on_oom(run, x, lambda parts: torch.cat(list(parts)))

    def _chunked_probs(self, x: Tensor) -> Tensor:
        return torch.cat([self.forward(x[i : i + self.chunk]) for i in range(0, x.shape[0], self.chunk)]).softmax(1)

    # -------------------------------------------------------------------------------------- --only-below

    def skip_confident(self, batch: Batch, x: Tensor, rows: Rows) -> Batch:
        """With --only-below P: a `skipped` row (with its prediction) for every image of `x` (the batch's
        normalised inputs) whose top-1 probability is >= P, and the batch of the others for the engine.

        So a confident image costs one plain forward and no backward, rendering or files.
        """
        threshold = self.settings.only_below
        if threshold is None:
            return batch
        t0 = time.perf_counter()
        top_p, top_i = self._chunked_probs(x).max(dim=1)
        keep = (top_p < threshold).tolist()
        top_p_l, top_i_l = top_p.tolist(), top_i.tolist()
        for pos, (index, rel) in enumerate(zip(batch.indices, batch.rels, strict=True)):
            if not keep[pos]:
                reason = f"top-1 probability {top_p_l[pos]:.4f} >= --only-below {threshold:g}"
                pred = (top_i_l[pos], label_of(self.labels, top_i_l[pos]), top_p_l[pos])
                rows[index] = [Row.skipped(rel, reason, pred, self.settings.method)]
        self.stage_seconds["select"] += time.perf_counter() - t0
        return subset_batch(batch, [pos for pos, k in enumerate(keep) if k])

    # ------------------------------------------------------------------------------------------ metrics

    def add_columns(self, batch: Batch, x: Tensor, result: CamResult, rows: Rows, engine: CamEngine) -> Files:
        """Compute every asked metric for every (image, target, map) of the batch, write the values into the
        matching `ok` rows (by image, map name and target index), and return the files passes want written.

        `engine` (inside its `with` block) lets a pass explain the batch again: other classes, other weights,
        noisy inputs."""
        if not self.passes:
            return []
        t0 = time.perf_counter()
        layers = self._layer_maps(batch, x, result, rows)
        ctx = BatchContext(self.settings, batch, x, result, self.black, self.chunk, self.forward, self._explain(engine))
        for metric_pass in self.passes if layers else []:
            t_pass = time.perf_counter()
            metric_pass.measure(ctx, layers)
            self.stage_seconds[self._stage(metric_pass)] += time.perf_counter() - t_pass
        lookup = {
            (batch.indices[pos], maps.name, cls): value
            for maps in layers
            for pos, cls, value in zip(maps.image_of.tolist(), maps.classes.tolist(), maps.values, strict=True)
        }
        for index in batch.indices:
            for row in rows.get(index, []):
                if row.status == "ok":
                    row.metrics.update(lookup.get((index, row.layer, int(row.target_index)), {}))
        self.stage_seconds["metrics"] += time.perf_counter() - t0
        return ctx.files

    @staticmethod
    def _layer_maps(batch: Batch, x: Tensor, result: CamResult, rows: Rows) -> list[LayerMaps]:
        """The batch's maps that have an `ok` row, grouped by map name; a class asked for twice is measured once."""
        found: dict[str, list[tuple[int, int, int]]] = {}  # name -> (position in batch, slot, class)
        for pos, index in enumerate(batch.indices):
            if not rows.get(index) or rows[index][0].status != "ok":
                continue
            wanted = {(row.layer, int(row.target_index)) for row in rows[index]}
            for name in result.cams:
                seen: set[int] = set()
                for t, cls in enumerate(result.targets[pos].tolist()):
                    if cls not in seen and (name, cls) in wanted:
                        seen.add(cls)
                        found.setdefault(name, []).append((pos, t, cls))
        size = (int(x.shape[2]), int(x.shape[3]))
        layers = []
        for name, entries in found.items():
            pos_t, slot_t, cls_t = torch.tensor(entries, device=x.device).unbind(dim=1)
            cams = result.cams[name][pos_t, slot_t]  # (m, h', w')
            layers.append(LayerMaps(name, cams, pos_t, slot_t, cls_t, [batch.rels[e[0]] for e in entries], size))
        return layers

    def _explain(self, engine: CamEngine) -> Callable[[Tensor, Tensor], CamResult]:
        """The run's method again on `x` for fixed (B, T) target classes, under --amp, halving on device OOM."""

        def explain(x: Tensor, targets: Tensor) -> CamResult:
            return run_batch(engine, x, lambda start, stop: lambda logits: targets[start:stop], self.settings.amp)

        return explain
