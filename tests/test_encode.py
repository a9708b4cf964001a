"""Our PNG encoder: every picture reads back bit-exact through Pillow, and it stays smaller than Pillow's level 1."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from gradcam_cli.render.encode import encode_png
from gradcam_cli.render.heatmap import heatmap


def _decode(data: bytes) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.mode, np.asarray(im)


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 7), (9, 1), (5, 3), (37, 64), (1, 1, 3), (1, 5, 3), (6, 1, 3), (33, 17, 3)]
)
def test_random_pictures_round_trip(shape: tuple[int, ...]) -> None:
    """Random bytes exercise the Sub filter's wrap-around (a - b mod 256) in every channel."""
    array = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    mode, back = _decode(encode_png(array))
    assert mode == ("L" if array.ndim == 2 else "RGB")
    np.testing.assert_array_equal(back, array)


def test_extremes_and_non_contiguous_input() -> None:
    ramp = np.tile(np.array([0, 255, 0, 1, 254, 255], dtype=np.uint8), (4, 3))
    np.testing.assert_array_equal(_decode(encode_png(ramp))[1], ramp)
    view = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)[::2, ::3]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(_decode(encode_png(view))[1], view)
    np.testing.assert_array_equal(_decode(encode_png(Image.fromarray(view)))[1], view)


def test_heatmap_png_is_smaller_than_pillows_level_1() -> None:
    """The reason for the encoder (with speed, measured in its docstring): a real heatmap shape compresses better."""
    torch.manual_seed(0)
    pixels = heatmap(torch.rand(7, 7), (600, 800), (0.0, 0.0, 800.0, 600.0)).pixels.numpy()
    ours = encode_png(pixels)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    np.testing.assert_array_equal(_decode(ours)[1], pixels)
    assert len(ours) < len(buf.getvalue())


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros(5, np.uint8)])
def test_refuses_what_it_cannot_write(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="encode_png takes uint8"):
        encode_png(bad)
