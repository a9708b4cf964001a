"""Overlays: the heatmap coloured through a colormap and blended over the photo, then JPEG-encoded.

Two paths, because the fast one differs by device (bench/results.md): on a GPU a 256-entry LUT gather and
an integer blend are tensor ops that keep the image on the device until it is uint8, and the JPEG is
encoded there too (nvJPEG through torchvision.io) so only compressed bytes cross to the host; on the CPU
the same LUT applied as a Pillow palette and `Image.blend` in Pillow's C code cost a fraction of the tensor
version, and they run later on the writer threads, off the batch loop.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gradcam_cli.errors import one_line
from gradcam_cli.out.writer import Encoder
from gradcam_cli.render.encode import JPEG_QUALITY, encode_jpeg


def blend(original: Tensor, heat: Tensor, lut: Tensor, alpha: float) -> Tensor:
    """Device path: colour the heatmap through the (256, 3) LUT and mix (1 - alpha) * image + alpha * colour.

    Integer arithmetic in 1/128 steps of alpha (exact for 0, 0.5 and 1): int16 holds 255 * 128 without overflow.
    """
    w = int(round(alpha * 128))
    colour = lut.to(torch.int16)[heat.long()] * w
    mixed = original.to(torch.int16) * (128 - w) + colour + 64
    return (mixed >> 7).to(torch.uint8)


def palette(lut: np.ndarray) -> bytes:
    """A (256, 3) uint8 LUT as a Pillow palette."""
    return np.ascontiguousarray(lut, dtype=np.uint8).tobytes()


def blend_host(original: np.ndarray, heat: np.ndarray, pal: bytes, alpha: float) -> Image.Image:
    """Host path: the same overlay with Pillow (palette lookup + Image.blend), for CPU runs and writer threads.

    The heatmap is wrapped as a palette image without a copy (`frombuffer`), not converted from greyscale.
    """
    height, width = heat.shape
    colour = Image.frombuffer("P", (width, height), np.ascontiguousarray(heat, dtype=np.uint8), "raw", "P", 0, 1)
    colour.putpalette(pal)
    return Image.blend(Image.fromarray(original), colour.convert("RGB"), alpha)


def _host_overlay(original: np.ndarray, heat: np.ndarray, pal: bytes, alpha: float) -> bytes:
    return encode_jpeg(blend_host(original, heat, pal, alpha))


class Overlayer:
    """The colormap in both forms the overlay paths need: a device LUT (GPU) and a Pillow palette (CPU).

    On CUDA the overlay is also JPEG-encoded on the device; a torchvision built without nvJPEG makes the first
    call fail, and from then on the uint8 overlay is copied back and encoded by Pillow on a writer thread.
    `device_codec` and `codec_failure` say which happened (run.json).
    """

    def __init__(self, table: np.ndarray, device: torch.device, alpha: float, device_codec: bool | None = None) -> None:
        self.on_host = device.type == "cpu"
        self.alpha = alpha
        self.palette = palette(table)
        self.lut = torch.from_numpy(table).to(device)
        self.device_codec = device.type == "cuda" if device_codec is None else device_codec
        self.codec_failure: str | None = None

    def encoder(self, original: Tensor, heat_device: Tensor, heat_host: np.ndarray) -> Encoder:
        """What is left to make the overlay's JPEG bytes: on the CPU everything (colouring, blending, encoding,
        later on a writer thread); on a GPU the blend (and the encoding, where torchvision can) runs now."""
        if self.on_host and not self.device_codec:
            return partial(_host_overlay, original.numpy(), heat_host, self.palette, self.alpha)
        device = heat_device.device
        mixed = blend(original.to(device, non_blocking=True), heat_device, self.lut, self.alpha)
        if self.device_codec:
            data = self._device_jpeg(mixed)
            if data is not None:
                return partial(bytes, data)
        return partial(encode_jpeg, mixed.cpu().numpy())

    def _device_jpeg(self, mixed: Tensor) -> bytes | None:
        """JPEG bytes encoded where `mixed` (H, W, 3) lives, or None when this torchvision cannot (remembered)."""
        import warnings

        import torchvision

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its codecs in favour of TorchCodec
                encoded = torchvision.io.encode_jpeg(mixed.permute(2, 0, 1).contiguous(), quality=JPEG_QUALITY)
        except (RuntimeError, NotImplementedError) as exc:
            self.device_codec = False
            self.codec_failure = one_line(exc)
            return None
        return encoded.cpu().numpy().tobytes()
