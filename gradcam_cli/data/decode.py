"""Decoding: a file -> RGB pixels as a viewer shows them -> the model input, or a one-line reason why not.

Decoding trusts nothing about a file: it must be a regular file (a FIFO would block forever, /dev/zero never
ends), its declared size is checked against `max_pixels` before a single pixel is decoded (decompression
bombs), and a file that ends early is an error, never an image with invented pixels. JPEGs that the compute
device can decode are only probed here (`probe_jpeg`, see `data.device`).
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL import ImageFile as PILImageFile

from gradcam_cli.config import DEFAULT_MAX_PIXELS
from gradcam_cli.errors import Explained
from gradcam_cli.model.loading import InputSpec


class BadImage(Explained):
    """A file that is not a usable image; the message is the whole reason, shown as is in the CSV."""


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@contextlib.contextmanager
def _strict_pillow() -> Iterator[None]:
    """Pillow's process-wide switches as we need them, restored afterwards (the API may share the process).

    LOAD_TRUNCATED_IMAGES off: another library may have turned it on, and then Pillow fills missing pixels
    with grey. MAX_IMAGE_PIXELS off: we check `max_pixels` ourselves, before decoding, with our own message,
    and Pillow's limit would otherwise cap a larger `--max-pixels`. Warnings (corrupt EXIF, bomb warnings)
    are silenced: a per-image problem is reported in its row, not printed by a worker.
    """
    saved = PILImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    PILImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = False, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        PILImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


_PNG_IEND = b"IEND\xaeB`\x82"  # the IEND chunk type and its (constant) CRC


def _check_complete(fh: IO[bytes], fmt: str | None, size: int) -> None:
    """Formats whose decoder stops before the end marker: a file cut after its pixel data is still truncated.

    Pillow reports every cut inside the pixel data; these catch a PNG without its IEND chunk (an APNG cut in
    a later frame, too) and a GIF without its trailer (an animation cut after the first frame).
    """
    if fmt not in ("PNG", "GIF"):
        return
    fh.seek(max(0, size - 65536))
    tail = fh.read()
    if fmt == "PNG" and _PNG_IEND not in tail:
        raise BadImage("truncated image: the PNG ends before its IEND chunk")
    if fmt == "GIF" and not tail.rstrip(b"\x00").endswith(b";"):
        raise BadImage("truncated image: the GIF ends before its trailer byte")


def _exif_orientation(im: Image.Image) -> int:
    """EXIF orientation 1-8; 1 (pixels as stored, as viewers do) when absent, unreadable or out of range."""
    try:
        orientation = int(im.getexif().get(0x0112, 1))
    except Exception:
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _oriented(im: Image.Image) -> Image.Image:
    """The image as viewers show it (EXIF orientation applied); the image itself when nothing turns it.

    `ImageOps.exif_transpose` returns a copy even for orientation 1, a full-size copy per photo for nothing.
    """
    if _exif_orientation(im) == 1:
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im  # unreadable EXIF: show the pixels as stored, as viewers do


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB as a viewer shows it: 16-bit scaled down, transparency composited on white.

    An RGB image without transparency is returned as it is (Pillow's convert would copy it).
    """
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.int64)
        im = Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def _open_for_reading(path: Path) -> IO[bytes]:
    """The file opened for binary reading; O_NONBLOCK because opening a FIFO would otherwise wait for a writer
    forever (decode_rgb then reports what kind of file it is)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    return open(os.open(path, flags), "rb")


def decode_rgb(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as viewers show it: EXIF orientation applied, first frame, RGB, 16-bit scaled to 8-bit.

    Raises BadImage (or OSError) with a one-line reason for anything that is not a complete, decodable
    image no larger than `max_pixels`.
    """
    with _open_for_reading(path) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a file")
            raise BadImage(f"not a regular file ({kind})")
        if st.st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with _strict_pillow():
            try:
                im = Image.open(fh)
            except UnidentifiedImageError:
                fh.seek(0)
                raise BadImage(f"not an image Pillow can read (file starts with {fh.read(16)!r})") from None
            except OSError as exc:
                raise _explain_failure(exc, fh, st.st_size) from None
            with im:
                width, height = im.size
                if max_pixels is not None and width * height > max_pixels:
                    raise BadImage(
                        f"image is {width}x{height} = {width * height:,} pixels, above --max-pixels "
                        f"{max_pixels:,}; refused without decoding (decompression bomb?)"
                    )
                try:
                    im.load()
                except OSError as exc:
                    raise _explain_failure(exc, fh, st.st_size) from None
                _check_complete(fh, im.format, st.st_size)
                return _to_rgb(_oriented(im))


def _explain_failure(exc: OSError, fh: IO[bytes], size: int) -> Exception:
    """Say "truncated" when that is what happened: Pillow's words for it vary by format and stage."""
    text = " ".join(str(exc).split())
    if "truncated" in text.lower():
        return BadImage(f"truncated image: {text}")
    fh.seek(0)
    head = fh.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and struct.unpack("<I", head[4:8])[0] + 8 > size:
        return BadImage(
            f"truncated image: the WebP file is {size} bytes, its header says {struct.unpack('<I', head[4:8])[0] + 8}"
        )
    return exc


def rgb_tensor(img: Image.Image) -> torch.Tensor:
    """(H, W, 3) uint8 pixels of an RGB image, copied once; in a DataLoader worker straight into shared memory.

    The full-size photo goes back to the main process for the overlay. `np.array(img)` costs two full copies
    (Pillow's `tobytes`, then numpy's), and sending an ordinary tensor from a worker a third (into shared
    memory). Here Pillow's raw encoder unpacks the image in cache-sized pieces into a tensor that already lives
    where the worker would send it, so the DataLoader passes on its handle without copying.
    """
    width, height = img.size
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(height * width * 3)
        out = torch.empty(0, dtype=torch.uint8).set_(storage).view(height, width, 3)
    else:
        out = torch.empty((height, width, 3), dtype=torch.uint8)
    flat = out.numpy().reshape(-1)
    try:
        encoder = Image._getencoder("RGB", "raw", "RGB")
        encoder.setimage(img.im, (0, 0, width, height))
    except Exception:  # a Pillow without these internals: the plain (two-copy) way
        flat[:] = np.asarray(img).reshape(-1)
        return out
    try:
        pos = 0
        while True:
            _, status, chunk = encoder.encode(max(65536, width * 4))
            flat[pos : pos + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            pos += len(chunk)
            if status:
                break
    finally:
        encoder.cleanup()
    if status < 0 or pos != flat.size:
        raise BadImage(f"could not unpack the decoded pixels (Pillow raw encoder status {status})")
    return out


@dataclass(frozen=True)
class Geometry:
    """Where the model input comes from: resize the whole image to `resized` (W, H), then cut `crop`
    (left, top, right, bottom) out of it; `box` is that crop in original pixels (x0, y0, x1, y1).

    One definition for both decoders (Pillow in the workers, torchvision on the device), so their inputs and
    the heatmaps' placement agree.
    """

    resized: tuple[int, int]
    crop: tuple[int, int, int, int]
    box: tuple[float, float, float, float]


def input_geometry(width: int, height: int, spec: InputSpec) -> Geometry:
    out_h, out_w = spec.size
    if spec.mode == "crop":
        scale = spec.resize_size / min(width, height)
        rw, rh = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
        left, top = int(round((rw - out_w) / 2.0)), int(round((rh - out_h) / 2.0))
        box = (left / scale, top / scale, (left + out_w) / scale, (top + out_h) / scale)
        return Geometry((rw, rh), (left, top, left + out_w, top + out_h), box)
    return Geometry((out_w, out_h), (0, 0, out_w, out_h), (0.0, 0.0, float(width), float(height)))


PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def model_input(img: Image.Image, spec: InputSpec) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """(3, h, w) uint8 model input and the box (x0, y0, x1, y1) in original pixels that it shows.

    Resized with Pillow's bilinear or bicubic filter (`spec.interpolation`); both widen their support when
    shrinking, so a large photo is averaged rather than sampled.
    """
    geo = input_geometry(img.width, img.height, spec)
    resized = img.resize(geo.resized, PIL_FILTERS[spec.interpolation])
    if geo.crop != (0, 0, *geo.resized):
        resized = resized.crop(geo.crop)
    arr = np.asarray(resized)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), geo.box


@dataclass
class Encoded:
    """A JPEG left undecoded by the worker, for the compute device to decode (`--decode device`)."""

    data: torch.Tensor  # 1-D uint8: the file's bytes
    orientation: int  # EXIF orientation 1-8, applied after decoding as Pillow's exif_transpose would


def oriented_size(width: int, height: int, orientation: int) -> tuple[int, int]:
    """(H, W) as a viewer shows the image: orientations 5-8 swap the sides."""
    return (width, height) if orientation >= 5 else (height, width)


def probe_jpeg(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[Encoded, int, int] | None:
    """The file's bytes and its (width, height) as stored, when the device decoder can take it; else None.

    Only the plain case goes to the device: a complete 8-bit RGB or greyscale JPEG (starts with SOI, ends with
    EOI) within `max_pixels`. Everything else (CMYK, truncated, trailing data, too large, unreadable) returns
    None and is decoded by Pillow as before, so the error messages and the special cases stay in one place.
    """
    try:
        with _open_for_reading(path) as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size < 4:
                return None
            head = fh.read(3)
            if head != b"\xff\xd8\xff":
                return None
            data = bytearray(head)
            data += fh.read()
    except OSError:
        return None
    if not bytes(data[-64:]).rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return None
    with _strict_pillow():
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                    return None
                width, height = im.size
                orientation = _exif_orientation(im)
        except Exception:
            return None
    if max_pixels is not None and width * height > max_pixels:
        return None
    return Encoded(torch.frombuffer(data, dtype=torch.uint8), orientation), width, height
