"""Guided backprop's ReLUs: every nn.ReLU / nn.ReLU6 swapped, for one engine pass, for a guided one.

Springenberg et al. (2015): guided backprop = the gradient with every ReLU's backward also zeroing negative
incoming gradients. The swapped ReLU reads `state["guided"]` at backward time, so one forward serves both a
plain backward (Grad-CAM's layer gradients) and a guided one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn


class _GuidedReLU(torch.autograd.Function):
    """ReLU / ReLU6 forward; backward passes dy only where lo < x < hi, and, in guided mode, only dy > 0.

    Written so that vmap can batch its backward (the engine's one backward for all target slots).
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
