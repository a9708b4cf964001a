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


class _Queued:
    """One overlay waiting for its batch's device encode: the blended (H, W, 3) uint8 on the device, then its
    JPEG bytes, or a host copy for Pillow when the device could not encode this one."""

    def __init__(self, mixed: Tensor) -> None:
        self.mixed: Tensor | None = mixed
        self.data: bytes | None = None
        self.host: np.ndarray | None = None

    def __call__(self) -> bytes:
        """The Encoder a writer thread runs: the device's bytes, or Pillow's encoding of the host copy."""
        if self.data is not None:
            return self.data
        if self.host is not None:
            return encode_jpeg(self.host)
        raise RuntimeError("an overlay was written before Overlayer.flush encoded its batch")


def _device_jpegs(images: list[Tensor]) -> list[Tensor]:
    """torchvision.io.encode_jpeg on a list of (3, H, W) uint8 tensors (one call: on CUDA one launch and one
    synchronisation for all of them); a torchvision that takes no list raises, and the caller goes one by one."""
    import warnings

    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its codecs in favour of TorchCodec
        encoded = torchvision.io.encode_jpeg(images, quality=JPEG_QUALITY)
    if not isinstance(encoded, list) or len(encoded) != len(images):
        raise TypeError(f"encode_jpeg returned {type(encoded).__name__} for a list of {len(images)}")
    return encoded


class Overlayer:
    """The colormap in both forms the overlay paths need: a device LUT (GPU) and a Pillow palette (CPU).

    On CUDA the overlay is also JPEG-encoded on the device, a batch's overlays in one list call at `flush`.
    Before the first, a 16x16 test image is encoded there: a torchvision built without nvJPEG fails it, and
    then every overlay is copied back and encoded by Pillow on a writer thread (`device_codec` False,
    `codec_failure` says why; run.json). A later failure (out of memory, one odd image) sends only the
    overlays it concerns to Pillow (`codec_fallbacks` counts them).

    Chroma: torchvision's nvJPEG encoder writes 4:4:4 (it sets no other sampling) and Pillow 4:2:0, its
    default; so at the same quality a device-encoded overlay is a larger file than a Pillow one, with the same
    picture to JPEG rounding (docs/outputs.md).
    """

    def __init__(self, table: np.ndarray, device: torch.device, alpha: float, device_codec: bool | None = None) -> None:
        self.on_host = device.type == "cpu"
        self.alpha = alpha
        self.palette = palette(table)
        self.lut = torch.from_numpy(table).to(device)
        self.device_codec = device.type == "cuda" if device_codec is None else device_codec
        self.codec_failure: str | None = None
        self.codec_fallbacks = 0
        self._codec_checked = False
        self._queue: list[_Queued] = []

    def encoder(self, original: Tensor, heat_device: Tensor, heat_host: np.ndarray) -> Encoder:
        """What is left to make the overlay's JPEG bytes: on the CPU everything (colouring, blending, encoding,
        later on a writer thread); on a GPU the blend runs now and the encoding at `flush`, where torchvision
        can (the Encoder returned must not run before `flush`)."""
        if self.on_host and not self.device_codec:
            return partial(_host_overlay, original.numpy(), heat_host, self.palette, self.alpha)
        device = heat_device.device
        mixed = blend(original.to(device, non_blocking=True), heat_device, self.lut, self.alpha)
        if self.device_codec and self._codec_works(device):
            queued = _Queued(mixed)
            self._queue.append(queued)
            return queued
        return partial(encode_jpeg, mixed.cpu().numpy())

    def flush(self) -> None:
        """JPEG-encode every overlay queued since the last flush on the device, in one list call; when that
        fails, one by one, and an overlay that fails alone is copied back for Pillow. Its bytes cross to the
        host in one copy."""
        queue, self._queue = self._queue, []
        if not queue:
            return
        images = [q.mixed.permute(2, 0, 1).contiguous() for q in queue if q.mixed is not None]
        encoded: list[Tensor | None]
        try:
            encoded = list(_device_jpegs(images))
        except Exception:  # one odd image or out of memory fails the whole call: find out which, one by one
            encoded = [self._one(image) for image in images]
        done = [e for e in encoded if e is not None]
        flat = torch.cat([e.reshape(-1) for e in done]).cpu().numpy().tobytes() if done else b""
        offset = 0
        for q, e in zip(queue, encoded, strict=True):
            if e is None:
                self.codec_fallbacks += 1
                q.host = q.mixed.cpu().numpy() if q.mixed is not None else None
            else:
                q.data = flat[offset : offset + e.numel()]
                offset += e.numel()
            q.mixed = None

    def _one(self, image: Tensor) -> Tensor | None:
        try:
            return _device_jpegs([image])[0]
        except Exception:
            return None

    def _codec_works(self, device: torch.device) -> bool:
        """Whether this torchvision encodes JPEGs on `device`: tried once, on a 16x16 image (remembered)."""
        if not self._codec_checked:
            self._codec_checked = True
            try:
                _device_jpegs([torch.zeros(3, 16, 16, dtype=torch.uint8, device=device)])
            except Exception as exc:
                self.device_codec = False
                self.codec_failure = one_line(exc)
        return self.device_codec
