"""Engine: one forward per batch, the fewest backward passes, differentiating only from the target layer on.

The forward hook replaces the target layer's output with a detached leaf that requires grad, and every
parameter has requires_grad turned off for the duration: so autograd records nothing before the target
layer, parameters never get `.grad`, and the backward runs through the head only. The leaf is cloned before
it flows on, so in-place ops after the layer (inplace ReLU) cannot touch what we keep.

All target slots (pred, topk:K, class lists) come from that one forward. Their gradients come from ONE
backward: `autograd.grad(logits, acts, grad_outputs=seeds, is_grads_batched=True)` with seeds (T, B, C)
one-hot at each slot's class, i.e. a vmap over the backward. Where vmap cannot run (an op without a batching
rule, a custom autograd Function without one), the engine falls back to one backward per slot on the same
graph and remembers that for the following batches.

What else a method needs is done here too, once, with everything restored on exit even after an error:
Score-CAM's masked-input forwards and Ablation-CAM's head forwards (chunked: `chunk_size` rows at a time),
and guided backprop's ReLU swap (`guided_relus`), which lasts for one `run` call only.

A layer name ending in `:input` (`_avg_pooling:input`) hooks the module's input instead of its output: the
map a pooling layer averages, when the activation before it is functional or shared.

Token sequences (ViT) and channels-last maps (Swin) are hooked as they are and viewed as (B, C, h, w) only for
the method, with the grid taken from the batch's actual input size (`layouts`).
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
import torch.nn.functional as F
from torch import Tensor, nn

from gradcam_cli import methods as M
from gradcam_cli.errors import GradcamError
from gradcam_cli.layouts import Layout, infer_layout, token_hint
from gradcam_cli.methods import CamMethod, MethodInfo

INPUT_SUFFIX = ":input"
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
# Ablation-CAM's ways to run the part of the model before the target layer, cheapest first (see CamEngine._head)
ABLATION_PREFIXES: tuple[str, ...] = ("single", "small", "full")


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
        """Join the results of consecutive sub-batches (used when a batch was split after running out of memory)."""
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


def _logits_of(output: object) -> Tensor:
    """Models return a tensor, a tuple (aux heads) or an object with `.logits`; we want the main logits."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping):
        for key in ("logits", "out"):
            if isinstance(output.get(key), Tensor):
                return output[key]
    raise GradcamError(f"the model returned {type(output).__name__}; expected a logits tensor")


# ----------------------------------------------------------------------------------- guided backprop


class _GuidedReLU(torch.autograd.Function):
    """ReLU / ReLU6 forward; backward passes dy only where lo < x < hi, and, in guided mode, only dy > 0.

    Springenberg et al. (2015): guided backprop = the gradient with every ReLU's backward also zeroing
    negative incoming gradients. `state["guided"]` is read at backward time, so one forward serves both a
    plain backward (Grad-CAM's layer gradients) and a guided one. Written so vmap can batch its backward.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, lo: float, hi: float, state: dict[str, bool]) -> Tensor:  # type: ignore[override]
        return x.clamp(min=lo, max=hi)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, lo, hi, state = inputs
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi, ctx.state = lo, hi, state

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        inside = x > ctx.lo
        if ctx.hi is not None:
            inside = inside & (x < ctx.hi)
        grad = grad * inside
        if ctx.state["guided"]:
            grad = grad.clamp(min=0)
        return grad, None, None, None


def _guided_forward(module: nn.Module, state: dict[str, bool], x: Tensor) -> Tensor:
    hi = 6.0 if isinstance(module, nn.ReLU6) else None
    return _GuidedReLU.apply(x, 0.0, hi, state)  # type: ignore[no-any-return]


def swapped_relus(model: nn.Module) -> list[nn.Module]:
    """The model's ReLU modules whose forward is currently replaced (empty outside `guided_relus`)."""
    return [m for m in model.modules() if "forward" in m.__dict__ and getattr(m, "_gradcam_guided", False)]


@contextlib.contextmanager
def guided_relus(model: nn.Module, state: dict[str, bool]) -> Iterator[list[nn.Module]]:
    """Swap the forward of every nn.ReLU / nn.ReLU6 for the guided one; restore them all on exit, even on error.

    The forward is replaced on the instance rather than the module in its parent, so hooks on a ReLU (a
    target layer, say) keep firing. Functional activations (torch.relu in a forward method) are not modules
    and stay plain, as in Captum and pytorch-grad-cam.
    """
    swapped: list[nn.Module] = []
    try:
        for module in model.modules():
            if isinstance(module, (nn.ReLU, nn.ReLU6)) and "forward" not in module.__dict__:
                module.forward = partial(_guided_forward, module, state)  # type: ignore[method-assign]
                module._gradcam_guided = True  # type: ignore[assignment]
                swapped.append(module)
        yield swapped
    finally:
        for module in swapped:
            del module.forward
            del module._gradcam_guided


# ----------------------------------------------------------------------------------------- the engine


def resolve_method(method: str | CamMethod | MethodInfo) -> MethodInfo:
    """A method name, a MethodInfo, or a custom gradient function fn(A, G) -> (N, h, w)."""
    if isinstance(method, MethodInfo):
        return method
    if isinstance(method, str):
        if method not in M.METHOD_INFO:
            raise GradcamError(f"--method {method}: expected one of {', '.join(M.METHOD_INFO)}")
        return M.METHOD_INFO[method]
    return MethodInfo(
        getattr(method, "__name__", "custom"), "gradient", eigen_smooth=False, layer_grads=True, fn=method
    )


class CamEngine:
    """Hooks target layers of `model` while in a `with` block; `run` explains one batch.

    Targets per image are chosen by `select_targets(logits) -> (B, T) long tensor` so that `pred`,
    `topk:K` and fixed class lists all share one forward. Options: `counterfactual` explains the negated
    score -y (for gradient methods: negated gradients), `eigen_smooth` replaces the channel sum by the
    first principal component, `aug_smooth` averages over `AUGMENTATIONS`, `fuse` (`mean`/`max`) merges
    several layers into one map, `chunk_size` bounds the rows of Score-CAM / Ablation-CAM forwards.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module],
        method: str | CamMethod | MethodInfo = "gradcam",
        *,
        counterfactual: bool = False,
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
        fuse: str | None = None,
        chunk_size: int = 32,
    ) -> None:
        self.model = model
        self.info = resolve_method(method)
        self.layers = dict(layers) if self.info.uses_layer else {}
        self.counterfactual = counterfactual
        self.eigen_smooth = eigen_smooth
        self.aug_smooth = aug_smooth
        self.fuse = None if fuse in (None, "none") else fuse
        self.chunk_size = chunk_size
        validate_options(self.info, counterfactual, eigen_smooth, self.fuse, len(self.layers), chunk_size)
        self._acts: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_flags: list[tuple[nn.Parameter, bool]] = []
        self._capture = False
        self._replace: tuple[str, Tensor] | None = None
        self._guided_state = {"guided": False}
        self.batched_backward = True  # becomes False once vmap over the backward failed for this model
        # how Ablation-CAM runs the layers before the target (see _head); moves down ABLATION_PREFIXES on failure
        self.ablation_prefix = ABLATION_PREFIXES[0]
        self.backward_passes = 0  # autograd.grad calls so far (tests and benchmarks read it)
        self._low_precision = False
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

    # -------------------------------------------------------------------------------------------- run

    def check(self, x: Tensor, select_targets: Callable[[Tensor], Tensor]) -> CamResult:
        """A cheap dry run on `x`: layers, targets, GAP+FC for `cam`, gradient paths; skips the costly passes.

        Returns the per-layer maps (not fused; all zero for Score-CAM / Ablation-CAM, whose passes are skipped),
        so the caller can check their sizes.
        """
        raw = self._run(x, select_targets, None, probe=True)
        return CamResult(logits=raw.logits, probs=raw.logits.softmax(dim=1), targets=raw.targets, cams=raw.cams)

    def run(self, x: Tensor, select_targets: Callable[[Tensor], Tensor]) -> CamResult:
        """Explain `x` (B, 3, H, W): pick targets on its logits, compute every (image, target, layer) map."""
        raw = self._run(x, select_targets, None)
        if self.aug_smooth:
            raw = self._augmented(x, raw)
        cams = raw.cams
        if self.fuse is not None:
            cams = {M.fused_name(list(cams)): M.fuse_maps([c.flatten(0, 1) for c in cams.values()], self.fuse)}
            b, t = raw.targets.shape
            cams = {k: v.view(b, t, *v.shape[-2:]) for k, v in cams.items()}
        guided: dict[str, Tensor] = {}
        if raw.input_grads is not None:
            if self.info.name == "guided-backprop":
                guided = {GUIDED_NAME: raw.input_grads}
            else:
                for name, c in cams.items():
                    product = M.guided_gradcam(raw.input_grads.flatten(0, 1), c.flatten(0, 1))
                    guided[name] = product.view(raw.input_grads.shape)
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
        info = self.info
        needs_grad = info.layer_grads or info.input_grads
        self._acts.clear()
        self._input_hw = (int(x.shape[-2]), int(x.shape[-1]))
        try:
            with contextlib.ExitStack() as stack:
                if info.input_grads:
                    stack.enter_context(guided_relus(self.model, self._guided_state))
                    x = x.detach().requires_grad_(True)
                stack.enter_context(torch.enable_grad() if needs_grad else torch.no_grad())
                self._capture = True
                try:
                    logits = _logits_of(self.model(x))
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
                if info.layer_grads:
                    layer_grads = self._grads(logits, targets, acts, retain=info.input_grads, what=names)
                input_grads = None
                if info.input_grads:
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
                    if info.name == "guided-backprop":
                        cams[GUIDED_NAME] = M.guided_saliency(input_grads.flatten(0, 1)).view(
                            *targets.shape, *x.shape[-2:]
                        )
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
        sign = -1.0 if self.counterfactual else 1.0
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
        """One vmapped backward for all slots; None (and no more tries) when vmap cannot batch this model."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self.backward_passes += 1
                grads = torch.autograd.grad(
                    logits, list(wrt), grad_outputs=seeds, is_grads_batched=True, retain_graph=True, allow_unused=True
                )
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
        """Per layer (B, T, h, w) maps from the captured activations (and gradients, scores, weights)."""
        info = self.info
        b, t = targets.shape
        sign = -1.0 if self.counterfactual else 1.0
        cams: dict[str, Tensor] = {}
        for li, name in enumerate(names):
            layout = self.layouts[name]
            raw = acts[li].detach()
            a = layout.to_nchw(raw).float()  # (B, K, h, w) whatever the layer's own layout
            k, h, w = a.shape[1:]
            rep = a.unsqueeze(1).expand(b, t, k, h, w).reshape(b * t, k, h, w)
            if info.kind == "activation":
                cams[name] = M.eigencam(a)[:, None].expand(b, t, h, w)
                continue
            if info.layer_grads:
                g = layout.to_nchw(layer_grads[li].flatten(0, 1)).reshape(t, b, k, h, w)
                g = g.transpose(0, 1).reshape(b * t, k, h, w).float()
                fn = info.fn if info.fn is not None else M.gradcam
                maps = fn(rep, g, eigen_smooth=True) if self.eigen_smooth else fn(rep, g)
            elif info.kind == "linear":
                weight = self._final_linear(name, a, logits)
                maps = M.cam(rep, sign * weight[targets.flatten()].float(), self.eigen_smooth)
            elif probe:
                maps = torch.zeros(b * t, h, w, device=a.device)
            elif info.kind == "score":
                scores = self._scorecam_scores(x, name, a, targets)
                maps = M.scorecam(rep, sign * scores.reshape(b * t, k), self.eigen_smooth)
            elif info.kind == "ablation":
                base, ablated = self._ablation_scores(x, name, raw, layout, targets, logits)
                maps = M.ablationcam(rep, sign * base.flatten(), sign * ablated.reshape(b * t, k), self.eigen_smooth)
            else:  # pragma: no cover - METHOD_INFO has no other kinds
                raise GradcamError(f"method '{info.name}' has unknown kind '{info.kind}'")
            cams[name] = maps.view(b, t, h, w)
        return cams

    def _final_linear(self, name: str, a: Tensor, logits: Tensor) -> Tensor:
        """The weight (C, K) of the Linear layer that CAM needs, after checking logits == W mean_ij(A) + b."""
        linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        hint = "use gradcam (for GAP+FC models it equals CAM up to a constant factor)"
        if not linears:
            raise GradcamError(f"method 'cam' needs a model ending in global average pooling + a Linear layer; {hint}")
        fc = linears[-1]
        k = a.shape[1]
        if fc.in_features != k or fc.out_features != logits.shape[1]:
            raise GradcamError(
                f"method 'cam': layer '{name}' has {k} channels but the final Linear layer maps "
                f"{fc.in_features} -> {fc.out_features}; pick the layer right before global average pooling, or {hint}"
            )
        weight = fc.weight.detach()
        predicted = a.mean(dim=(2, 3)) @ weight.float().t()
        if fc.bias is not None:
            predicted = predicted + fc.bias.detach().float()
        scale = max(1.0, float(logits.abs().max()))
        tol = 3e-2 if self._low_precision else 1e-3  # bf16/fp16 logits under --amp carry ~3 significant digits
        if not torch.allclose(predicted, logits, rtol=tol, atol=tol * scale):
            raise GradcamError(
                f"method 'cam': layer '{name}' does not feed global average pooling + the final Linear layer directly "
                "(its logits != fc(mean(A))); pick the map that the pooling averages (e.g. POOLING_MODULE:input "
                f"when an activation sits in between), or {hint}"
            )
        return weight

    def _scorecam_scores(self, x: Tensor, name: str, a: Tensor, targets: Tensor) -> Tensor:
        """(B, T, K): target scores of the input masked by each channel's normalised upsampled map.

        Rows (image, channel) are flattened and run `chunk_size` at a time, so memory is bounded by the chunk,
        not by B x K; the hooks pass everything through unchanged meanwhile.
        """
        b, k = a.shape[:2]
        t = targets.shape[1]
        flat = a.reshape(b * k, *a.shape[2:])
        scores = torch.empty(b * k, t, device=a.device)
        size = (x.shape[-2], x.shape[-1])
        for start in range(0, b * k, self.chunk_size):
            rows = torch.arange(start, min(start + self.chunk_size, b * k), device=a.device)
            image = rows // k
            masks = M.normalized_masks(flat[rows], size).to(x.dtype)
            out = _logits_of(self.model(x[image] * masks[:, None]))
            scores[rows] = out.float().gather(1, targets[image])
        return scores.view(b, k, t).transpose(1, 2)

    def _ablation_scores(
        self, x: Tensor, name: str, raw: Tensor, layout: Layout, targets: Tensor, logits: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(B, T) target scores and (B, T, K) scores with each channel of the layer set to zero.

        Rows per image: one intact control, then one per ablated channel, `chunk_size` at a time; the hook
        substitutes them for the layer's output (in its own layout: `raw`), so only the head after the layer
        does real work (see _head). A channel is zeroed at every position of the map (token layouts: the patch
        tokens, not the class/prefix tokens, which have no position).
        """
        b = raw.shape[0]
        k = layout.to_nchw(raw[:1]).shape[1]
        t = targets.shape[1]
        base = torch.empty(b, t, device=raw.device)
        ablated = torch.empty(b, k, t, device=raw.device)
        for i in range(b):
            for start in range(0, k + 1, self.chunk_size):
                rows = torch.arange(start, min(start + self.chunk_size, k + 1), device=raw.device)
                batch = raw[i : i + 1].expand(len(rows), *raw.shape[1:]).clone()
                ablate = rows > 0
                _zero_channels(batch, layout, ablate.nonzero()[:, 0], rows[ablate] - 1)
                out = self._head(x[i : i + 1], name, batch, logits[i] if start == 0 else None)
                scores = out.float().gather(1, targets[i : i + 1].expand(len(rows), t))
                if start == 0:
                    base[i] = scores[0]
                ablated[i, rows[ablate] - 1] = scores[ablate]
        return base, ablated.transpose(1, 2)

    def _head(self, xi: Tensor, name: str, batch: Tensor, expected: Tensor | None) -> Tensor:
        """Logits of the model with layer `name`'s output replaced by `batch` (n, K, h, w); xi (1, 3, H, W).

        What runs before the layer is thrown away, so it is run as cheaply as the model allows, trying in turn
        (ABLATION_PREFIXES): `single`, one reduced-size copy of the image (the head broadcasts nothing from
        before the layer); `small`, n reduced-size copies (models that reshape with the input's batch size);
        `full`, n full-size copies, which is always exact. A way is kept while its output has n rows and the
        control row (`expected`, the intact activations) reproduces the model's logits; a skip connection
        around the layer, or a model that needs its input size, fails that and moves to the next way.
        """
        n = batch.shape[0]
        while self.ablation_prefix != "full":
            side = (max(32, xi.shape[-2] // 8), max(32, xi.shape[-1] // 8))
            small = F.interpolate(xi, size=(min(side[0], xi.shape[-2]), min(side[1], xi.shape[-1])), mode="area")
            feed = small if self.ablation_prefix == "single" else small.expand(n, *small.shape[1:])
            try:
                with self._replacing(name, batch):
                    out = _logits_of(self.model(feed))
                ok = out.dim() == 2 and out.shape[0] == n
                if ok and expected is not None:
                    scale = max(1.0, float(expected.abs().max()))
                    ok = torch.allclose(out[0].float(), expected, rtol=1e-4, atol=1e-4 * scale)
                if ok:
                    return out
            except (RuntimeError, ValueError, AssertionError, IndexError, GradcamError):
                pass
            self.ablation_prefix = ABLATION_PREFIXES[ABLATION_PREFIXES.index(self.ablation_prefix) + 1]
        with self._replacing(name, batch):
            return _logits_of(self.model(xi.expand(n, *xi.shape[1:])))


def _zero_channels(batch: Tensor, layout: Layout, rows: Tensor, channels: Tensor) -> None:
    """In place: batch[rows[j]] gets channel channels[j] set to 0 at every position, in the layer's layout."""
    if layout.kind == "nchw":
        batch[rows, channels] = 0
    elif layout.kind == "nhwc":
        batch[rows, :, :, channels] = 0
    else:  # tokens (B, prefix + h*w, C): the patch tokens only
        batch[rows, layout.prefix :, channels] = 0


def validate_options(
    info: MethodInfo, counterfactual: bool, eigen_smooth: bool, fuse: str | None, n_layers: int, chunk_size: int
) -> None:
    """One-line errors for option combinations that have no meaning (before anything runs)."""
    if counterfactual and not info.class_specific:
        raise GradcamError(
            f"--counterfactual: {info.name} is class-agnostic (no class score to negate); use eigengradcam"
        )
    if eigen_smooth and not info.eigen_smooth:
        raise GradcamError(f"--eigen-smooth: has no effect with {info.name} (it is not a channel-weighted sum)")
    if fuse is not None:
        if not info.uses_layer:
            raise GradcamError(f"--fuse {fuse}: {info.name} does not use target layers")
        if fuse not in ("mean", "max"):
            raise GradcamError(f"--fuse: expected none, mean or max, got {fuse!r}")
        if n_layers < 2:
            raise GradcamError(f"--fuse {fuse}: needs two or more --layer values (got {n_layers})")
    if info.uses_layer and n_layers < 1:
        raise GradcamError(f"method '{info.name}' needs at least one target layer")
    if chunk_size < 1:
        raise GradcamError(f"--chunk-size: expected a positive integer, got {chunk_size}")
