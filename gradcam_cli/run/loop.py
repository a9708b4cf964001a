"""The batch loop: take a decoded batch, compute its maps, render rows and files, hand them to OUT.

    DataLoader workers (decode, resize) -> device (normalise) -> CamEngine (one forward, one backward)
        -> BatchRenderer (upsample, normalise, colour; uint8) -> OutputWriter threads (encode, write, CSV)

Only a bounded number of batches is in flight at each stage, so memory does not grow with the folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from gradcam_cli.cam.engine import CamEngine, CamResult, run_batch
from gradcam_cli.data.batches import Batch, SurvivingLoader
from gradcam_cli.data.device import DeviceDecoder
from gradcam_cli.data.discover import ImageFile
from gradcam_cli.errors import MachineFault
from gradcam_cli.out.table import Row
from gradcam_cli.out.writer import OutputWriter
from gradcam_cli.render.colormaps import lut
from gradcam_cli.render.overlay import Overlayer
from gradcam_cli.render.rows import BatchRenderer
from gradcam_cli.run.plan import RunPlan
from gradcam_cli.run.tally import Tally

ProgressFn = Callable[[int], None]


class BatchLoop:
    """Everything one process needs to explain its `files` of a plan, and the loop that does it."""

    def __init__(self, plan: RunPlan, engine: CamEngine, files: Sequence[ImageFile]) -> None:
        s, spec, device = plan.settings, plan.model.spec, plan.device
        self.plan, self.engine, self.files = plan, engine, files
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255.0
        self.overlayer = Overlayer(lut(s.colormap), device, s.alpha)
        self.renderer = BatchRenderer(
            plan.outputs,
            plan.model.labels,
            s.method,
            self.overlayer,
            plan.true_class,
            plan.why_unknown,
            plan.selector.uses_label,
        )
        keep_original = "overlay" in s.save
        self.loader = SurvivingLoader(
            files,
            s.batch_size,
            s.workers,
            spec=spec,
            keep_original=keep_original,
            pin=device.type == "cuda",
            max_pixels=s.max_pixels,
            device_decode=s.decode == "device",
        )
        self.decoder = None
        if s.decode == "device":
            self.decoder = DeviceDecoder(spec, device, keep_original, lambda i: files[i].path, s.max_pixels)

    def run(self, writer: OutputWriter, tally: Tally, progress: ProgressFn | None = None) -> None:
        """Explain every file; rows and files of each batch go to `writer` as soon as the batch is done."""
        evaluator, method = self.plan.evaluator, self.plan.settings.method
        for batch in self._batches(tally):
            rows = {index: [Row.failed(rel, message, method)] for index, rel, message in batch.errors}
            if evaluator is not None and batch.inputs is not None and self.plan.settings.only_below is not None:
                batch = evaluator.skip_confident(batch, self._normalised(batch), rows)
            files = []
            if batch.inputs is not None:
                with tally.stage("compute"):
                    x, result = self._compute(batch)
                with tally.stage("render"):
                    files = self.renderer.render(batch, result, rows)
                if evaluator is not None:
                    files += evaluator.add_columns(batch, x, result, rows, self.engine)
            writer.submit_batch(files, [row for index in sorted(rows) for row in rows[index]])
            if progress is not None:
                progress(len(rows))

    def _batches(self, tally: Tally) -> Iterator[Batch]:
        """The loader's batches, JPEGs finished on the device with `--decode device`; the wait is timed."""
        t_wait = time.perf_counter()
        for batch in self.loader:
            tally.stages["decode_wait"] += time.perf_counter() - t_wait
            if batch.errors:
                self._check_inputs()
            yield batch if self.decoder is None else self.decoder.finish(batch)
            t_wait = time.perf_counter()

    def _check_inputs(self) -> None:
        """Images that cannot be read because their input folder went away (deleted, unmounted) stop the run:
        one line for the folder, instead of an error row for each image left; --resume finishes later."""
        for root in self.plan.inputs:
            if not Path(root).exists():
                raise MachineFault(f"input {root} is gone (deleted or unmounted during the run)")

    def _normalised(self, batch: Batch) -> Tensor:
        """(B, 3, h, w) uint8 -> float32 on the device, normalised with the model's mean and std."""
        assert batch.inputs is not None
        return batch.inputs.to(self.plan.device, non_blocking=True).float().sub_(self.mean).div_(self.std)

    def _compute(self, batch: Batch) -> tuple[Tensor, CamResult]:
        """The batch's maps: one forward and one backward, halving the batch when the device runs out of memory."""
        plan = self.plan
        x = self._normalised(batch)
        if plan.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        result = run_batch(
            self.engine, x, lambda start, stop: plan.targets_for(batch.rels[start:stop]), plan.settings.amp
        )
        if plan.device.type == "cuda":
            torch.cuda.synchronize(plan.device)
        return x, result

    def report(self, tally: Tally) -> None:
        """What run.json says about how this process ran: stage seconds and how images were coded."""
        plan = self.plan
        tally.notes["overlay_jpeg"] = "device" if self.overlayer.device_codec else "pillow"
        if self.overlayer.codec_failure is not None:
            tally.notes["overlay_jpeg_device_error"] = self.overlayer.codec_failure
        if self.overlayer.codec_fallbacks:
            tally.notes["overlay_jpeg_pillow_fallback"] = self.overlayer.codec_fallbacks
        if self.loader.lost:
            tally.notes["decode_workers_lost"] = self.loader.lost
        if plan.decode_error is not None:
            tally.notes["decode_device_error"] = plan.decode_error
        if self.decoder is not None:
            tally.stages["device_decode"] = self.decoder.seconds
            tally.notes["device_decoded"] = {"jpeg": self.decoder.decoded, "pillow_fallback": self.decoder.fallbacks}
        if plan.evaluator is not None:
            tally.stages.update(plan.evaluator.stage_seconds)
