"""Per-batch evaluation for `explain`: metric columns, `--only-below` selection, `--sample-rate` sampling.

The pipeline makes two calls per batch into an `Evaluator` (there is none when neither a metric nor
--only-below is asked for): `skip_confident` before the engine runs, and `add_columns` after the rows are made.
`--sample-rate` is applied to the file list before the run (`in_sample`). The maths is
in `metrics` (pure tensor functions); this module feeds it a batch's inputs, CAMs and annotations, and turns
the results into CSV values.

Costs, per batch of B images, T targets and L layers (M = B*T*L maps), with S = `steps`:
deletion + insertion: M * 2 * (S - 1) + B forwards (the image's own probability comes from the engine's
forward, the baseline is shared by an image's maps); drop: M forwards; pointing/energy: no forward (one
upsampling to the original size per map). The forwards go through the model `metric_batch_size` images at a
time, without autograd, under the run's --amp and --channels-last settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradcam_cli import metrics as M
from gradcam_cli.annotations import Annotations, load_annotations, read_mask
from gradcam_cli.config import Settings, check_audit_settings
from gradcam_cli.engine import _logits_of
from gradcam_cli.errors import GradcamError
from gradcam_cli.models import LoadedModel, label_of

# metric -> the CSV columns it adds, in the order they are appended to the header
METRIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "deletion": ("deletion_auc",),
    "insertion": ("insertion_auc",),
    "drop": ("avg_drop", "increase"),
    "pointing": ("pointing_hit",),
    "energy": ("energy_in_box",),
}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def metric_columns(metrics: Sequence[str]) -> tuple[str, ...]:
    """The columns appended to predictions.csv for `metrics`: canonical order, whatever order they were asked in."""
    return tuple(col for name, cols in METRIC_COLUMNS.items() if name in metrics for col in cols)


def in_sample(rel: str, rate: float) -> bool:
    """Deterministic sampling by path: the first 8 bytes of sha256(rel) as a fraction of 2^64, kept when < rate.

    The same path is always in or out for a given rate, on every machine and run, and a higher rate keeps a
    superset of a lower rate's images.
    """
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < rate


def audit_manifest(s: Settings) -> dict[str, Any]:
    """The issue-7 settings of a run for run.json, so that `gradcam audit`/`report` can tell how OUT was made."""
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
        self,
        settings: Settings,
        model: nn.Module,
        black: Tensor,
        annotations: Annotations | None,
        rels: Callable[[int], str],
        labels: Callable[[int], str] = str,
    ) -> None:
        self.settings = settings
        self.model = model
        self.black = black
        self.annotations = annotations
        self.rel_of = rels
        self.label_of = labels
        self.metrics = tuple(settings.metrics)
        self.columns = metric_columns(self.metrics)
        self.chunk = settings.metric_batch_size or 4 * settings.batch_size
        self.stage_seconds = {"select": 0.0, "metrics": 0.0} if settings.only_below else {"metrics": 0.0}
        self.skipped = 0

    @staticmethod
    def create(
        settings: Settings,
        loaded: LoadedModel,
        rels: Sequence[str],
        device: torch.device,
        rel_of: Callable[[int], str] | None = None,
    ) -> Evaluator | None:
        """An evaluator for a run, or None when it needs none (no metrics and no --only-below).

        `rels` are the run's image paths; `rel_of(i)` names the loader's image i (default `rels[i]`; the pipeline
        passes its own lookup because --resume narrows the list). Annotations are read and their labels
        resolved here, before anything runs: a typo is one line, exit 2.
        """
        check_audit_settings(settings)
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
        mean = torch.tensor(loaded.spec.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(loaded.spec.std, device=device).view(1, 3, 1, 1)
        names = list(loaded.labels)
        lookup = rel_of if rel_of is not None else rels.__getitem__
        return Evaluator(settings, loaded.model, (0.0 - mean) / std, annotations, lookup, lambda c: label_of(names, c))

    # --------------------------------------------------------------------------------------------- forward

    @contextlib.contextmanager
    def _autocast(self, device: torch.device) -> Iterator[None]:
        if self.settings.amp == "none":
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=AMP_DTYPES[self.settings.amp]):
                yield

    def forward(self, x: Tensor) -> Tensor:
        """Logits without autograd, as the run's forward (amp, channels_last); halves the chunk on device OOM."""
        try:
            with torch.no_grad(), self._autocast(x.device):
                if self.settings.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                return _logits_of(self.model(x)).float()
        except torch.cuda.OutOfMemoryError:
            if x.shape[0] == 1:
                raise
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
            half = x.shape[0] // 2
            return torch.cat([self.forward(x[:half]), self.forward(x[half:])])

    # -------------------------------------------------------------------------------------- --only-below

    def skip_confident(
        self, batch: Any, mean255: Tensor, std255: Tensor, device: torch.device, rows: dict[int, list[dict[str, Any]]]
    ) -> Any:
        """With --only-below P: one no-grad forward for the batch, a `skipped` row (with its prediction) for
        every image whose top-1 probability is >= P, and the batch of the others for the engine.

        So a confident image costs one plain forward and no backward, rendering or files.
        """
        threshold = self.settings.only_below
        if threshold is None or batch.inputs is None:
            return batch
        t0 = time.perf_counter()
        x = batch.inputs.to(device, non_blocking=True).float().sub_(mean255).div_(std255)
        probs = torch.cat([self.forward(x[i : i + self.chunk]) for i in range(0, x.shape[0], self.chunk)]).softmax(1)
        top_p, top_i = probs.max(dim=1)
        keep = (top_p < threshold).tolist()
        top_p_l, top_i_l = top_p.tolist(), top_i.tolist()
        for pos, index in enumerate(batch.indices):
            if not keep[pos]:
                rows[index] = [
                    {
                        "path": self.rel_of(index),
                        "status": "skipped",
                        "error": f"top-1 probability {top_p_l[pos]:.4f} >= --only-below {threshold:g}",
                        "pred_index": top_i_l[pos],
                        "pred_label": self.label_of(top_i_l[pos]),
                        "pred_prob": f"{top_p_l[pos]:.6f}",
                        "method": self.settings.method,
                    }
                ]
                self.skipped += 1
        self.stage_seconds["select"] += time.perf_counter() - t0
        return subset_batch(batch, [pos for pos, k in enumerate(keep) if k])

    # ------------------------------------------------------------------------------------------ metrics

    def add_columns(self, batch: Any, x: Tensor, result: Any, rows: dict[int, list[dict[str, Any]]]) -> None:
        """Compute every asked metric for every (image, target, layer) map of the batch and write the values
        into the matching `ok` rows (matched by image, layer and target index)."""
        if not self.metrics:
            return
        t0 = time.perf_counter()
        targets = result.targets
        maps: list[tuple[int, str, int, int]] = []  # (position in batch, layer, slot, class)
        for pos, index in enumerate(batch.indices):
            if not rows.get(index) or rows[index][0]["status"] != "ok":
                continue
            wanted = {(row["layer"], int(row["target_index"])) for row in rows[index]}
            for name in result.cams:
                seen: set[int] = set()
                for t, cls in enumerate(targets[pos].tolist()):
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
        base = M.baseline_images(x, self.settings.baseline, self.black) if self._perturbs() else None
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
                if row["status"] == "ok":
                    row.update(lookup.get((index, row["layer"], int(row["target_index"])), {}))
        self.stage_seconds["metrics"] += time.perf_counter() - t0

    def _perturbs(self) -> bool:
        return any(m in self.metrics for m in ("deletion", "insertion"))

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
        self, batch: Any, cams: Tensor, maps: list[tuple[int, str, int, int]], out: list[dict[str, str]]
    ) -> None:
        """pointing hit and energy-in-box, on the map at the original image size, as the heatmap is saved."""
        assert self.annotations is not None
        masks: dict[int, Tensor | None] = {}
        for k, (pos, _name, _t, cls) in enumerate(maps):
            rel = self.rel_of(batch.indices[pos])
            size = batch.sizes[pos]
            boxes = self.annotations.boxes_for(rel, cls)
            if pos not in masks:
                path = self.annotations.mask_path(rel)
                masks[pos] = torch.from_numpy(read_mask(path, size)).to(cams.device) if path is not None else None
            mask = masks[pos]
            if not boxes and mask is None:
                continue  # nothing annotated for this class: excluded, as in the pointing game
            heat = M.original_map(cams[k], size, batch.boxes[pos])
            box_t = torch.tensor([[b.x0, b.y0, b.x1, b.y1] for b in boxes], device=cams.device).view(-1, 4)
            if "pointing" in self.metrics:
                hit = M.pointing_hit(heat, box_t, mask)
                out[k]["pointing_hit"] = "" if hit is None else str(hit)
            if "energy" in self.metrics:
                region = M.box_region(box_t, size)
                if mask is not None:
                    region = region | mask
                out[k]["energy_in_box"] = f"{M.energy_in_region(heat, region):.6f}"


def subset_batch(batch: Any, keep: list[int]) -> Any:
    """The batch restricted to positions `keep` (in order): the input tensor and every per-image list.

    Written against the dataclass fields so that fields added to `data.Batch` later are carried along.
    """
    if len(keep) == len(batch.indices):
        return batch
    changes: dict[str, Any] = {}
    n = len(batch.indices)
    for f in fields(batch):
        value = getattr(batch, f.name)
        if f.name == "inputs":
            changes[f.name] = value[keep] if keep and value is not None else None
        elif f.name != "errors" and isinstance(value, list) and len(value) == n:
            changes[f.name] = [value[i] for i in keep]
    return replace(batch, **changes)
