"""A run as a value: `plan_run(settings, inputs, out)` decides everything before the first image is read.

The plan is frozen: the model and its layers, the files, the targets, the ground truth, the evaluator, the
CSV columns and output names, the decode mode. Nothing changes it afterwards; which of its files a process
explains (after --resume and torchrun's sharding) is a `Share`, a value of its own (`coordinator`).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradcam_cli import __version__
from gradcam_cli.audit.evaluate import Evaluator, audit_manifest
from gradcam_cli.audit.metrics import COLUMN_NAMES as METRIC_COLUMNS
from gradcam_cli.audit.summary import AuditPlan, prepare_audit
from gradcam_cli.audit.truth import ImageTruth, image_truth
from gradcam_cli.cam.engine import GUIDED_NAME, CamEngine
from gradcam_cli.cam.fuse import fused_name
from gradcam_cli.cam.methods import check_options, get_spec
from gradcam_cli.cam.targets import TargetSelector
from gradcam_cli.config import Settings
from gradcam_cli.data.device import resolve_decode
from gradcam_cli.data.discover import ImageFile
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.checkpoint import state_digest
from gradcam_cli.model.forward import autocast, resolve_device
from gradcam_cli.model.layers import choose_layers
from gradcam_cli.model.loading import LoadedModel, load_model
from gradcam_cli.out.folder import OutputFolder
from gradcam_cli.out.names import OutputNames
from gradcam_cli.out.table import columns_for

LogFn = Callable[[str], None]


@dataclass(frozen=True)
class RunPlan:
    """Everything decided before the first image is read. `settings` are as the run uses them: `decode` and
    `channels_last` resolved for the device. `notes` are messages for the user, held until the probe passed
    (a usage error must be the only line)."""

    inputs: tuple[str, ...]
    folder: OutputFolder
    files: tuple[ImageFile, ...]
    settings: Settings
    device: torch.device
    model: LoadedModel
    weights_digest: str  # model.checkpoint.state_digest: which weights, whatever their source
    layers: Mapping[str, nn.Module]
    maps: tuple[str, ...]  # the CSV `layer` values: the layers, one fused map, or `input`
    selector: TargetSelector
    truth: ImageTruth | None
    evaluator: Evaluator | None
    columns: tuple[str, ...]
    outputs: OutputNames
    decode_error: str | None  # why `--decode auto` could not decode on this device
    audit: AuditPlan | None
    notes: tuple[str, ...]

    def engine(self) -> CamEngine:
        s = self.settings
        options = dict(counterfactual=s.counterfactual, eigen_smooth=s.eigen_smooth, aug_smooth=s.aug_smooth)
        return CamEngine(self.model.model, self.layers, s.method, fuse=s.fuse, chunk_size=s.chunk_size, **options)

    def true_class(self, rel: str) -> int | None:
        return None if self.truth is None else self.truth.index.get(rel)

    def why_unknown(self, rel: str) -> str:
        """Why image `rel` has no true class (for its error row under `--target label`)."""
        return "" if self.truth is None else self.truth.why.get(rel, "")

    def targets_for(self, rels: Sequence[str]) -> Callable[[Tensor], Tensor]:
        """The target classes of a batch of these images from its logits: `label` slots need their truth."""
        if self.truth is None or not self.selector.uses_label:
            return self.selector
        known = torch.tensor([-1 if (i := self.true_class(r)) is None else i for r in rels], device=self.device)
        return lambda logits: self.selector(logits, known)

    def describe(self) -> dict[str, Any]:
        """What run.json records about the run (and --resume compares)."""
        s = self.settings
        return {
            "inputs": list(self.inputs),
            "files_from": s.files_from,
            "model": self.model.name,
            "weights": self.model.weights,
            "weights_digest": self.weights_digest,
            "layers": list(self.layers),
            "method": s.method,
            # what the maps mean (compared on --resume); chunk_size only bounds memory
            "method_options": {
                "counterfactual": s.counterfactual,
                "aug_smooth": s.aug_smooth,
                "eigen_smooth": s.eigen_smooth,
                "fuse": s.fuse,
            },
            "chunk_size": s.chunk_size,
            "targets": list(s.targets),
            "ground_truth": None if self.truth is None else self.truth.source,
            "preprocessing": asdict(self.model.spec),
            "device": str(self.device),
            "batch_size": s.batch_size,
            "workers": s.workers,
            "save": list(s.save),
            "colormap": s.colormap,
            "alpha": s.alpha,
            "amp": s.amp,
            "channels_last": s.channels_last,
            "decode": s.decode,
            "seed": s.seed,
            "fsync": s.fsync,
            "input_roots": [str(Path(p).resolve()) for p in self.inputs],
            "labels": list(self.model.labels),
            "audit": audit_manifest(s, self.evaluator),
            "versions": {
                "gradcam_cli": __version__,
                "torch": torch.__version__,
                "torchvision": _torchvision_version(),
                "python": platform.python_version(),
            },
        }


def plan_run(
    settings: Settings,
    inputs: Sequence[str | os.PathLike[str]],
    folder: OutputFolder,
    files: Sequence[ImageFile],
    device_spec: str,
    leader: bool,
    log: LogFn,
) -> RunPlan:
    """Load the model and decide everything about the run over `files`, on the device `device_spec` names.

    Problems with the call itself raise GradcamError (exit 2) before anything is written. The leader (rank 0,
    or the one process) also prepares the audit that follows the run.
    """
    device = resolve_device(device_spec)
    if settings.channels_last is None:
        # auto: channels_last convolutions are faster on the CPU; on CUDA it depends on the GPU and on --amp
        settings = settings.replace(channels_last=device.type == "cpu")
    # load_model seeds the RNG (`seed`) so random init is the same in every run; the caller's RNG is restored
    with torch.random.fork_rng(devices=[]):
        loaded = load_model(settings)
    digest = state_digest(loaded.model)
    loaded.model.to(device)
    if settings.channels_last:
        loaded.model.to(memory_format=torch.channels_last)
    decode, decode_error = resolve_decode(settings.decode, device)
    settings = settings.replace(decode=decode)
    notes: list[str] = list(loaded.notes)
    spec = get_spec(settings.method)
    layers: dict[str, nn.Module] = {}
    if spec.uses_layer:  # guided-backprop explains the input
        layers = choose_layers(
            loaded.model, settings.target_layers, settings.model, loaded.spec.size, device, notes.append
        )
    selector = TargetSelector(settings.targets, loaded.labels)
    fuse = None if settings.fuse == "none" else settings.fuse
    check_options(spec, settings.counterfactual, settings.eigen_smooth, fuse, len(layers), settings.chunk_size)
    if not spec.uses_layer:
        maps: tuple[str, ...] = (GUIDED_NAME,)
    elif settings.fuse != "none":
        maps = (fused_name(list(layers)),)
    else:
        maps = tuple(layers)
    rels = [f.rel for f in files]
    roots = [str(Path(p).resolve()) for p in inputs]
    truth = image_truth(settings.truth, roots, loaded.labels, rels, selector.uses_label, notes.append)
    if truth is not None:
        notes.append(f"ground truth: {truth.source} ({truth.known()} of {len(files)} images labelled)")
    outputs = OutputNames(settings.save, maps, selector.slots > 1, spec.input_grads)
    evaluator = Evaluator.create(settings, loaded, rels, device, layers, outputs)
    return RunPlan(
        inputs=tuple(str(p) for p in inputs),
        folder=folder,
        files=tuple(files),
        settings=settings,
        device=device,
        model=loaded,
        weights_digest=digest,
        layers=layers,
        maps=maps,
        selector=selector,
        truth=truth,
        evaluator=evaluator,
        columns=columns_for(METRIC_COLUMNS),
        outputs=outputs,
        decode_error=decode_error,
        audit=prepare_audit(settings, roots, loaded.labels, rels) if leader else None,
        notes=tuple(notes),
    )


def probe(plan: RunPlan, engine: CamEngine) -> list[str]:
    """One dummy image through the engine before OUT is touched, under the run's --amp: a layer without a
    spatial output, a class index the model does not have, a model `cam` cannot explain, or a method's own
    passes failing on their first chunk fail here. Returns what to tell the user about the layers' layouts."""
    size = plan.model.spec.size
    with autocast(plan.device, plan.settings.amp):
        result = engine.check(torch.zeros(1, 3, *size, device=plan.device), plan.selector)
    for name, cams in result.cams.items():
        if cams.shape[-2] * cams.shape[-1] <= 1:
            raise GradcamError(
                f"layer '{name}' gives a 1x1 map at input size {size[0]}x{size[1]}, nothing to localise; choose "
                "an earlier layer or a larger input_size (see `gradcam layers MODEL`)"
            )
    return [f"layer {n}: {layout.describe()}" for n, layout in engine.layouts.items() if layout.kind != "nchw"]


def _torchvision_version() -> str:
    try:
        import torchvision

        return str(torchvision.__version__)
    except ImportError:
        return "not installed"
