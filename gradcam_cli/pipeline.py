"""The streaming loop: files in, batches through the engine, rows and image files out.

    discover -> DataLoader workers (decode, resize) -> device (normalise) -> CamEngine (forward + backward)
             -> render (upsample, normalise, colour, blend; uint8) -> OutputWriter threads (encode, write, CSV)

Only a bounded number of batches is in flight at each stage, so memory does not grow with the folder.
"""

from __future__ import annotations

import difflib
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch

from gradcam_cli import __version__
from gradcam_cli.annotations import LabelResolver
from gradcam_cli.audit import prepare_audit, resolve_truth
from gradcam_cli.catalog import MODELS, TORCHVISION_VERSION
from gradcam_cli.colormaps import lut as colormap_lut
from gradcam_cli.config import Settings, check_audit_settings
from gradcam_cli.data import ImageFile, discover, make_loader
from gradcam_cli.distributed import World, conclude, fold_rank_csvs, host, one_line
from gradcam_cli.engine import INPUT_SUFFIX, CamEngine, CamResult
from gradcam_cli.errors import GradcamError, RunStopped
from gradcam_cli.evaluate import Evaluator, audit_manifest, in_sample
from gradcam_cli.layers import auto_detect_layer, resolve_layer
from gradcam_cli.methods import METHOD_INFO, fused_name
from gradcam_cli.models import LoadedModel, label_of, load_model
from gradcam_cli.render import blend, blend_host, heatmap, palette, render_guided
from gradcam_cli.resume import ResumeState, csv_text, plan_resume
from gradcam_cli.sinks import (
    CAM_COLUMNS,
    CSV_COLUMNS,
    JPEG_QUALITY,
    Encoder,
    OutputWriter,
    clean_stale_temps,
    encode_jpeg,
    encode_npy,
    encode_png,
    output_name,
    pillow_block_cache,
    read_csv_rows,
    restore_pillow_blocks,
    rewrite_csv,
    write_manifest,
)

ProgressFn = Callable[[int], None]
LogFn = Callable[[str], None]


@dataclass
class RunSummary:
    """What a run did; `exit_code` is what the CLI returns (0 all explained, 1 some images failed)."""

    out: str
    total: int
    ok: int
    errors: int
    seconds: float
    images_per_second: float
    layers: list[str]
    stages: dict[str, float] = field(default_factory=dict)
    skipped: int = 0  # with --resume: images already explained by an earlier run (counted in `ok`)
    skipped_confident: int = 0  # with --only-below: images given a `skipped` row (their prediction only)
    audit: Any = None  # with --summary or gates: the `audit.AuditResult` written to summary.json
    ranks: int = 1  # processes that shared the run (torchrun)

    @property
    def exit_code(self) -> int:
        """3 when a --fail-under/--fail-over gate failed (it wins over 1), else 1 when images failed, else 0."""
        if self.audit is not None and self.audit.failed_gates:
            return 3
        return 1 if self.errors else 0


def resolve_device(spec: str) -> torch.device:
    """auto -> CUDA when present, else CPU; an explicit device that is absent is a usage error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GradcamError(f"--device {spec}: CUDA is not available on this machine (use cpu or auto)")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise GradcamError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    if spec == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise GradcamError("--device mps: MPS is not available on this machine (use cpu or auto)")
    return torch.device(spec)


class TargetSelector:
    """Turns `targets` settings into a (B, T) class-index tensor given the logits of a batch."""

    def __init__(self, targets: Sequence[str], labels: Sequence[str]) -> None:
        self.items: list[tuple[str, int]] = []
        lowered = {name.lower(): i for i, name in enumerate(labels)}
        for item in targets:
            if item == "pred":
                self.items.append(("pred", 1))
            elif item == "label":
                self.items.append(("label", 1))
            elif item.startswith("topk:"):
                self.items.append(("topk", int(item.split(":")[1])))
            elif item.isdigit():
                self.items.append(("index", int(item)))
            elif item.lower() in lowered:
                self.items.append(("index", lowered[item.lower()]))
            else:
                near = difflib.get_close_matches(item, list(labels), n=3)
                hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
                raise GradcamError(
                    f"--target '{item}': not 'pred', 'label', 'topk:K', a class index or a class name{hint}"
                )
        self.slots = sum(k if kind == "topk" else 1 for kind, k in self.items)
        self.uses_label = any(kind == "label" for kind, _ in self.items)

    def __call__(self, logits: torch.Tensor, truth: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) classes; `truth` (B,) is each image's true class for `label` slots (-1, or None: unknown, so
        the prediction stands in; such images become error rows)."""
        n, classes = logits.shape
        cols = []
        for kind, k in self.items:
            if kind == "pred":
                cols.append(logits.argmax(dim=1, keepdim=True))
            elif kind == "label":
                pred = logits.argmax(dim=1, keepdim=True)
                known = truth.view(-1, 1).to(logits.device) if truth is not None else torch.full_like(pred, -1)
                if bool((known >= classes).any()):
                    raise GradcamError(f"--target label: a true class index is >= the model's {classes} classes")
                cols.append(torch.where(known >= 0, known, pred))
            elif kind == "topk":
                if k > classes:
                    raise GradcamError(f"--target topk:{k}: the model has only {classes} classes")
                cols.append(logits.topk(k, dim=1).indices)
            else:
                if k >= classes:
                    raise GradcamError(f"--target {k}: the model has only {classes} classes (0..{classes - 1})")
                cols.append(torch.full((n, 1), k, dtype=torch.long, device=logits.device))
        return torch.cat(cols, dim=1)


def _error_row(rel: str, message: str, method: str) -> dict[str, Any]:
    return {"path": rel, "status": "error", "error": message, "method": method}


def output_suffix(layer: str, target: int, multi_layer: bool, multi_target: bool) -> str:
    """What tells one image's several maps apart in their file names: `__<layer>`, then `__<class index>`."""
    return (f"__{layer}" if multi_layer else "") + (f"__{target}" if multi_target else "")


def _row_outputs(plan: _Plan, rel: str, row: Any) -> list[str] | None:
    """The output files (relative to OUT) that an `ok` row of `rel` must have; None if it names others."""
    names = plan.map_names
    if row["layer"] not in names or not row["target_index"].isdigit():
        return None
    save = plan.settings.save
    suffix = output_suffix(row["layer"], int(row["target_index"]), len(names) > 1, plan.selector.slots > 1)
    files = []
    if METHOD_INFO[plan.settings.method].input_grads:  # guided methods: guided/ picture (and raw .npy)
        guided = output_name("guided", rel, suffix, "png")
        if row.get("guided", "") != csv_text(guided):
            return None
        files.append(guided)
        if "npy" in save:
            files.append(output_name("guided", rel, suffix, "npy"))
    for kind, folder, ext, column in (
        ("heatmap", "heatmaps", "png", "heatmap"),
        ("overlay", "overlays", "jpg", "overlay"),
        ("npy", "npy", "npy", None),
    ):
        name = output_name(folder, rel, suffix, ext)
        if column is not None and row[column] != (csv_text(name) if kind in save else ""):
            return None
        if kind in save:
            files.append(name)
    return files


def _select_layers(loaded: LoadedModel, settings: Settings, device: torch.device, log: LogFn) -> dict[str, Any]:
    if not METHOD_INFO[settings.method].uses_layer:
        return {}  # guided-backprop explains the input
    if settings.target_layers:
        chosen: dict[str, Any] = {}
        for spec in settings.target_layers:
            # `module:input` explains the map a module receives (see engine.INPUT_SUFFIX)
            is_input = spec.endswith(INPUT_SUFFIX)
            name, module = resolve_layer(loaded.model, spec[: -len(INPUT_SUFFIX)] if is_input else spec)
            chosen[name + INPUT_SUFFIX if is_input else name] = module
        return chosen
    name = _catalog_layer(loaded, settings) or auto_detect_layer(loaded.model, loaded.spec.size, device)
    log(f"target layer: {name} (auto-detected: last spatial layer before pooling; set --layer to change)")
    return {name: resolve_layer(loaded.model, name)[1]}


def _catalog_layer(loaded: LoadedModel, settings: Settings) -> str | None:
    """The layer `gradcam models` lists for a torchvision model, when this run is the case it was detected for.

    Auto-detection runs the model forward and backward with a hook on every module (0.1-0.2 s for resnet50 on
    two CPU cores, measured: a visible part of a short run). The catalog holds its answer for every torchvision
    classifier at the model's own input size, made with the same torchvision version, and tests/test_zoo.py
    checks that detection still gives it; any other case (a factory, another input size or torchvision) is
    detected. The probe in `_explain` still runs the chosen layer once before OUT is touched.
    """
    import torchvision  # loaded already: the model came from it

    entry = MODELS.get(settings.model or "")
    version = torchvision.__version__.split("+")[0]
    if entry is None or version != TORCHVISION_VERSION or loaded.spec.size != (entry[0], entry[0]):
        return None
    try:
        resolve_layer(loaded.model, entry[1])
    except GradcamError:
        return None
    return entry[1]


def explain(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    settings: Settings,
    progress: ProgressFn | None = None,
    log: LogFn | None = None,
    on_start: Callable[[int], None] | None = None,
) -> RunSummary:
    """Explain every image under `inputs` into `out`: heatmaps/, overlays/, npy/, predictions.csv, run.json.

    Per-image problems become `status=error` rows; problems with the call itself raise GradcamError. Under
    torchrun each rank explains its share and rank 0 merges (see `gradcam_cli.distributed`); only rank 0 logs.
    """
    if isinstance(inputs, (str, os.PathLike)):  # one folder or file: a str must not be walked letter by letter
        inputs = [inputs]
    world = World.from_env(settings.dist_timeout)
    with world.joined(settings.device), world.starting():
        return _explain(inputs, out, settings, progress, log if world.rank == 0 else None, on_start, world)


def _explain(
    inputs: Sequence[str | Path],
    out: str | Path,
    settings: Settings,
    progress: ProgressFn | None,
    log: LogFn | None,
    on_start: Callable[[int], None] | None,
    world: World,
) -> RunSummary:
    log = log or (lambda message: None)
    check_audit_settings(settings)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise GradcamError(f"-o {out_dir}: exists and is not a directory")
    if world.active:  # rank 0 lists the inputs, every rank gets the same list
        listed = world.from_rank0(
            "inputs", lambda: [[str(f.path), f.rel] for f in _discover(inputs, out_dir, settings)]
        )
        files = [ImageFile(Path(path), rel) for path, rel in listed]
    else:
        files = _discover(inputs, out_dir, settings)
    device = resolve_device(world.pick_device(settings.device))
    if settings.channels_last is None:
        # auto: channels_last convolutions are faster on the CPU (resnet50 forward 0.73x the time of NCHW,
        # googlenet 0.55x, vit/swin about 1.0x: measured, README); on CUDA it depends on the GPU and on --amp
        settings = settings.replace(channels_last=device.type == "cpu")
    # load_model seeds the RNG (`seed`) so random init is the same in every run; the caller's RNG is restored
    with torch.random.fork_rng(devices=[]):
        loaded = load_model(settings)
    loaded.model.to(device)
    if settings.channels_last:
        loaded.model.to(memory_format=torch.channels_last)
    settings, decode_error = _resolve_decode(settings, device)
    held: list[str] = list(loaded.notes)  # messages wait until the probe passed: a usage error must be the only line
    layers = _select_layers(loaded, settings, device, held.append)
    selector = TargetSelector(settings.targets, loaded.labels)
    engine = CamEngine(
        loaded.model,
        layers,
        settings.method,
        counterfactual=settings.counterfactual,
        eigen_smooth=settings.eigen_smooth,
        aug_smooth=settings.aug_smooth,
        fuse=settings.fuse,
        chunk_size=settings.chunk_size,
    )
    plan = _Plan(list(inputs), out_dir, files, settings, device, loaded, layers, selector)
    plan.decode_error = decode_error
    plan.map_names = _map_names(layers, settings)
    plan.truth_index, plan.truth_why, plan.truth_source = _ground_truth(
        files, inputs, settings, loaded, selector, held.append
    )
    if plan.truth_index is not None:
        known = sum(i is not None for i in plan.truth_index)
        held.append(f"ground truth: {plan.truth_source} ({known} of {len(files)} images labelled)")
    # issue 7: metric columns and --only-below (None when not asked), summary.json and gates after the run
    # (--resume may narrow plan.files later: rows are looked up through it, by the loader's index)
    plan.evaluator = Evaluator.create(settings, loaded, [f.rel for f in files], device, lambda i: plan.files[i].rel)
    plan.columns = CSV_COLUMNS + (plan.evaluator.columns if plan.evaluator is not None else ()) + CAM_COLUMNS
    roots = [str(Path(p).resolve()) for p in inputs]
    audit_plan = prepare_audit(settings, roots, loaded.labels, files) if world.rank == 0 else None  # after the merge
    with engine:
        # one dummy image first: a layer without a spatial output, a class index the model does not have, or a
        # model `cam` cannot explain fails here, before OUT is touched (on every rank: they all start, or none
        # does; Score-/Ablation-CAM passes are skipped)
        probe = engine.check(torch.zeros(1, 3, *loaded.spec.size, device=device), selector)
        for name, cams in probe.cams.items():
            if cams.shape[-2] * cams.shape[-1] <= 1:
                raise GradcamError(
                    f"layer '{name}' gives a 1x1 map at input size {loaded.spec.size[0]}x{loaded.spec.size[1]}, "
                    "nothing to localise; choose an earlier layer or a larger input_size (see `gradcam layers MODEL`)"
                )
        world.agree(None)
        held += [f"layer {n}: {layout.describe()}" for n, layout in engine.layouts.items() if layout.kind != "nchw"]
        for message in held:
            log(message)
        summary = _stream(plan, engine, progress, on_start, log, world)
    if audit_plan is not None:
        summary.audit = audit_plan.run(out_dir)
    return summary


def _discover(inputs: Sequence[str | Path], out_dir: Path, settings: Settings) -> list[ImageFile]:
    files: list[ImageFile] = discover(inputs, exclude=[out_dir])
    if settings.sample_rate is not None:
        found = len(files)
        files = [f for f in files if in_sample(f.rel, settings.sample_rate)]
        if found and not files:
            raise GradcamError(f"--sample-rate {settings.sample_rate:g} keeps none of the {found} images found")
    if settings.limit is not None:
        files = files[: settings.limit]
    if not files:
        raise GradcamError("no images found in " + ", ".join(str(p) for p in inputs))
    return files


@dataclass
class _Plan:
    """Everything decided before the first image is read."""

    inputs: list[str | Path]
    out: Path
    files: list[ImageFile]
    settings: Settings
    device: torch.device
    loaded: LoadedModel
    layers: dict[str, Any]
    selector: TargetSelector
    evaluator: Evaluator | None = None
    columns: tuple[str, ...] = CSV_COLUMNS  # predictions.csv header: CSV_COLUMNS + the asked metrics' columns
    # issue 4: the `layer` names of the maps (layers, or one fused map, or `input`), and each file's true class
    map_names: list[str] = field(default_factory=list)
    truth_index: list[int | None] | None = None
    truth_why: list[str] = field(default_factory=list)
    truth_source: str | None = None
    decode_error: str | None = None  # why `--decode auto` could not decode on this device (run.json)


def _resolve_decode(settings: Settings, device: torch.device) -> tuple[Settings, str | None]:
    """`decode` as it will run (workers or device) and, for auto, why the device could not take it.

    auto means the device on CUDA (nvJPEG: the workers' Pillow decode is what limits a GPU run) and the
    workers elsewhere (on a CPU the workers decode in parallel with the model; in the main process decoding
    would wait for it). An explicit `device` that cannot decode is a usage error, not a silent fallback.
    """
    if settings.decode == "workers" or (settings.decode == "auto" and device.type != "cuda"):
        return settings.replace(decode="workers"), None
    from gradcam_cli.devicedecode import device_decoder_error

    error = device_decoder_error(device)
    if error is not None and settings.decode == "device":
        raise GradcamError(f"--decode device: torchvision cannot decode JPEGs on {device} here ({error})")
    return settings.replace(decode="workers" if error else "device"), error


def _map_names(layers: dict[str, Any], settings: Settings) -> list[str]:
    """What the CSV `layer` column says: the layers, `fused(a+b)` with --fuse, `input` for guided-backprop."""
    if not METHOD_INFO[settings.method].uses_layer:
        return ["input"]
    if settings.fuse != "none":
        return [fused_name(list(layers))]
    return list(layers)


def _ground_truth(
    files: list[ImageFile],
    inputs: Sequence[str | Path],
    settings: Settings,
    loaded: LoadedModel,
    selector: Any,
    log: LogFn,
) -> tuple[list[int | None] | None, list[str], str | None]:
    """Each file's true class index (or None, with why) from `truth` (as `gradcam audit` reads it).

    Known ground truth fills the CSV's true_index, true_label and correct. `--target label` needs it: with
    `truth: auto` and no labels.csv in an input folder, the parent folder names are used (ImageFolder layout),
    and an image whose label is not a class is an error row. Only `truth: auto` without `--target label` lets a
    run go on when the labels.csv it found cannot be read (the columns stay empty; a message says why).
    """
    roots = [str(Path(p).resolve()) for p in inputs]
    rels = [f.rel for f in files]
    if selector.uses_label and settings.truth == "none":
        raise GradcamError("--target label: needs ground truth, but --truth is none")
    try:
        truth = resolve_truth(settings.truth, roots, loaded.labels, rels)
    except GradcamError as exc:
        if settings.truth != "auto" or selector.uses_label:
            raise
        log(f"ground truth not used (true_index, true_label, correct stay empty): {exc}")
        return None, [], None
    if not truth.known and selector.uses_label:
        truth = resolve_truth("folders", roots, loaded.labels, rels)
    if not truth.known:
        return None, [], None
    resolver = LabelResolver(loaded.labels)
    index: list[int | None] = []
    why: list[str] = []
    for rel in rels:
        label = truth.label_for(rel)
        found = resolver.resolve_optional(label) if label else None
        index.append(found if found is not None and found >= 0 else None)
        if label is None:
            why.append(f"no ground-truth label for it in {truth.source}")
        else:
            why.append(
                "" if index[-1] is not None else f"ground-truth label '{label}' is not one of the model's classes"
            )
    if selector.uses_label and not any(i is not None for i in index):
        first = next(w for w in why if w)
        raise GradcamError(f"--target label: no image has a ground-truth class ({truth.source}: {first})")
    return index, why, truth.source


class _BatchSelector:
    """The targets of one batch: `label` slots need the true classes of exactly these images (split with them)."""

    def __init__(self, selector: TargetSelector, truth: torch.Tensor) -> None:
        self.selector, self.truth = selector, truth

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.selector(logits, self.truth)

    def split(self, half: int) -> tuple[_BatchSelector, _BatchSelector]:
        return _BatchSelector(self.selector, self.truth[:half]), _BatchSelector(self.selector, self.truth[half:])


def _batch_selector(plan: _Plan, indices: Sequence[int], device: torch.device) -> Any:
    if plan.truth_index is None or not plan.selector.uses_label:
        return plan.selector
    known = [plan.truth_index[i] for i in indices]
    return _BatchSelector(plan.selector, torch.tensor([-1 if k is None else k for k in known], device=device))


def _manifest(plan: _Plan) -> dict[str, Any]:
    s = plan.settings
    return {
        "tool": "gradcam-cli",
        "version": __version__,
        "status": "running",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": [str(p) for p in plan.inputs],
        "model": plan.loaded.name,
        "weights": plan.loaded.weights,
        "layers": list(plan.layers),
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
        "ground_truth": plan.truth_source,
        "preprocessing": asdict(plan.loaded.spec),
        "device": str(plan.device),
        "batch_size": s.batch_size,
        "workers": s.workers,
        "save": list(s.save),
        "colormap": s.colormap,
        "alpha": s.alpha,
        "amp": s.amp,
        "channels_last": s.channels_last,
        "decode": s.decode,
        "seed": s.seed,
        "input_roots": [str(Path(p).resolve()) for p in plan.inputs],
        "labels": list(plan.loaded.labels),
        "audit": audit_manifest(s),
        "versions": {
            "gradcam_cli": __version__,
            "torch": torch.__version__,
            "torchvision": _torchvision_version(),
            "python": platform.python_version(),
        },
    }


def _resume_filter(plan: _Plan, manifest: dict[str, Any], log: LogFn) -> ResumeState:
    """Before the loader: drop temp files of killed runs; with --resume, skip the images already done."""
    removed = clean_stale_temps(plan.out)
    if removed:
        log(f"removed {removed} temporary file(s) left in {plan.out} by an interrupted run")
    if not plan.settings.resume:
        return ResumeState()
    state = plan_resume(
        plan.out, manifest, [f.rel for f in plan.files], lambda rel, row: _row_outputs(plan, rel, row), plan.columns
    )
    log(f"resume: {len(state.done)} of {len(plan.files)} images already explained in {plan.out}")
    manifest["resume"] = {"skipped": len(state.done)}
    plan.files = [f for f in plan.files if f.rel not in state.done]
    return state


def _stream(
    plan: _Plan,
    engine: CamEngine,
    progress: ProgressFn | None,
    on_start: Callable[[int], None] | None,
    log: LogFn | None = None,
    world: World | None = None,
) -> RunSummary:
    """The hot loop. run.json is written first (status running) and rewritten at the end, also when interrupted.

    In a distributed run rank 0 prepares OUT (resume included) and tells the others which images are left;
    each rank explains its share of them into its own rank CSV, and `_finish_ranks` merges.
    """
    world = world or World()
    out_dir = plan.out
    manifest = _manifest(plan)
    all_files = plan.files
    resumed = ResumeState()

    def prepare_out() -> list[int] | None:
        """Rank 0 (or the one process), before anybody writes; returns the indexes of the images left to do."""
        nonlocal resumed
        out_dir.mkdir(parents=True, exist_ok=True)
        # rank CSVs an earlier distributed run left (it stopped before its merge): merged in with --resume
        fold_rank_csvs(out_dir, lambda: [csv_text(f.rel) for f in all_files], plan.settings.resume, plan.columns)
        resumed = _resume_filter(plan, manifest, log or (lambda message: None))
        if world.active:
            manifest["distributed"] = world.describe()
            rewrite_csv(out_dir / "predictions.csv", resumed.kept_rows, plan.columns)  # merged so far
        write_manifest(out_dir / "run.json", manifest)
        if not world.active or not resumed.done:
            return None  # all of them
        return [i for i, f in enumerate(all_files) if f.rel not in resumed.done]

    left = world.from_rank0("todo", prepare_out)  # one process: just prepare_out()
    if world.rank != 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        plan.files = all_files if left is None else [all_files[i] for i in left]
    plan.files = world.shard(plan.files, plan.settings.batch_size)
    settings, device, files = plan.settings, plan.device, plan.files
    if on_start is not None:
        on_start(len(files))
    spec = plan.loaded.spec
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255.0
    lut = _Colours(colormap_lut(settings.colormap), device, settings.alpha)
    save = set(settings.save)
    loader = make_loader(
        files,
        spec,
        settings.batch_size,
        settings.workers,
        keep_original="overlay" in save,
        pin=device.type == "cuda",
        max_pixels=settings.max_pixels,
        device_decode=settings.decode == "device",
    )
    decoder = None
    if settings.decode == "device":
        from gradcam_cli.devicedecode import DeviceDecoder

        decoder = DeviceDecoder(spec, device, "overlay" in save, lambda i: files[i].path, settings.max_pixels)
    stages = {"decode_wait": 0.0, "compute": 0.0, "render": 0.0}
    ok = errors = 0
    start = time.perf_counter()
    evaluator = plan.evaluator
    keep = () if world.active else resumed.kept_rows  # distributed: in predictions.csv already
    writer = OutputWriter(out_dir, out_dir / world.csv_name, threads=2, keep_rows=keep, columns=plan.columns)
    status = "interrupted"
    failure: BaseException | None = None
    pillow_blocks = pillow_block_cache()  # restored in the finally below
    try:
        t_wait = time.perf_counter()
        for batch in loader:
            stages["decode_wait"] += time.perf_counter() - t_wait
            if decoder is not None:
                batch = decoder.finish(batch)
            rows: dict[int, list[dict[str, Any]]] = {}
            outputs: list[tuple[str, Encoder]] = []
            for index, message in batch.errors:
                rows[index] = [_error_row(files[index].rel, message, settings.method)]
            if evaluator is not None:  # --only-below: confident images get a `skipped` row and leave the batch
                batch = evaluator.skip_confident(batch, mean, std, device, rows)
            if batch.inputs is not None:
                t0 = time.perf_counter()
                x = batch.inputs.to(device, non_blocking=True).float().sub_(mean).div_(std)
                if settings.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                result = run_splitting_on_oom(engine, x, _batch_selector(plan, batch.indices, device), settings.amp)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                stages["compute"] += t1 - t0
                _render_batch(plan, batch, result, lut, save, rows, outputs)
                stages["render"] += time.perf_counter() - t1
                if evaluator is not None:
                    evaluator.add_columns(batch, x, result, rows)
            for index in sorted(rows):
                if rows[index][0]["status"] == "ok":
                    ok += 1
                elif rows[index][0]["status"] != "skipped":
                    errors += 1
            writer.submit_batch(outputs, [row for index in sorted(rows) for row in rows[index]])
            if progress is not None:
                progress(len(rows))
            t_wait = time.perf_counter()
        status = "complete"
    except BaseException as exc:
        failure = exc
        raise
    finally:
        try:
            writer.close()
        finally:
            restore_pillow_blocks(pillow_blocks)
            if status == "complete" and resumed.done and not world.active:
                _restore_input_order(out_dir / "predictions.csv", all_files, plan.columns)
            seconds = time.perf_counter() - start
            stages["write_threads"] = writer.write_seconds
            if decoder is not None:
                stages["device_decode"] = decoder.seconds
            skipped = len(resumed.done)
            confident = evaluator.skipped if evaluator is not None else 0
            counts = {"images": len(all_files), "ok": ok + skipped, "error": errors}
            if evaluator is not None:
                stages.update(evaluator.stage_seconds)
                if settings.only_below is not None:
                    counts["skipped"] = confident
            done = ok + errors + confident
            timing = {
                "wall_seconds": round(seconds, 3),
                "images_per_second": round(done / seconds, 3) if seconds > 0 else None,
                "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
                "stage_images_per_second": {k: round(done / v, 2) for k, v in stages.items() if v > 0},
            }
            manifest.update(status=status, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            # where overlay JPEGs were encoded: "device" (nvJPEG via torchvision.io) or "pillow" (writer threads)
            manifest["overlay_jpeg"] = "device" if lut.device_codec else "pillow"
            if lut.codec_failure is not None:
                manifest["overlay_jpeg_device_error"] = lut.codec_failure
            if plan.decode_error is not None:
                manifest["decode_device_error"] = plan.decode_error
            if decoder is not None:
                manifest["device_decoded"] = {"jpeg": decoder.decoded, "pillow_fallback": decoder.fallbacks}
            if not world.active:
                manifest.update(counts=counts, **timing)
                write_manifest(out_dir / "run.json", manifest)
            else:  # this rank's report to rank 0, which merges and writes run.json
                report = {"rank": world.rank, "host": host(), "device": str(device), "status": status}
                report.update(images=len(files), ok=ok, error=errors, skipped=confident, **timing)
                if failure is not None:
                    report["reason"] = one_line(failure)
                    world.stopped(report, failure)
                    if world.rank == 0:
                        manifest.update(ranks=[report], note=STOPPED_NOTE)
                        write_manifest(out_dir / "run.json", manifest)
    if world.active:
        return _finish_ranks(plan, manifest, world, report, all_files, start, skipped)
    return RunSummary(
        out=str(out_dir),
        total=len(all_files),
        ok=ok + skipped,
        errors=errors,
        seconds=seconds,
        images_per_second=done / seconds if seconds > 0 else 0.0,
        layers=list(plan.layers),
        stages=stages,
        skipped=skipped,
        skipped_confident=confident,
    )


STOPPED_NOTE = (
    "this run stopped before the ranks' results were merged: the predictions.rank<k>.csv files in this folder "
    "hold them; run the same command with --resume to merge them and explain only what is missing"
)


def _finish_ranks(
    plan: _Plan,
    manifest: dict[str, Any],
    world: World,
    report: dict[str, Any],
    all_files: Sequence[ImageFile],
    start: float,
    skipped: int,
) -> RunSummary:
    """The finish line of a distributed run: every rank reports; rank 0 waits for all of them (a rank whose
    heartbeat stopped is given up on), merges the rank CSVs into predictions.csv in input order and writes
    run.json; every rank returns the same summary, or raises when images are missing (exit code 4)."""
    out_dir, order = plan.out, [csv_text(f.rel) for f in all_files]
    confident = plan.settings.only_below is not None

    concluding = False

    def finish(reports: dict[int, Any]) -> dict[str, Any]:
        nonlocal concluding
        concluding = True
        return conclude(world, out_dir, manifest, reports, order, start, skipped, plan.columns, confident)

    try:
        outcome = world.finish(report, finish)
    except BaseException as exc:
        if world.rank == 0 and not concluding:  # stopped while waiting for the others: nothing merged yet
            world.stopped(report, exc)
            manifest.update(status="interrupted", finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
            manifest.update(ranks=[report], note=STOPPED_NOTE)
            write_manifest(out_dir / "run.json", manifest)
        raise
    if outcome["exit_code"] not in (0, 1):
        raise RunStopped(outcome["message"], outcome["exit_code"], quiet=world.rank != 0)
    totals = outcome["summary"]
    return RunSummary(
        out=str(out_dir),
        total=totals["total"],
        ok=totals["ok"],
        errors=totals["errors"],
        seconds=totals["seconds"],
        images_per_second=totals["images_per_second"],
        layers=list(plan.layers),
        stages=totals["stages"],
        skipped=totals["skipped"],
        skipped_confident=totals["confident"],
        ranks=world.size,
    )


def _restore_input_order(csv_path: Path, files: Sequence[ImageFile], columns: Sequence[str] = CSV_COLUMNS) -> None:
    """Kept rows came first and new ones after: put them back in input order, as an uninterrupted run has them."""
    order = {csv_text(f.rel): i for i, f in enumerate(files)}
    rows = read_csv_rows(csv_path, columns)
    rows.sort(key=lambda row: order.get(row["path"], len(order)))  # stable: an image's own rows keep their order
    rewrite_csv(csv_path, rows, columns)


def _torchvision_version() -> str:
    try:
        import torchvision

        return str(torchvision.__version__)
    except ImportError:
        return "not installed"


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run_splitting_on_oom(engine: CamEngine, x: torch.Tensor, selector: Any, amp: str = "none") -> Any:
    """engine.run, halving the batch and retrying when the device runs out of memory; no image is dropped.

    With `amp` the forward (and the head's backward) run under autocast; the CAM maths is float32 in the engine.
    The retry runs after the `except` block, not in it: while the handler runs, the exception's traceback keeps
    the failed attempt's frames, and with them its activations, alive on the device.
    """
    try:
        if amp == "none":
            return engine.run(x, selector)
        with torch.autocast(device_type=x.device.type, dtype=AMP_DTYPES[amp]):
            return engine.run(x, selector)
    except torch.cuda.OutOfMemoryError:
        if x.shape[0] == 1:
            raise
    if x.device.type == "cuda":
        torch.cuda.empty_cache()
    half = x.shape[0] // 2
    first, second = selector.split(half) if hasattr(selector, "split") else (selector, selector)
    return CamResult.cat(
        [
            run_splitting_on_oom(engine, x[:half], first, amp),
            run_splitting_on_oom(engine, x[half:], second, amp),
        ]
    )


class _Colours:
    """The colormap in both forms the overlay paths need: a device LUT (GPU) and a Pillow palette (CPU).

    On CUDA the overlay is also JPEG-encoded there (nvJPEG through torchvision.io), so only the compressed
    bytes cross to the host; a torchvision built without nvJPEG makes the first call fail, and from then on
    the uint8 overlay is copied back and encoded by Pillow on a writer thread, as before.
    """

    def __init__(self, table: Any, device: torch.device, alpha: float, device_codec: bool | None = None) -> None:
        self.on_host = device.type == "cpu"
        self.alpha = alpha
        self.palette = palette(table)
        self.lut = torch.from_numpy(table).to(device)
        self.device_codec = device.type == "cuda" if device_codec is None else device_codec
        self.codec_failure: str | None = None

    def overlay_encoder(self, original: torch.Tensor, heat_device: torch.Tensor, heat_host: Any) -> Encoder:
        """On the CPU, colouring + blending + JPEG all run later on a writer thread; on a GPU the blend (and
        the JPEG encoding, where torchvision can) runs on the device now and only bytes or uint8 come back."""
        if self.on_host and not self.device_codec:
            return partial(_overlay_jpeg, original.numpy(), heat_host, self.palette, self.alpha)
        device = heat_device.device
        mixed = blend(original.to(device, non_blocking=True), heat_device, self.lut, self.alpha)
        if self.device_codec:
            data = self._device_jpeg(mixed)
            if data is not None:
                return partial(bytes, data)
        return partial(encode_jpeg, mixed.cpu().numpy())

    def _device_jpeg(self, mixed: torch.Tensor) -> bytes | None:
        """JPEG bytes encoded where `mixed` (H, W, 3) lives, or None when this torchvision cannot (remembered)."""
        import warnings

        import torchvision

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its codecs in favour of TorchCodec
                encoded = torchvision.io.encode_jpeg(mixed.permute(2, 0, 1).contiguous(), quality=JPEG_QUALITY)
        except (RuntimeError, NotImplementedError) as exc:
            self.device_codec = False
            self.codec_failure = one_line(exc)
            return None
        return encoded.cpu().numpy().tobytes()


def _overlay_jpeg(original: Any, heat: Any, pal: bytes, alpha: float) -> bytes:
    return encode_jpeg(blend_host(original, heat, pal, alpha))


def _render_batch(
    plan: _Plan,
    batch: Any,
    result: Any,
    lut: _Colours,
    save: set[str],
    rows: dict[int, list[dict[str, Any]]],
    outputs: list[tuple[str, Encoder]],
) -> None:
    """Turn one batch's CAMs into rows and files; a non-finite result is an error row for that image only.

    One row per (image, target, map): a map per layer, or the one fused map (`--fuse`), or `input` for
    guided-backprop. The guided methods add a guided/ picture per row (`_guided_outputs`).
    """
    settings, files, labels = plan.settings, plan.files, plan.loaded.labels
    names = list(result.cams)
    multi_layer, multi_target = len(names) > 1, plan.selector.slots > 1
    probs = result.probs
    pred_prob, pred_index = probs.max(dim=1)
    target_prob = probs.gather(1, result.targets)
    finite_logits = torch.isfinite(result.logits).all(dim=1)
    cam_max = {name: cams.amax(dim=(2, 3)) for name, cams in result.cams.items()}
    finite_cams = {name: torch.isfinite(cams).flatten(1).all(dim=1) for name, cams in result.cams.items()}
    # one host copy of the small per-image numbers
    pred_prob_l, pred_index_l = pred_prob.tolist(), pred_index.tolist()
    target_l, target_prob_l = result.targets.tolist(), target_prob.tolist()
    finite_l = finite_logits.tolist()
    cam_max_l = {k: v.tolist() for k, v in cam_max.items()}
    finite_cams_l = {k: v.tolist() for k, v in finite_cams.items()}
    for i, index in enumerate(batch.indices):
        rel = files[index].rel
        truth = plan.truth_index[index] if plan.truth_index is not None else None
        if truth is None and plan.selector.uses_label:
            rows[index] = [_error_row(rel, f"--target label: {plan.truth_why[index]}", settings.method)]
            continue
        if not finite_l[i] or not all(finite_cams_l[name][i] for name in names):
            what = "logits" if not finite_l[i] else "CAM"
            rows[index] = [_error_row(rel, f"non-finite {what} (NaN or inf) from the model", settings.method)]
            continue
        image_rows = []
        for name in names:
            seen: set[int] = set()
            for t, target in enumerate(target_l[i]):
                if target in seen:  # `pred` and `topk:K` can name the same class: one map, one row
                    continue
                seen.add(target)
                suffix = output_suffix(name, target, multi_layer, multi_target)
                cam = result.cams[name][i, t]
                rendered = heatmap(cam, batch.sizes[i], batch.boxes[i])
                row: dict[str, Any] = {
                    "path": rel,
                    "status": "ok",
                    "error": "",
                    "pred_index": pred_index_l[i],
                    "pred_label": label_of(labels, pred_index_l[i]),
                    "pred_prob": f"{pred_prob_l[i]:.6f}",
                    "target_index": target,
                    "target_label": label_of(labels, target),
                    "target_prob": f"{target_prob_l[i][t]:.6f}",
                    "method": settings.method,
                    "layer": name,
                    "cam_max": f"{cam_max_l[name][i][t]:.6g}",
                    "peak_x": rendered.peak_x,
                    "peak_y": rendered.peak_y,
                    "heatmap": "",
                    "overlay": "",
                    "true_index": "" if truth is None else truth,
                    "true_label": "" if truth is None else label_of(labels, truth),
                    "correct": "" if truth is None else ("true" if truth == pred_index_l[i] else "false"),
                    "guided": "",
                }
                heat = rendered.pixels.cpu().numpy()
                if "heatmap" in save:
                    row["heatmap"] = output_name("heatmaps", rel, suffix, "png")
                    outputs.append((row["heatmap"], partial(encode_png, heat)))
                if "overlay" in save and batch.originals[i] is not None:
                    row["overlay"] = output_name("overlays", rel, suffix, "jpg")
                    outputs.append((row["overlay"], lut.overlay_encoder(batch.originals[i], rendered.pixels, heat)))
                if "npy" in save:
                    outputs.append((output_name("npy", rel, suffix, "npy"), partial(encode_npy, cam.cpu().numpy())))
                if name in result.guided:
                    row["guided"] = _guided_outputs(result.guided[name][i, t], batch, i, rel, suffix, save, outputs)
                image_rows.append(row)
        rows[index] = image_rows


def _guided_outputs(
    guided: torch.Tensor, batch: Any, i: int, rel: str, suffix: str, save: set[str], outputs: list[tuple[str, Encoder]]
) -> str:
    """guided/<rel><suffix>.png: the (3, H, W) guided map as an RGB picture at the original size (and .npy raw)."""
    picture = render_guided(guided, batch.sizes[i], batch.boxes[i]).numpy()
    path = output_name("guided", rel, suffix, "png")
    outputs.append((path, partial(encode_png, picture)))
    if "npy" in save:
        outputs.append((output_name("guided", rel, suffix, "npy"), partial(encode_npy, guided.cpu().numpy())))
    return path
