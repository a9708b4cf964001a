"""Data: find image files, decode them in worker processes, and batch them with their original sizes.

Workers return uint8 tensors (4x smaller than float to pass between processes); the float conversion and
normalisation happen on the compute device in the engine's caller. A file that fails to decode becomes an
error record, never an exception: one bad image must not stop a run.

Decoding trusts nothing about a file: it must be a regular file (a FIFO would block forever, /dev/zero never
ends), its declared size is checked against `max_pixels` before a single pixel is decoded (decompression
bombs), and a file that ends early is an error, never an image with invented pixels.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL import ImageFile as PILImageFile

from gradcam_cli.config import DEFAULT_MAX_PIXELS
from gradcam_cli.errors import GradcamError
from gradcam_cli.models import InputSpec

# .gif is included: animated GIFs are common in scraped datasets and are explained by their first frame
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class ImageFile:
    """An input image: where to read it and the relative path that names its outputs and CSV row.

    `error` is set for an entry that is known to be unreadable before any decoding (a folder that cannot be
    listed): it still gets its row, so nothing under INPUT is skipped silently.
    """

    path: Path
    rel: str
    error: str | None = None


def _walk(root: Path, skip: set[Path], unlistable: list[tuple[Path, str]]) -> Iterator[Path]:
    """Every image file under root, following directory symlinks but never the same directory twice."""
    seen: set[tuple[int, int]] = set()

    def failed(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else root
        unlistable.append((where, f"cannot list folder: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=failed):
        here = Path(dirpath)
        try:
            st = here.stat()
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen or here.resolve() in skip:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield here / name


def discover(
    inputs: Sequence[str | os.PathLike[str]], exclude: Sequence[str | os.PathLike[str]] = ()
) -> list[ImageFile]:
    """Files and folders -> sorted image files with relative paths; folders in `exclude` (OUT) are skipped.

    Paths are relative to the INPUT root they were found under (a file given directly is named by its file
    name). When two roots yield the same relative path, the later one is prefixed with its root's name (a
    file's parent folder name) so their outputs never overwrite each other. A sub-folder that cannot be
    listed becomes an entry with `error` set (`rel` ends with '/'); an INPUT that cannot be listed at all is
    a usage error.
    """
    skip = {Path(p).resolve() for p in exclude}
    found: list[ImageFile] = []
    taken: set[str] = set()
    for root_index, raw in enumerate(inputs):
        root = Path(raw)
        if not root.exists():
            raise GradcamError(f"input not found: {root}")
        items: list[tuple[Path, str, str | None]]
        if root.is_dir():
            if root.resolve() in skip:
                raise GradcamError(f"input {root} is the output folder (-o); write the outputs somewhere else")
            unlistable: list[tuple[Path, str]] = []
            items = [(p, p.relative_to(root).as_posix(), None) for p in _walk(root, skip, unlistable)]
            for folder, message in unlistable:
                if folder == root:
                    raise GradcamError(f"input {root}: {message}")
                items.append((folder, folder.relative_to(root).as_posix() + "/", message))
            items.sort(key=lambda item: item[1])
            prefix = root.resolve().name
        else:
            items = [(root, root.name, None)]
            prefix = root.resolve().parent.name
        prefix = prefix or f"input{root_index}"
        for path, rel, error in items:
            name = rel
            if name in taken:
                name = f"{prefix}/{rel}"
                n = 2
                while name in taken:
                    name, n = f"{prefix}-{n}/{rel}", n + 1
            taken.add(name)
            found.append(ImageFile(path=path, rel=name, error=error))
    return found


class BadImage(Exception):
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


def model_input(img: Image.Image, spec: InputSpec) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """(3, h, w) uint8 model input and the box (x0, y0, x1, y1) in original pixels that it shows."""
    geo = input_geometry(img.width, img.height, spec)
    resized = img.resize(geo.resized, Image.Resampling.BILINEAR)
    if geo.crop != (0, 0, *geo.resized):
        resized = resized.crop(geo.crop)
    arr = np.asarray(resized)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), geo.box


@dataclass
class Encoded:
    """A JPEG left undecoded by the worker, for the compute device to decode (`--decode device`)."""

    data: torch.Tensor  # 1-D uint8: the file's bytes
    orientation: int  # EXIF orientation 1-8, applied after decoding as Pillow's exif_transpose would


def _oriented_size(width: int, height: int, orientation: int) -> tuple[int, int]:
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


@dataclass
class Sample:
    """One decoded image (or the reason it could not be decoded)."""

    index: int
    error: str | None = None
    input: torch.Tensor | None = None  # (3, h, w) uint8
    original: torch.Tensor | None = None  # (H, W, 3) uint8, only when an overlay is wanted
    size: tuple[int, int] = (0, 0)  # (H, W) of the original
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    encoded: Encoded | None = None  # instead of `input`/`original` when the device decodes it


def one_line(exc: BaseException) -> str:
    """An exception as a single short line for the CSV `error` column."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, BadImage):
        return text[:300]
    return f"{type(exc).__name__}: {text}"[:300]


class ImageDataset(torch.utils.data.Dataset[Sample]):
    """Decodes file i into a `Sample`; runs inside DataLoader workers."""

    def __init__(
        self,
        files: Sequence[ImageFile],
        spec: InputSpec,
        keep_original: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device_decode: bool = False,
    ) -> None:
        self.files = list(files)
        self.spec = spec
        self.keep_original = keep_original
        self.max_pixels = max_pixels
        self.device_decode = device_decode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        if self.files[index].error is not None:
            return Sample(index, self.files[index].error)
        if self.device_decode:
            probed = probe_jpeg(self.files[index].path, self.max_pixels)
            if probed is not None:
                encoded, width, height = probed
                size = _oriented_size(width, height, encoded.orientation)
                box = input_geometry(size[1], size[0], self.spec).box
                return Sample(index, None, size=size, box=box, encoded=encoded)
        try:
            img = decode_rgb(self.files[index].path, self.max_pixels)
            arr, box = model_input(img, self.spec)
            original = rgb_tensor(img) if self.keep_original else None
            return Sample(index, None, torch.from_numpy(arr), original, (img.height, img.width), box)
        except Exception as exc:
            return Sample(index, one_line(exc))


@dataclass
class Batch:
    """The good samples of a batch stacked for the model, plus the failures, in input order."""

    indices: list[int] = field(default_factory=list)
    inputs: torch.Tensor | None = None  # (B, 3, h, w) uint8; None while `encoded` holds undecoded JPEGs
    originals: list[torch.Tensor | None] = field(default_factory=list)
    encoded: list[Encoded | None] = field(default_factory=list)  # per image: bytes for the device, or None
    sizes: list[tuple[int, int]] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)

    parts: list[torch.Tensor | None] = field(default_factory=list)  # per image (3, h, w) inputs, before stacking

    def pin_memory(self) -> Batch:
        if self.inputs is not None:
            self.inputs = self.inputs.pin_memory()
        return self


def collate(samples: list[Sample]) -> Batch:
    batch = Batch()
    good = []
    for s in samples:
        if s.error is not None:
            batch.errors.append((s.index, s.error))
            continue
        good.append(s.input)
        batch.indices.append(s.index)
        batch.originals.append(s.original)
        batch.encoded.append(s.encoded)
        batch.sizes.append(s.size)
        batch.boxes.append(s.box)
    if good and all(t is not None for t in good):
        batch.inputs = torch.stack(good)  # type: ignore[arg-type]
    elif good:  # some are bytes for the device: keep the decoded ones per image until it has decoded the rest
        batch.parts = good
    return batch


def make_loader(
    files: Sequence[ImageFile],
    spec: InputSpec,
    batch_size: int,
    workers: int,
    keep_original: bool,
    pin: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device_decode: bool = False,
) -> torch.utils.data.DataLoader[Sample]:
    """Ordered, bounded streaming: at most workers*2 batches are decoded ahead of the model."""
    return torch.utils.data.DataLoader(
        ImageDataset(files, spec, keep_original, max_pixels, device_decode),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )
