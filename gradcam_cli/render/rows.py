"""One batch's CAMs -> the CSV rows and the files to write for them (heatmaps, overlays, npy, guided pictures).

One row per (image, target, map): a map per layer, or the one fused map (`--fuse`), or `input` for
guided-backprop. A non-finite result is an error row for that image only. The small per-image numbers come to
the host once per batch; each map's pixels leave the device as uint8, and what is left to do for a file
(colouring and encoding on the CPU) runs later on the writer threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from gradcam_cli.cam.engine import CamResult
from gradcam_cli.data.batches import Batch
from gradcam_cli.model.labels import label_of
from gradcam_cli.out.names import OutputNames
from gradcam_cli.out.table import Row
from gradcam_cli.out.writer import Encoder
from gradcam_cli.render.encode import encode_npy, encode_png
from gradcam_cli.render.heatmap import heatmap, render_guided
from gradcam_cli.render.overlay import Overlayer

Files = list[tuple[str, Encoder]]


@dataclass(frozen=True)
class BatchRenderer:
    """Turns a batch's `CamResult` into rows and files, the same way for every batch of a run.

    `truth(rel)` is the image's true class index, or None when it is unknown; with `--target label`
    (`needs_truth`) an unknown one makes the image an error row saying `why_unknown(rel)`.
    """

    outputs: OutputNames
    labels: Sequence[str]
    method: str
    overlayer: Overlayer
    truth: Callable[[str], int | None]
    why_unknown: Callable[[str], str]
    needs_truth: bool

    def render(self, batch: Batch, result: CamResult, rows: dict[int, list[Row]]) -> Files:
        """Fill `rows` (by the batch's image index) and return the files to write, in row order."""
        files: Files = []
        names = list(result.cams)
        pred_prob, pred_index = result.probs.max(dim=1)
        # one host copy of the small per-image numbers
        pred_prob_l, pred_index_l = pred_prob.tolist(), pred_index.tolist()
        target_l, target_prob_l = result.targets.tolist(), result.probs.gather(1, result.targets).tolist()
        finite_l = torch.isfinite(result.logits).all(dim=1).tolist()
        cam_max_l = {name: cams.amax(dim=(2, 3)).tolist() for name, cams in result.cams.items()}
        finite_cams_l = {name: torch.isfinite(c).flatten(1).all(dim=1).tolist() for name, c in result.cams.items()}
        for i, (index, rel) in enumerate(zip(batch.indices, batch.rels, strict=True)):
            truth = self.truth(rel)
            if truth is None and self.needs_truth:
                rows[index] = [Row.failed(rel, f"--target label: {self.why_unknown(rel)}", self.method)]
                continue
            if not finite_l[i] or not all(finite_cams_l[name][i] for name in names):
                what = "logits" if not finite_l[i] else "CAM"
                rows[index] = [Row.failed(rel, f"non-finite {what} (NaN or inf) from the model", self.method)]
                continue
            pred = (pred_index_l[i], label_of(self.labels, pred_index_l[i]), pred_prob_l[i])
            true = None if truth is None else (truth, label_of(self.labels, truth))
            rows[index] = []
            for name in names:
                seen: set[int] = set()
                for t, target in enumerate(target_l[i]):
                    if target in seen:  # `pred` and `topk:K` can name the same class: one map, one row
                        continue
                    seen.add(target)
                    explained = (target, label_of(self.labels, target), target_prob_l[i][t])
                    peak, written = self._map(batch, result, i, t, name, target, files)
                    cam_max = cam_max_l[name][i][t]
                    rows[index].append(
                        Row.explained(rel, self.method, name, pred, explained, cam_max, peak, true, *written)
                    )
        self.overlayer.flush()  # the batch's device-encoded overlays, in one call
        return files

    def _map(
        self, batch: Batch, result: CamResult, i: int, t: int, name: str, target: int, files: Files
    ) -> tuple[tuple[int, int], tuple[str, str, str]]:
        """One map (image i, target slot t, map `name`): its peak (x, y) in original pixels, and the heatmap,
        overlay and guided picture it gets (their names, "" where none), appended to `files` with the npy."""
        size, box = batch.sizes[i], batch.boxes[i]
        cam = result.cams[name][i, t]
        shown = heatmap(cam, size, box)
        names_of = self.outputs.for_row(batch.rels[i], name, target)
        heat = shown.pixels.cpu().numpy()
        original = batch.originals[i]
        overlay = names_of.overlay if original is not None else ""
        if names_of.heatmap:
            files.append((names_of.heatmap, partial(encode_png, heat)))
        if overlay and original is not None:
            files.append((overlay, self.overlayer.encoder(original, shown.pixels, heat)))
        if names_of.npy:
            files.append((names_of.npy, partial(encode_npy, cam.cpu().numpy())))
        guided = ""
        if name in result.guided:
            picture = result.guided[name][i, t]
            guided = names_of.guided
            files.append((guided, partial(encode_png, render_guided(picture, size, box).numpy())))
            if names_of.guided_npy:
                files.append((names_of.guided_npy, partial(encode_npy, picture.cpu().numpy())))
        return (shown.peak_x, shown.peak_y), (names_of.heatmap, overlay, guided)
