"""A model for the distributed tests: torchvision's resnet18 that can kill its own process on purpose.

Use as `--model dist_models:resnet18` (tests/ on PYTHONPATH). With GRADCAM_TEST_KILL_RANK=k and
GRADCAM_TEST_KILL_AT=n in the environment, the process whose RANK is k dies by SIGKILL (no clean-up, no
goodbye: what a crashed node or the OOM killer does) at the start of its n-th forward pass. The probe the
pipeline runs before the first batch is forward 1, so n=4 kills the rank after two of its batches were
computed, in the middle of its share. Without those variables it is plain resnet18 (seeded random init), so
runs with and without the kill are comparable.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import torchvision


class _Killer(torch.nn.Module):
    def __init__(self, rank: int, at: int) -> None:
        super().__init__()
        self.rank, self.at, self.calls = rank, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at and int(os.environ.get("RANK", "0")) == self.rank:
            time.sleep(0.5)  # let the writer threads finish the batches before: a kill in mid-share, not at start
            os.kill(os.getpid(), signal.SIGKILL)
        return x


def resnet18(**kwargs: Any) -> torch.nn.Module:
    model = torchvision.models.resnet18(**kwargs)
    if "GRADCAM_TEST_KILL_RANK" in os.environ:
        killer = _Killer(int(os.environ["GRADCAM_TEST_KILL_RANK"]), int(os.environ.get("GRADCAM_TEST_KILL_AT", "3")))
        model.conv1 = torch.nn.Sequential(killer, model.conv1)  # type: ignore[assignment]
    return model
