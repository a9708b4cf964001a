"""Batches: a DataLoader whose workers decode images in parallel with compute, and the batches it yields.

Workers return uint8 tensors (4x smaller than float to pass between processes); the float conversion and
normalisation happen on the compute device. A file that fails to decode becomes an error entry of its batch,
never an exception: one bad image must not stop a run. At most workers * 2 batches are decoded ahead of the
model, so memory does not grow with the folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from gradcam_cli.config import DEFAULT_MAX_PIXELS
from gradcam_cli.data.decode import (
    Encoded,
    decode_rgb,
    input_geometry,
    model_input,
    oriented_size,
    probe_jpeg,
    rgb_tensor,
)
from gradcam_cli.data.discover import ImageFile
from gradcam_cli.errors import one_line
from gradcam_cli.model.loading import InputSpec


@dataclass
class Sample:
    """One decoded image (or the reason it could not be decoded); `index` and `rel` say which file it is."""

    index: int
    rel: str
    error: str | None = None
    input: torch.Tensor | None = None  # (3, h, w) uint8
    original: torch.Tensor | None = None  # (H, W, 3) uint8, only when an overlay is wanted
    size: tuple[int, int] = (0, 0)  # (H, W) of the original
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    encoded: Encoded | None = None  # instead of `input`/`original` when the device decodes it


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
        file = self.files[index]
        if file.error is not None:
            return Sample(index, file.rel, file.error)
        if self.device_decode:
            probed = probe_jpeg(file.path, self.max_pixels)
            if probed is not None:
                encoded, width, height = probed
                size = oriented_size(width, height, encoded.orientation)
                box = input_geometry(size[1], size[0], self.spec).box
                return Sample(index, file.rel, None, size=size, box=box, encoded=encoded)
        try:
            img = decode_rgb(file.path, self.max_pixels)
            arr, box = model_input(img, self.spec)
            original = rgb_tensor(img) if self.keep_original else None
            return Sample(index, file.rel, None, torch.from_numpy(arr), original, (img.height, img.width), box)
        except Exception as exc:
            return Sample(index, file.rel, one_line(exc))


@dataclass
class Batch:
    """The good samples of a batch stacked for the model, plus the failures, in input order.

    Per-image lists are parallel to `indices` (the images' positions in the loader's file list) and `rels`
    (their relative paths); `errors` holds (index, rel, reason) of the images that could not be decoded.
    """

    indices: list[int] = field(default_factory=list)
    rels: list[str] = field(default_factory=list)
    inputs: torch.Tensor | None = None  # (B, 3, h, w) uint8; None while `encoded` holds undecoded JPEGs
    originals: list[torch.Tensor | None] = field(default_factory=list)
    encoded: list[Encoded | None] = field(default_factory=list)  # per image: bytes for the device, or None
    sizes: list[tuple[int, int]] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)

    parts: list[torch.Tensor | None] = field(default_factory=list)  # per image (3, h, w) inputs, before stacking

    def pin_memory(self) -> Batch:
        if self.inputs is not None:
            self.inputs = self.inputs.pin_memory()
        return self


def collate(samples: list[Sample]) -> Batch:
    """Samples -> one Batch: the decoded inputs stacked, the failures set aside."""
    batch = Batch()
    good = []
    for s in samples:
        if s.error is not None:
            batch.errors.append((s.index, s.rel, s.error))
            continue
        good.append(s.input)
        batch.indices.append(s.index)
        batch.rels.append(s.rel)
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


def subset_batch(batch: Batch, keep: list[int]) -> Batch:
    """The batch restricted to positions `keep` (in order): the input tensor and every per-image list.

    Written against the dataclass fields so that fields added to `Batch` later are carried along.
    """
    if len(keep) == len(batch.indices):
        return batch
    changes: dict[str, Any] = {}
    n = len(batch.indices)
    for f in fields(batch):
        value = getattr(batch, f.name)
        if f.name == "inputs":
            changes[f.name] = value[keep] if keep and value is not None else None
        elif f.name != "errors" and isinstance(value, list) and len(value) == n:
            changes[f.name] = [value[i] for i in keep]
    return replace(batch, **changes)
