"""The fast render paths agree with the plain definitions they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradcam_cli.render.colormaps import COLORMAP_NAMES, lut
from gradcam_cli.render.heatmap import heatmap, to_uint8, upsample_normalize
from gradcam_cli.render.overlay import blend, blend_host, palette


@pytest.mark.parametrize(
    ("size", "box"),
    [((120, 160), (0, 0, 160, 120)), ((97, 203), (0, 0, 203, 97)), ((120, 160), (20.0, 0.0, 140.0, 120.0))],
)
def test_heatmap_equals_round_of_normalised_map(size: tuple[int, int], box: tuple[float, ...]) -> None:
    torch.manual_seed(0)
    cam = torch.rand(7, 7)
    fast = heatmap(cam, size, box)  # type: ignore[arg-type]
    slow = to_uint8(upsample_normalize(cam, size, box))  # type: ignore[arg-type]
    assert fast.pixels.dtype == torch.uint8 and fast.pixels.shape == size
    diff = (fast.pixels.int() - slow.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01
    assert int(fast.pixels.max()) == 255 and int(fast.pixels[fast.peak_y, fast.peak_x]) == 255
    if box[0] > 0:  # crop: zero outside the crop columns
        assert int(fast.pixels[:, :20].max()) == 0 and int(fast.pixels[:, 140:].max()) == 0


def test_constant_and_zero_maps_give_zero_heatmaps() -> None:
    for cam in (torch.zeros(7, 7), torch.full((7, 7), 3.5)):
        hm = heatmap(cam, (50, 70), (0, 0, 70, 50))
        assert int(hm.pixels.max()) == 0


@pytest.mark.parametrize("name", COLORMAP_NAMES)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_device_and_host_overlays_agree(name: str, alpha: float) -> None:
    rng = np.random.default_rng(1)
    original = rng.integers(0, 256, size=(31, 45, 3), dtype=np.uint8)
    heat = rng.integers(0, 256, size=(31, 45), dtype=np.uint8)
    table = lut(name)
    host = np.asarray(blend_host(original, heat, palette(table), alpha))
    device = blend(torch.from_numpy(original), torch.from_numpy(heat), torch.from_numpy(table), alpha).numpy()
    exact = np.round((1 - alpha) * original + alpha * table[heat].astype(float))
    # both are integer approximations of the float blend: within one level (alpha is quantised to 1/128 on
    # the device path, Pillow rounds in its own fixed point)
    assert np.abs(host.astype(int) - exact).max() <= 1
    assert np.abs(device.astype(int) - exact).max() <= 1 + (0 if alpha in (0.0, 0.5, 1.0) else 1)
