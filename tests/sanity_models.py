"""A tiny seeded convolutional classifier for the sanity-check metrics, importable as
`tests.sanity_models:tiny_net`: two 3x3 convolutions with ReLUs (`features`), global average pooling and one
Linear head (`fc`), 10 classes. Its weights are PyTorch's default initialisation under seed 0, whatever the
caller's RNG (which is left as it was)."""

from __future__ import annotations

import torch
from torch import nn

CLASSES = [f"class{i}" for i in range(10)]
CONFIG = "model: tests.sanity_models:tiny_net\nweights: none\ninput_size: 32\nmean: [0, 0, 0]\nstd: [1, 1, 1]\n"


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, len(CLASSES))
        self.class_names = list(CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def tiny_net() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyNet().eval()
