"""Data: find image files, decode them in worker processes, and batch them with their original sizes.

Workers return uint8 tensors (4x smaller than float to pass between processes); the float conversion and
normalisation happen on the compute device in the engine's caller. A file that fails to decode becomes an
error record, never an exception: one bad image must not stop a run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from gradcam_cli.errors import GradcamError
from gradcam_cli.models import InputSpec

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class ImageFile:
    """An input image: where to read it and the relative path that names its outputs and CSV row."""

    path: Path
    rel: str


def _walk(root: Path, skip: set[Path]) -> Iterator[Path]:
    """Every image file under root, following directory symlinks but never the same directory twice."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
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
    name). When two roots yield the same relative path, the later one is prefixed with its root's name so
    their outputs never overwrite each other.
    """
    skip = {Path(p).resolve() for p in exclude}
    found: list[ImageFile] = []
    taken: set[str] = set()
    for root_index, raw in enumerate(inputs):
        root = Path(raw)
        if not root.exists():
            raise GradcamError(f"input not found: {root}")
        if root.is_dir():
            items = [(p, p.relative_to(root).as_posix()) for p in _walk(root, skip)]
            items.sort(key=lambda item: item[1])
        else:
            items = [(root, root.name)]
        prefix = root.resolve().name or f"input{root_index}"
        for path, rel in items:
            name = rel
            if name in taken:
                name = f"{prefix}/{rel}"
                n = 2
                while name in taken:
                    name, n = f"{prefix}-{n}/{rel}", n + 1
            taken.add(name)
            found.append(ImageFile(path=path, rel=name))
    return found


def decode_rgb(path: Path) -> Image.Image:
    """Open an image as viewers show it: EXIF orientation applied, first frame, RGB, 16-bit scaled to 8-bit."""
    with Image.open(path) as im:
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(im, dtype=np.uint32)
            im = Image.fromarray((arr >> 8).clip(0, 255).astype(np.uint8), mode="L")
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return im.convert("RGB")


def model_input(img: Image.Image, spec: InputSpec) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """(3, h, w) uint8 model input and the box (x0, y0, x1, y1) in original pixels that it shows."""
    width, height = img.size
    out_h, out_w = spec.size
    if spec.mode == "crop":
        scale = spec.resize_size / min(width, height)
        rw, rh = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
        resized = img.resize((rw, rh), Image.BILINEAR)
        left, top = int(round((rw - out_w) / 2.0)), int(round((rh - out_h) / 2.0))
        arr = np.asarray(resized.crop((left, top, left + out_w, top + out_h)))
        box = (left / scale, top / scale, (left + out_w) / scale, (top + out_h) / scale)
    else:
        arr = np.asarray(img.resize((out_w, out_h), Image.BILINEAR))
        box = (0.0, 0.0, float(width), float(height))
    return np.ascontiguousarray(arr.transpose(2, 0, 1)), box


@dataclass
class Sample:
    """One decoded image (or the reason it could not be decoded)."""

    index: int
    error: str | None = None
    input: torch.Tensor | None = None  # (3, h, w) uint8
    original: torch.Tensor | None = None  # (H, W, 3) uint8, only when an overlay is wanted
    size: tuple[int, int] = (0, 0)  # (H, W) of the original
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)


def one_line(exc: BaseException) -> str:
    """An exception as a single short line for the CSV `error` column."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


class ImageDataset(torch.utils.data.Dataset[Sample]):
    """Decodes file i into a `Sample`; runs inside DataLoader workers."""

    def __init__(self, files: Sequence[ImageFile], spec: InputSpec, keep_original: bool) -> None:
        self.files = list(files)
        self.spec = spec
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        try:
            img = decode_rgb(self.files[index].path)
            arr, box = model_input(img, self.spec)
            original = torch.from_numpy(np.array(img)) if self.keep_original else None
            return Sample(index, None, torch.from_numpy(arr), original, (img.height, img.width), box)
        except Exception as exc:
            return Sample(index, one_line(exc))


@dataclass
class Batch:
    """The good samples of a batch stacked for the model, plus the failures, in input order."""

    indices: list[int] = field(default_factory=list)
    inputs: torch.Tensor | None = None  # (B, 3, h, w) uint8
    originals: list[torch.Tensor | None] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)

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
        batch.sizes.append(s.size)
        batch.boxes.append(s.box)
    if good:
        batch.inputs = torch.stack(good)  # type: ignore[arg-type]
    return batch


def make_loader(
    files: Sequence[ImageFile], spec: InputSpec, batch_size: int, workers: int, keep_original: bool, pin: bool
) -> torch.utils.data.DataLoader[Sample]:
    """Ordered, bounded streaming: at most workers*2 batches are decoded ahead of the model."""
    return torch.utils.data.DataLoader(
        ImageDataset(files, spec, keep_original),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )
