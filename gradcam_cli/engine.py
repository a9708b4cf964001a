"""Engine: one forward and one backward per batch, differentiating only from the target activations on.

The forward hook replaces the target layer's output with a detached leaf that requires grad, and every
parameter has requires_grad turned off for the duration: so autograd records nothing before the target
layer, parameters never get `.grad`, and the backward runs through the head only. The leaf is cloned before
it flows on, so in-place ops after the layer (inplace ReLU) cannot touch what we keep. Token sequences
(ViT) and channels-last maps (Swin) are hooked as they are and viewed as (B, C, h, w) only for the method,
with the grid taken from the batch's actual input size (`layouts`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import torch
from torch import Tensor, nn

from gradcam_cli.errors import GradcamError
from gradcam_cli.layouts import Layout, infer_layout, token_hint
from gradcam_cli.methods import CamMethod


@dataclass
class CamResult:
    """Per batch: logits (B, C), softmax probs (B, C), target classes (B, T), and per layer (B, T, h, w) maps."""

    logits: Tensor
    probs: Tensor
    targets: Tensor
    cams: dict[str, Tensor]

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
        )


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


class CamEngine:
    """Hooks target layers of `model` while in a `with` block; `run` explains one batch.

    Targets per image are chosen by `select_targets(logits) -> (B, T) long tensor` so that `pred`,
    `topk:K` and fixed class lists all share one forward.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module], method: CamMethod) -> None:
        self.model = model
        self.layers = dict(layers)
        self.method = method
        self._acts: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_flags: list[tuple[nn.Parameter, bool]] = []
        # token sequences and channels-last maps are viewed as (B, C, h, w) for the method (see `layouts`)
        self._hint = token_hint(model)
        self._input_hw: tuple[int, int] = (0, 0)
        self.layouts: dict[str, Layout] = {}

    def __enter__(self) -> CamEngine:
        try:
            for name, module in self.layers.items():
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

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> Tensor:
            layout = None
            if isinstance(output, Tensor):
                layout = infer_layout(tuple(output.shape), self._input_hw, self._hint, strict=False)
            if layout is None or not isinstance(output, Tensor):
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise GradcamError(
                    f"layer '{name}' outputs {shape}, not a spatial map ((B, C, h, w), (B, h, w, C) or tokens on a "
                    "grid of the input); choose an earlier layer (see `gradcam layers MODEL`)"
                )
            self.layouts[name] = layout
            # The first hooked layer to run becomes a leaf (nothing before it is recorded); a later hooked layer
            # is already in the graph and must stay there, or the earlier layer would lose its gradient path.
            act = output if output.requires_grad else output.detach().requires_grad_(True)
            self._acts[name] = act
            return act.clone()

        return hook

    def run(self, x: Tensor, select_targets: object) -> CamResult:
        """Forward `x` (B, 3, H, W), pick targets, backprop each target slot once for the whole batch."""
        self._acts.clear()
        self._input_hw = (int(x.shape[-2]), int(x.shape[-1]))
        with torch.enable_grad():
            logits = _logits_of(self.model(x))
            missing = [n for n in self.layers if n not in self._acts]
            if missing:
                raise GradcamError(f"layer '{missing[0]}' was not used by the model's forward pass")
            targets: Tensor = select_targets(logits)  # type: ignore[operator]
            names = list(self.layers)
            acts = [self._acts[n] for n in names]
            if not logits.requires_grad:
                raise GradcamError(f"the output does not depend on layer '{names[0]}'")
            per_slot: list[Sequence[Tensor | None]] = []
            n_slots = targets.shape[1]
            for t in range(n_slots):
                score = logits.gather(1, targets[:, t : t + 1]).sum()
                per_slot.append(torch.autograd.grad(score, acts, retain_graph=t < n_slots - 1, allow_unused=True))
        with torch.autocast(device_type=x.device.type, enabled=False):  # CAM maths in float32 even under --amp
            cams = self._cams(names, acts, per_slot)
        self._acts.clear()
        logits = logits.detach().float()
        return CamResult(logits=logits, probs=logits.softmax(dim=1), targets=targets, cams=cams)

    def _cams(self, names: list[str], acts: list[Tensor], per_slot: list[Sequence[Tensor | None]]) -> dict[str, Tensor]:
        cams: dict[str, Tensor] = {}
        for li, name in enumerate(names):
            layout = self.layouts[name]
            a = layout.to_nchw(acts[li].detach()).float()
            maps = []
            for grads in per_slot:
                g = grads[li]
                if g is None:
                    raise GradcamError(f"the output does not depend on layer '{name}'")
                maps.append(self.method(a, layout.to_nchw(g).float()))
            cams[name] = torch.stack(maps, dim=1)
        return cams
