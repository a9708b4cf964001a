"""Device decode: JPEG bytes from the workers -> model inputs (and overlay originals) on the compute device.

Why: on a GPU the CPU workers' Pillow decode and resize of full-size photos are what limit a run, not the
model. With `--decode device` (the default on CUDA) a worker only reads the file and checks its header
(`data.decode.probe_jpeg`); the batch's JPEGs are decoded together by nvJPEG (torchvision.io.decode_jpeg with a CUDA
device), oriented, resized and cropped there, and the full-size photo that the overlay needs never crosses
the PCIe bus at all. On the CPU the same path runs torchvision's libjpeg-turbo in the main process, which is
what the tests exercise.

Pillow stays the authority for everything else: a file the probe does not pass (PNG, CMYK, truncated, ...)
was decoded by the worker as before, and a JPEG the device decoder rejects (or that the device cannot resize)
is decoded here by Pillow, so its error message (or its pixels) are the same as without this path.

The model input differs from Pillow's by rounding only: the resize is `interpolate(antialias=True)`, which
is written to match PIL's bilinear filter, and nvJPEG's IDCT is not libjpeg-turbo's (measured in
tests/test_devicedecode.py: inputs within a few grey levels, maps and predictions the same).
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradcam_cli.data.batches import Batch, subset_batch
from gradcam_cli.data.decode import Geometry, decode_rgb, input_geometry, model_input, rgb_tensor
from gradcam_cli.errors import GradcamError, one_line
from gradcam_cli.model.loading import InputSpec


def orient(img: Tensor, orientation: int) -> Tensor:
    """(C, H, W) as stored -> as a viewer shows it, for EXIF orientations 1-8 (Pillow's exif_transpose)."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(-2, -1))
    return img


def resize_crop(img: Tensor, geo: Geometry, interpolation: str = "bilinear") -> Tensor:
    """(3, H, W) uint8 -> (3, h, w) uint8 model input: `decode.model_input`'s geometry, PIL-like filtering.

    `interpolation` is bilinear or bicubic; with antialias=True torch widens the kernel when shrinking and
    uses Pillow's cubic coefficient (a = -0.5), so both filters follow Pillow's up to rounding (how closely:
    tests/test_devicedecode.py).
    Pillow's crop pads with zeros where the crop box leaves the resized image (it can only by rounding);
    the same here.
    """
    width, height = geo.resized
    source = img[None].float()
    resized = F.interpolate(source, size=(height, width), mode=interpolation, antialias=True, align_corners=False)
    left, top, right, bottom = geo.crop
    if (left, top, right, bottom) != (0, 0, width, height):
        pad = (max(0, -left), max(0, right - width), max(0, -top), max(0, bottom - height))
        if any(pad):
            resized = F.pad(resized, pad)
            left, top = left + pad[0], top + pad[2]
            right, bottom = right + pad[0], bottom + pad[2]
        resized = resized[..., top:bottom, left:right]
    return resized.round_().clamp_(0, 255).to(torch.uint8)[0]


def _tiny_jpeg() -> Tensor:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _decode(datas: list[Tensor], device: torch.device) -> list[Tensor]:
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 deprecates its codecs in favour of TorchCodec
        out = torchvision.io.decode_jpeg(datas, mode=torchvision.io.ImageReadMode.RGB, device=device)
    return list(out)


def device_decoder_error(device: torch.device) -> str | None:
    """Why the device cannot decode JPEGs (a torchvision built without nvJPEG, say), or None when it can.

    Tried once before a run on a 16x16 JPEG, so that `--decode auto` can fall back to the workers for the whole
    run instead of failing batch after batch.
    """
    try:
        (img,) = _decode([_tiny_jpeg()], device)
    except Exception as exc:
        return one_line(exc)
    if tuple(img.shape) != (3, 16, 16):
        return f"decoded a 16x16 test JPEG to shape {tuple(img.shape)}"
    return None


class DeviceDecoder:
    """Turns a batch's `encoded` JPEGs into device tensors: the stacked model input and, for overlays, each
    photo as (H, W, 3) uint8 on the device. Counts what it did for run.json."""

    def __init__(
        self,
        spec: InputSpec,
        device: torch.device,
        keep_original: bool,
        path_of: Callable[[int], Path],
        max_pixels: int | None,
    ) -> None:
        self.spec = spec
        self.device = device
        self.keep_original = keep_original
        self.path_of = path_of
        self.max_pixels = max_pixels
        self.decoded = 0  # images decoded on the device
        self.fallbacks = 0  # JPEGs the device rejected or could not resize, decoded (or reported) by Pillow here
        self.seconds = 0.0

    def finish(self, batch: Batch) -> Batch:
        """The batch with `inputs` stacked on the device; a JPEG that neither decoder takes becomes an error."""
        positions = [p for p, e in enumerate(batch.encoded) if e is not None]
        if not positions:
            return batch
        t0 = time.perf_counter()
        n = len(batch.indices)
        inputs: list[Tensor | None] = list(batch.parts) if batch.parts else [None] * n
        originals = list(batch.originals)
        datas = [batch.encoded[p].data for p in positions]  # type: ignore[union-attr]
        try:
            images: list[Tensor | None] = list(_decode(datas, self.device))
        except Exception:  # one bad file fails the whole batched call: find it by decoding one at a time
            images = [self._one(d) for d in datas]
        failed: list[int] = []
        for p, img in zip(positions, images, strict=True):
            made = None if img is None else self._device_input(img, batch.encoded[p].orientation)  # type: ignore[union-attr]
            if made is None:
                self.fallbacks += 1
                if not self._pillow(batch.indices[p], batch.rels[p], p, inputs, originals, batch.errors):
                    failed.append(p)
                continue
            self.decoded += 1
            inputs[p] = made[0]
            if self.keep_original:
                originals[p] = made[1]
        batch.originals, batch.parts, batch.encoded = originals, inputs, [None] * n
        batch = subset_batch(batch, [p for p in range(n) if p not in failed])
        if batch.parts:
            batch.inputs = torch.stack([t.to(self.device, non_blocking=True) for t in batch.parts])  # type: ignore[union-attr]
        batch.parts = []
        self._stop_clock(t0)
        return batch

    def _device_input(self, img: Tensor, orientation: int) -> tuple[Tensor, Tensor | None] | None:
        """(model input (3, h, w), original (H, W, 3) or None) of one decoded image, made where it lives; None
        when the device fails on this image, which then goes to Pillow like a JPEG the decoder rejected.

        A device can fail where the CPU does not: CUDA's antialiased bilinear kernel needs shared memory in
        proportion to the downscale factor and refuses past its limit (a panorama tens of thousands of pixels
        wide, under --max-pixels), and one huge photo can run out of memory. Neither may stop the run.
        """
        try:
            img = orient(img, orientation)
            made = resize_crop(img, input_geometry(img.shape[2], img.shape[1], self.spec), self.spec.interpolation)
            return made, img.permute(1, 2, 0).contiguous() if self.keep_original else None
        except RuntimeError:  # torch.cuda.OutOfMemoryError included
            return None

    def _stop_clock(self, t0: float) -> None:
        """Add the time since `t0` to `seconds`, after the device finished what was queued (CUDA kernels run
        asynchronously: without the synchronisation their time would be counted in the next stage)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0

    def _one(self, data: Tensor) -> Tensor | None:
        try:
            return _decode([data], self.device)[0]
        except Exception:
            return None

    def _pillow(
        self,
        index: int,
        rel: str,
        p: int,
        inputs: list[Any],
        originals: list[Any],
        errors: list[tuple[int, str, str]],
    ) -> bool:
        """Decode one file as the workers would; False (and an error row) when Pillow cannot either."""
        try:
            img = decode_rgb(self.path_of(index), self.max_pixels)
            arr, _box = model_input(img, self.spec)
        except Exception as exc:
            errors.append((index, rel, one_line(exc)))
            return False
        inputs[p] = torch.from_numpy(arr)
        if self.keep_original:
            originals[p] = rgb_tensor(img).to(self.device)
        return True


def resolve_decode(mode: str, device: torch.device) -> tuple[str, str | None]:
    """`--decode` as it will run (`workers` or `device`) and, for auto, why the device could not take it.

    auto means the device on CUDA (nvJPEG: the workers' Pillow decode is what limits a GPU run) and the
    workers elsewhere (on a CPU the workers decode in parallel with the model; in the main process decoding
    would wait for it). An explicit `device` that cannot decode is a usage error, not a silent fallback.
    """
    if mode == "workers" or (mode == "auto" and device.type != "cuda"):
        return "workers", None
    error = device_decoder_error(device)
    if error is not None and mode == "device":
        raise GradcamError(f"--decode device: torchvision cannot decode JPEGs on {device} here ({error})")
    return ("workers" if error else "device"), error
