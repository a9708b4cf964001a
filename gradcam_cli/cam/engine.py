"""The engine: hooks on the target layers, one forward per batch, and the fewest backward passes.

The forward hook replaces the target layer's output with a detached leaf that requires grad, and every
parameter has requires_grad turned off for the duration: so autograd records nothing before the target
layer, parameters never get `.grad`, and the backward runs through the head only. The leaf is cloned before
it flows on, so in-place ops after the layer (inplace ReLU) cannot touch what we keep.

All target slots (pred, topk:K, class lists) come from that one forward. Their gradients come from ONE
backward: `autograd.grad(logits, acts, grad_outputs=seeds, is_grads_batched=True)` with seeds (T, B, C)
one-hot at each slot's class, i.e. a vmap over the backward. Where vmap cannot run (an op without a batching
rule, a custom autograd Function without one), the engine falls back to one backward per slot on the same
graph and remembers that for the following batches.

A method (`cam.methods`) turns what the engine captured into maps; the engine lends it two more passes
through the same hooks: a forward on another input (Score-CAM's masked images) and a forward with the
layer's output replaced (Ablation-CAM's ablated channels). Guided backprop's ReLU swap lasts for one `run`.

A layer name ending in `:input` (`_avg_pooling:input`) hooks the module's input instead of its output: the
map a pooling layer averages, when the activation before it is functional or shared. Token sequences (ViT)
and channels-last maps (Swin) are hooked as they are and viewed as (B, C, h, w) only for the method, with
the grid taken from the batch's actual input size (`model.layouts`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from gradcam_cli.cam.fuse import fuse_maps, fused_name
from gradcam_cli.cam.methods import check_options
from gradcam_cli.cam.methods.base import CamMethod, EngineOptions, GradientFn, LayerContext, build_method
from gradcam_cli.cam.relu_swap import guided_relus
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.forward import autocast, autocast_as, autocast_dtype, logits_of, split_on_oom
from gradcam_cli.model.layers import INPUT_SUFFIX
from gradcam_cli.model.layouts import Layout, infer_layout, token_hint

# --aug-smooth: (horizontal flip, contrast factor on the normalised input); closed under flipping, so the
# smoothed map of a mirrored image is the mirrored smoothed map
AUGMENTATIONS: tuple[tuple[bool, float], ...] = (
    (False, 1.0),
    (True, 1.0),
    (False, 0.9),
    (True, 0.9),
    (False, 1.1),
    (True, 1.1),
)
GUIDED_NAME = "input"  # the `layer` of guided-backprop maps, which come from the input gradient


@dataclass
class CamResult:
    """Per batch: logits (B, C), softmax probs (B, C), target classes (B, T), and per map name (B, T, h, w).

    `cams` is keyed by layer name (or `fused(a+b)`, or `input` for guided-backprop). `guided` holds the
    high-resolution maps of the guided methods under the same keys, (B, T, 3, H, W) at input resolution.
    """

    logits: Tensor
    probs: Tensor
    targets: Tensor
    cams: dict[str, Tensor]
    guided: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: Sequence[CamResult]) -> CamResult:
        """Join the results of consecutive sub-batches (a batch split after running out of memory)."""
        if len(parts) == 1:
            return parts[0]
        return CamResult(
            logits=torch.cat([p.logits for p in parts]),
            probs=torch.cat([p.probs for p in parts]),
            targets=torch.cat([p.targets for p in parts]),
            cams={name: torch.cat([p.cams[name] for p in parts]) for name in parts[0].cams},
            guided={name: torch.cat([p.guided[name] for p in parts]) for name in parts[0].guided},
        )


@dataclass
class _Raw:
    """One pass's un-fused results: per-layer CAMs (B, T, h, w) and guided input gradients (B, T, 3, H, W)."""

    logits: Tensor
    targets: Tensor
    cams: dict[str, Tensor]
    input_grads: Tensor | None


class CamEngine:
    """Hooks target layers of `model` while in a `with` block; `run` explains one batch.

    Targets per image are chosen by `select_targets(logits) -> (B, T) long tensor` so that `pred`,
    `topk:K` and fixed class lists all share one forward. `method` is a registered name, a `CamMethod`, or a
    function fn(activations, gradients) -> (N, h, w) for a Grad-CAM variant of your own. Options:
    `counterfactual` explains the negated score -y (for gradient methods: negated gradients),
    `eigen_smooth` replaces the channel sum by the first principal component, `aug_smooth` averages over
    `AUGMENTATIONS`, `fuse` (`mean`/`max`) merges several layers into one map, `chunk_size` bounds the rows
    of Score-CAM / Ablation-CAM forwards.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        method: str | CamMethod | GradientFn = "gradcam",
        *,
        counterfactual: bool = False,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
        fuse: str | None = None,
        chunk_size: int = 32,
    ) -> None:
        self.model = model
        self.method = build_method(method)
        self.spec = self.method.spec
        self.layers = dict(layers) if self.spec.uses_layer else {}
        self.counterfactual = counterfactual
        self.eigen_smooth = eigen_smooth
        self.aug_smooth = aug_smooth
        self.fuse = None if fuse in (None, "none") else fuse
        self.chunk_size = chunk_size
        check_options(self.spec, counterfactual, eigen_smooth, self.fuse, len(self.layers), chunk_size)
        self.options = EngineOptions(model, self._forward, -1.0 if counterfactual else 1.0, eigen_smooth, chunk_size)
        self._acts: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_flags: list[tuple[nn.Parameter, bool]] = []
        self._capture = False
        self._replace: tuple[str, Tensor] | None = None
        self._guided_state = {"guided": False}
        self.batched_backward = True  # becomes False once vmap over the backward failed for this model
        self.backward_passes = 0  # autograd.grad calls so far (tests and benchmarks read it)
        self._low_precision = False
        self._amp: torch.dtype | None = None  # the autocast dtype of the batch's forward (--amp), for the passes
        # token sequences and channels-last maps are viewed as (B, C, h, w) for the method (see `layouts`)
        self._hint = token_hint(model)
        self._input_hw: tuple[int, int] = (0, 0)
        self.layouts: dict[str, Layout] = {}

    def __enter__(self) -> CamEngine:
        try:
            for name, module in self.layers.items():
                if name.endswith(INPUT_SUFFIX):
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
                else:
                    self._handles.append(module.register_forward_hook(self._hook(name)))
            self._grad_flags = [(p, p.requires_grad) for p in self.model.parameters()]
            for p, _ in self._grad_flags:
                p.requires_grad_(False)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and restore requires_grad flags; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p, flag in self._grad_flags:
            p.requires_grad_(flag)
        self._grad_flags.clear()
        self._acts.clear()
        self._capture = False
        self._replace = None

    # ------------------------------------------------------------------------------------------ hooks

    def _take(self, name: str, output: object) -> Tensor | None:
        """Hook body: the tensor to pass on instead of `output`, or None to leave it alone."""
        if self._replace is not None:
            return self._replace[1] if self._replace[0] == name else None
        if not self._capture:
            return None
        layout = None
        if isinstance(output, Tensor):
            layout = infer_layout(tuple(output.shape), self._input_hw, self._hint, strict=False)
        if layout is None or not isinstance(output, Tensor):
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            what = "receives" if name.endswith(INPUT_SUFFIX) else "outputs"
            raise GradcamError(
                f"layer '{name}' {what} {shape}, not a spatial map ((B, C, h, w), (B, h, w, C) or tokens on a "
                "grid of the input); choose an earlier layer (see `gradcam layers MODEL`)"
            )
        self.layouts[name] = layout
        # The first hooked layer to run becomes a leaf (nothing before it is recorded); a later hooked layer
        # is already in the graph and must stay there, or the earlier layer would lose its gradient path.
        act = output if output.requires_grad else output.detach().requires_grad_(True)
        self._acts[name] = act
        return act.clone()

    def _hook(self, name: str) -> Callable[..., Tensor | None]:
        def hook(module: nn.Module, inputs: object, output: object) -> Tensor | None:
            return self._take(name, output)

        return hook

    def _pre_hook(self, name: str) -> Callable[..., tuple[Any, ...] | None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...] | None:
            first = inputs[0] if inputs else None
            new = self._take(name, first)
            return None if new is None else (new, *inputs[1:])

        return hook

    @contextlib.contextmanager
    def _replacing(self, name: str, tensor: Tensor) -> Iterator[None]:
        self._replace = (name, tensor)
        try:
            yield
        finally:
            self._replace = None

    def _forward(self, x: Tensor) -> Tensor:
        """Logits of another input, the hooks passing everything through (a method's own passes).

        Under the batch's autocast (--amp), so Score-CAM's masked forwards, whole forwards of the model, run as
        fast as the batch's own; the maps are computed in float32 around them.
        """
        with autocast_as(x.device, self._amp):
            return logits_of(self.model(x))

    def _forward_replacing(self, name: str, x: Tensor, output: Tensor) -> Tensor:
        """Logits with layer `name`'s output replaced by `output` (whatever `x` gives up to there), in float32
        even under --amp: a bf16/fp16 `output` is cast up and autocast is off.

        Why not the batch's autocast: Ablation-CAM weighs a channel by y - y_k, the score drop when it is
        zeroed, and one channel of hundreds moves a logit by less than bf16 rounds it (8 bits of mantissa),
        so bf16 heads give weights that are mostly rounding (bench/results.md has the measured maps). The part
        after a target layer is usually a small share of the model, so float32 costs little there.
        """
        if output.dtype in (torch.float16, torch.bfloat16):
            output = output.float()
        with self._replacing(name, output), autocast_as(x.device, None):
            return logits_of(self.model(x))

    # -------------------------------------------------------------------------------------------- run

    def check(self, x: Tensor, select_targets: Callable[[Tensor], Tensor]) -> CamResult:
        """A cheap dry run on `x`: layers, targets, GAP+FC for `cam`, gradient paths, and the first chunk of a
        method's own passes (`CamMethod.probe_passes`), under the caller's autocast.

        Returns the per-layer maps (not fused; all zero for methods with passes of their own, which are only
        tried), so the caller can check their sizes.
        """
        raw = self._run(x, select_targets, None, probe=True)
        return CamResult(logits=raw.logits, probs=raw.logits.softmax(dim=1), targets=raw.targets, cams=raw.cams)

    def run(self, x: Tensor, select_targets: Callable[[Tensor], Tensor]) -> CamResult:
        """Explain `x` (B, 3, H, W): pick targets on its logits, compute every (image, target, layer) map."""
        raw = self._run(x, select_targets, None)
        if self.aug_smooth:
            raw = self._augmented(x, raw)
        cams = raw.cams
        b, t = raw.targets.shape
        if self.fuse is not None:
            fused = fuse_maps([c.flatten(0, 1) for c in cams.values()], self.fuse)
            cams = {fused_name(list(cams)): fused.view(b, t, *fused.shape[-2:])}
        guided: dict[str, Tensor] = {}
        if raw.input_grads is not None:
            grads = raw.input_grads.flatten(0, 1)
            for name, c in cams.items():
                picture = self.method.picture(grads, c.flatten(0, 1) if self.spec.uses_layer else None)
                guided[name] = picture.view(raw.input_grads.shape)
        logits = raw.logits
        return CamResult(logits=logits, probs=logits.softmax(dim=1), targets=raw.targets, cams=cams, guided=guided)

    def _augmented(self, x: Tensor, base: _Raw) -> _Raw:
        """--aug-smooth: mean of the raw maps over AUGMENTATIONS, each mapped back (un-flipped) first.

        The classes are those picked on the un-augmented image, so every view explains the same class.
        """
        cams = {k: v.clone() for k, v in base.cams.items()}
        grads = None if base.input_grads is None else base.input_grads.clone()
        for flip, factor in AUGMENTATIONS[1:]:
            xa = x * factor if factor != 1.0 else x
            if flip:
                xa = xa.flip(-1)
            raw = self._run(xa, None, base.targets)
            for k, v in raw.cams.items():
                cams[k] += v.flip(-1) if flip else v
            if grads is not None and raw.input_grads is not None:
                grads += raw.input_grads.flip(-1) if flip else raw.input_grads
        n = float(len(AUGMENTATIONS))
        return _Raw(
            logits=base.logits,
            targets=base.targets,
            cams={k: v / n for k, v in cams.items()},
            input_grads=None if grads is None else grads / n,
        )

    def _run(
        self, x: Tensor, select_targets: Callable[[Tensor], Tensor] | None, fixed: Tensor | None, probe: bool = False
    ) -> _Raw:
        spec = self.spec
        needs_grad = spec.layer_grads or spec.input_grads
        self._acts.clear()
        self._input_hw = (int(x.shape[-2]), int(x.shape[-1]))
        self._amp = autocast_dtype(x.device)
        try:
            with contextlib.ExitStack() as stack:
                if spec.input_grads:
                    stack.enter_context(guided_relus(self.model, self._guided_state))
                    x = x.detach().requires_grad_(True)
                stack.enter_context(torch.enable_grad() if needs_grad else torch.no_grad())
                self._capture = True
                try:
                    logits = logits_of(self.model(x))
                finally:
                    self._capture = False
                missing = [n for n in self.layers if n not in self._acts]
                if missing:
                    raise GradcamError(f"layer '{missing[0]}' was not used by the model's forward pass")
                targets = fixed if fixed is not None else select_targets(logits)  # type: ignore[misc]
                names = list(self.layers)
                acts = [self._acts[n] for n in names]
                if needs_grad and not logits.requires_grad:
                    what = f"layer '{names[0]}'" if names else "the input"
                    raise GradcamError(f"the output does not depend on {what}")
                layer_grads: list[Tensor] = []
                if spec.layer_grads:
                    layer_grads = self._grads(logits, targets, acts, retain=spec.input_grads, what=names)
                input_grads = None
                if spec.input_grads:
                    self._guided_state["guided"] = True
                    try:
                        (input_grads,) = self._grads(logits, targets, [x], retain=False, what=[GUIDED_NAME])
                    finally:
                        self._guided_state["guided"] = False
            self._low_precision = logits.dtype not in (torch.float32, torch.float64)  # --amp
            logits = logits.detach().float()
            # the CAM maths in float32 even under --amp (the forward and the head's backward may be autocast)
            with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
                cams = self._maps(x.detach(), logits, targets, names, acts, layer_grads, probe)
                if input_grads is not None:
                    input_grads = input_grads.transpose(0, 1).float()  # (B, T, 3, H, W)
                    maps = self.method.input_maps(input_grads.flatten(0, 1))
                    if maps is not None:
                        cams[GUIDED_NAME] = maps.view(*targets.shape, *x.shape[-2:])
        finally:
            self._acts.clear()
        return _Raw(logits=logits, targets=targets, cams=cams, input_grads=input_grads)

    # --------------------------------------------------------------------------------------- backward

    def _grads(
        self, logits: Tensor, targets: Tensor, wrt: Sequence[Tensor], retain: bool, what: Sequence[str]
    ) -> list[Tensor]:
        """d(sign * y[b, targets[b, t]]) / d(wrt) for every slot t, as (T, B, ...) per tensor of `wrt`.

        One backward for all slots (vmap over the seeds) when possible, else one per slot on the same graph.
        """
        b, c = logits.shape
        t = targets.shape[1]
        sign = self.options.sign
        seeds = torch.zeros(t, b, c, dtype=logits.dtype, device=logits.device)
        seeds.scatter_(2, targets.t().unsqueeze(-1).to(logits.device), sign)
        grads: Sequence[Tensor | None] | None = None
        if t == 1:
            self.backward_passes += 1
            single = torch.autograd.grad(
                logits, list(wrt), grad_outputs=seeds[0], retain_graph=retain, allow_unused=True
            )
            grads = [None if g is None else g.unsqueeze(0) for g in single]
        elif self.batched_backward:
            grads = self._batched_grads(logits, seeds, wrt)
        if grads is None:
            per_slot = []
            for slot in range(t):
                self.backward_passes += 1
                per_slot.append(
                    torch.autograd.grad(
                        logits,
                        list(wrt),
                        grad_outputs=seeds[slot],
                        retain_graph=retain or slot < t - 1,
                        allow_unused=True,
                    )
                )
            grads = [
                None if any(s[i] is None for s in per_slot) else torch.stack([s[i] for s in per_slot])  # type: ignore[misc]
                for i in range(len(wrt))
            ]
        out = []
        for name, g in zip(what, grads, strict=True):
            if g is None:
                what = "the input" if name == GUIDED_NAME else f"layer '{name}'"
                raise GradcamError(f"the output does not depend on {what}")
            out.append(g)
        return out

    def _batched_grads(self, logits: Tensor, seeds: Tensor, wrt: Sequence[Tensor]) -> Sequence[Tensor | None] | None:
        """One vmapped backward for all slots; None (and no more tries) when vmap cannot batch this model.

        Running out of device memory says nothing about vmap: it is raised to the batch splitter (`run_batch`),
        and the halves try the batched backward again.
        """
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.backward_passes += 1
                grads = torch.autograd.grad(
                    logits, list(wrt), grad_outputs=seeds, is_grads_batched=True, retain_graph=True, allow_unused=True
                )
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError:
                self.batched_backward = False
                return None
        for w in caught:
            if "performance drop" in str(w.message):
                # vmap fell back to a slow per-slot loop inside the backward: a plain loop is as good
                self.batched_backward = False
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return grads

    # ------------------------------------------------------------------------------------------- maps

    def _maps(
        self,
        x: Tensor,
        logits: Tensor,
        targets: Tensor,
        names: list[str],
        acts: list[Tensor],
        layer_grads: list[Tensor],
        probe: bool,
    ) -> dict[str, Tensor]:
        """Per layer (B, T, h, w) maps: the method's, from what this pass captured (zeros for a probe of a
        method with passes of its own, after it ran their first chunk)."""
        b, t = targets.shape
        cams: dict[str, Tensor] = {}
        for li, name in enumerate(names):
            layout = self.layouts[name]
            raw = acts[li].detach()
            a = layout.to_nchw(raw).float()  # (B, K, h, w) whatever the layer's own layout
            k, h, w = a.shape[1:]
            g = None
            if layer_grads:
                g = layout.to_nchw(layer_grads[li].flatten(0, 1)).reshape(t, b, k, h, w)
                g = g.transpose(0, 1).reshape(b * t, k, h, w).float()
            replacing = partial(self._forward_replacing, name)
            low = self._low_precision
            ctx = LayerContext(name, a, raw, layout, g, x, logits, targets, low, self.options, replacing)
            if probe and self.spec.extra_passes:
                self.method.probe_passes(ctx)
                cams[name] = torch.zeros(b, t, h, w, device=a.device)
            else:
                cams[name] = self.method.layer_maps(ctx).view(b, t, h, w)
        return cams


def run_batch(
    engine: CamEngine, x: Tensor, select: Callable[[int, int], Callable[[Tensor], Tensor]], amp: str = "none"
) -> CamResult:
    """`engine.run` on `x` (B, 3, H, W) under `--amp`, halving the batch when the device runs out of memory.

    `select(start, stop)` is the target selector of rows start..stop (`label` targets need those images' truth).
    """

    def run(part: Tensor, start: int, stop: int) -> CamResult:
        with autocast(part.device, amp):
            return engine.run(part, select(start, stop))

    return split_on_oom(run, x, CamResult.cat)
