"""Per-batch evaluation during `explain`: the metric columns and the `--only-below` selection.

The batch loop makes two calls into an `Evaluator` (there is none when neither a metric nor --only-below is
asked for): `skip_confident` before the engine runs, and `add_columns` after the rows are made. The maths is
in `measures` (pure tensor functions); this module feeds it a batch's inputs, CAMs and annotations, and turns
the results into CSV values.

Costs, per batch of B images, T targets and L layers (M = B*T*L maps), with S = `steps`:
deletion + insertion: M * 2 * (S - 1) + B forwards (the image's own probability comes from the engine's
forward, the baseline is shared by an image's maps); drop: M forwards; pointing/energy: no forward (one
upsampling to the original size per map). The forwards go through the model `metric_batch_size` images at a
time, without autograd, under the run's --amp and --channels-last settings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gradcam_cli.audit import measures as M
from gradcam_cli.audit.annotations import Annotations, load_annotations, read_mask
from gradcam_cli.audit.metrics import metric_columns
from gradcam_cli.cam.engine import CamResult
from gradcam_cli.config import Settings
from gradcam_cli.data.batches import Batch, subset_batch
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.forward import autocast, logits_of, split_on_oom
from gradcam_cli.model.labels import label_of
from gradcam_cli.model.loading import LoadedModel
from gradcam_cli.out.table import Row
from gradcam_cli.render.heatmap import upsample_normalize

Rows = dict[int, list[Row]]


def audit_manifest(s: Settings) -> dict[str, Any]:
    """The audit settings of a run for run.json, so that `gradcam audit`/`report` can tell how OUT was made."""
    return {
        "metrics": list(s.metrics),
        "steps": s.steps,
        "baseline": s.baseline,
        "boxes": str(Path(s.boxes).resolve()) if s.boxes else None,
        "masks": str(Path(s.masks).resolve()) if s.masks else None,
        "only_below": s.only_below,
        "sample_rate": s.sample_rate,
    }


class Evaluator:
    """Metric columns and `--only-below` for one run; build with `Evaluator.create` (None when not needed)."""

    def __init__(
        self, settings: Settings, loaded: LoadedModel, device: torch.device, annotations: Annotations | None
    ) -> None:
        self.settings = settings
        self.model = loaded.model
        self.labels = list(loaded.labels)
        mean = torch.tensor(loaded.spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(loaded.spec.std, device=device).view(1, 3, 1, 1)
        self.black = (0.0 - mean) / std  # a black pixel, normalised
        self.annotations = annotations
        self.metrics = tuple(settings.metrics)
        self.columns = metric_columns(self.metrics)
        self.chunk = settings.metric_batch_size or 4 * settings.batch_size
        self.stage_seconds = {"select": 0.0, "metrics": 0.0} if settings.only_below else {"metrics": 0.0}

    @staticmethod
    def create(settings: Settings, loaded: LoadedModel, rels: Sequence[str], device: torch.device) -> Evaluator | None:
        """An evaluator for a run over images `rels`, or None when it needs none (no metrics, no --only-below).

        Annotations are read and their labels resolved here, before anything runs: a typo is one line, exit 2.
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
        return Evaluator(settings, loaded, device, annotations)

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

    def add_columns(self, batch: Batch, x: Tensor, result: CamResult, rows: Rows) -> None:
        """Compute every asked metric for every (image, target, layer) map of the batch and write the values
        into the matching `ok` rows (matched by image, layer and target index)."""
        if not self.metrics:
            return
        t0 = time.perf_counter()
        maps: list[tuple[int, str, int, int]] = []  # (position in batch, layer, slot, class)
        for pos, index in enumerate(batch.indices):
            if not rows.get(index) or rows[index][0].status != "ok":
                continue
            wanted = {(row.layer, int(row.target_index)) for row in rows[index]}
            for name in result.cams:
                seen: set[int] = set()
                for t, cls in enumerate(result.targets[pos].tolist()):
                    if cls in seen or (name, cls) not in wanted:
                        continue
                    seen.add(cls)
                    maps.append((pos, name, t, cls))
        if not maps:
            return
        values: list[dict[str, str]] = [{} for _ in maps]
        by_layer: dict[str, list[int]] = {}
        for j, (_pos, name, _t, _cls) in enumerate(maps):
            by_layer.setdefault(name, []).append(j)
        perturbs = any(m in self.metrics for m in M.PERTURBATION_MODES)
        base = M.baseline_images(x, self.settings.baseline, self.black) if perturbs else None
        for name, js in by_layer.items():
            pos_t = torch.tensor([maps[j][0] for j in js], device=x.device)
            slot_t = torch.tensor([maps[j][2] for j in js], device=x.device)
            cls_t = torch.tensor([maps[j][3] for j in js], device=x.device)
            cams = result.cams[name][pos_t, slot_t]  # (m, h', w')
            self._input_metrics(x, base, cams, pos_t, cls_t, result.probs, [values[j] for j in js])
            if "pointing" in self.metrics or "energy" in self.metrics:
                self._annotation_metrics(batch, cams, [maps[j] for j in js], [values[j] for j in js])
        lookup = {(batch.indices[pos], name, cls): values[j] for j, (pos, name, _t, cls) in enumerate(maps)}
        for index in batch.indices:
            for row in rows.get(index, []):
                if row.status == "ok":
                    row.metrics.update(lookup.get((index, row.layer, int(row.target_index)), {}))
        self.stage_seconds["metrics"] += time.perf_counter() - t0

    def _input_metrics(
        self,
        x: Tensor,
        base: Tensor | None,
        cams: Tensor,
        image_of: Tensor,
        classes: Tensor,
        probs: Tensor,
        out: list[dict[str, str]],
    ) -> None:
        """deletion/insertion AUC and drop/increase, on maps at the model-input resolution."""
        saliency = M.input_maps(cams, (x.shape[2], x.shape[3]))
        modes = tuple(m for m in M.PERTURBATION_MODES if m in self.metrics)
        if modes and base is not None:
            curves = M.perturbation_curves(
                self.forward,
                x,
                base,
                saliency,
                image_of,
                classes,
                self.settings.steps,
                modes=modes,
                chunk=self.chunk,
                p_image=probs,
            )
            for mode in modes:
                for slot, value in zip(out, M.auc(curves[mode]).tolist(), strict=True):
                    slot[f"{mode}_auc"] = f"{value:.6f}"
        if "drop" in self.metrics:
            p_full = probs[image_of, classes].float()
            masked_p = []
            for i in range(0, saliency.shape[0], self.chunk):
                masked = M.masked_by_saliency(x[image_of[i : i + self.chunk]], saliency[i : i + self.chunk], self.black)
                p = self.forward(masked).softmax(dim=1)
                masked_p.append(p[torch.arange(p.shape[0], device=p.device), classes[i : i + self.chunk]])
            p_masked = torch.cat(masked_p)
            drops = M.average_drop(p_full, p_masked).tolist()
            increases = M.increase_in_confidence(p_full, p_masked).tolist()
            for slot, drop, inc in zip(out, drops, increases, strict=True):
                slot["avg_drop"] = f"{drop:.4f}"
                slot["increase"] = str(inc)

    def _annotation_metrics(
        self, batch: Batch, cams: Tensor, maps: list[tuple[int, str, int, int]], out: list[dict[str, str]]
    ) -> None:
        """pointing hit and energy-in-box, on the map at the original image size, as the heatmap is saved."""
        assert self.annotations is not None
        masks: dict[int, Tensor | None] = {}
        for k, (pos, _name, _t, cls) in enumerate(maps):
            rel = batch.rels[pos]
            size = batch.sizes[pos]
            boxes = self.annotations.boxes_for(rel, cls)
            if pos not in masks:
                path = self.annotations.mask_path(rel)
                masks[pos] = torch.from_numpy(read_mask(path, size)).to(cams.device) if path is not None else None
            mask = masks[pos]
            if not boxes and mask is None:
                continue  # nothing annotated for this class: excluded, as in the pointing game
            heat = upsample_normalize(cams[k], size, batch.boxes[pos])
            box_t = torch.tensor([[b.x0, b.y0, b.x1, b.y1] for b in boxes], device=cams.device).view(-1, 4)
            if "pointing" in self.metrics:
                hit = M.pointing_hit(heat, box_t, mask)
                out[k]["pointing_hit"] = "" if hit is None else str(hit)
            if "energy" in self.metrics:
                region = M.box_region(box_t, size)
                if mask is not None:
                    region = region | mask
                out[k]["energy_in_box"] = f"{M.energy_in_region(heat, region):.6f}"
