"""Tiny models whose Grad-CAM is known in advance, for tests that need to know where the map must point.

`probe()` (use as `--model toy_models:probe` with `mean: [0, 0, 0]`, `std: [1, 1, 1]`): its layer `features`
is the image brightness, average-pooled 4x4, and the logits are [mean brightness, -mean brightness]. Class 0
(`bright`) is predicted, and its Grad-CAM is proportional to the pooled brightness, so the heatmap's peak is
the brightest spot of the image *as the model saw it*. Two colour markers make it misbehave on purpose:

- an image that is pure red (R > 0.9, G and B < 0.1 on average) gets NaN logits;
- an image that is pure green gets +inf activations at `features` but finite logits (the head replaces inf
  by 0), so only its CAM is non-finite.

A uniform image gives a constant map (the case "a constant map gives zeros").
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn


def _is(x: Tensor, channel: int) -> Tensor:
    """(B,) bool: the image is (nearly) pure `channel`."""
    means = x.mean(dim=(2, 3))
    others = [c for c in range(3) if c != channel]
    return (means[:, channel] > 0.9) & (means[:, others] < 0.1).all(dim=1)


class Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((1, 3, 1, 1), 1.0 / 3.0))
        self.pool = nn.AvgPool2d(4)

    def forward(self, x: Tensor) -> Tensor:
        a = self.pool((x * self.weight).sum(dim=1, keepdim=True))
        green = _is(x, 1)[:, None, None, None]
        return torch.where(green, torch.full_like(a, float("inf")), a)


class Probe(nn.Module):
    class_names: ClassVar[list[str]] = ["bright", "dark"]

    def __init__(self) -> None:
        super().__init__()
        self.features = Features()
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.nan_to_num(self.features(x).mean(dim=(2, 3)), posinf=0.0)
        logits = self.fc(pooled)
        red = _is(x, 0)[:, None]
        return torch.where(red, torch.full_like(logits, float("nan")), logits)


def probe() -> nn.Module:
    return Probe()
