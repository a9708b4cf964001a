"""Pixels -> file bytes: PNG (heatmaps, guided pictures), JPEG (overlays), NPY (raw maps).

These run on the writer threads, off the batch loop; Pillow and zlib release the GIL while they work.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

PNG_COMPRESS_LEVEL = 1
JPEG_QUALITY = 90
PILLOW_BLOCKS = 32


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray | Image.Image) -> bytes:
    """8-bit greyscale (H, W) or RGB (H, W, 3) as PNG, written here rather than by Pillow because it is the
    largest cost of a CPU run after the model.

    Every row uses PNG's Sub filter (each byte minus the same channel of the pixel to its left), computed for
    the whole image in one numpy subtraction, then zlib level 1. Heatmaps are smooth, so Sub turns them into
    runs of small numbers, which compress well and fast; Pillow's per-row adaptive filter choice is what
    costs there (bench/results.md). Decoders see a standard PNG; tests read every file back with Pillow.
    """
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"encode_png takes uint8 (H, W) or (H, W, 3), got {array.dtype} {array.shape}")
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else 3
    flat = array.reshape(height, width * channels)
    rows = np.empty((height, width * channels + 1), dtype=np.uint8)
    rows[:, 0] = 1  # filter type Sub
    rows[:, 1 : 1 + channels] = flat[:, :channels]
    np.subtract(flat[:, channels:], flat[:, :-channels], out=rows[:, 1 + channels :])  # wraps mod 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.data, PNG_COMPRESS_LEVEL)),
            _png_chunk(b"IEND", b""),
        )
    )


def encode_jpeg(image: np.ndarray | Image.Image) -> bytes:
    """RGB as a JPEG of quality JPEG_QUALITY (Pillow's default 4:2:0 chroma)."""
    buf = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """A float32 .npy file (no pickles)."""
    buf = io.BytesIO()
    np.save(buf, array.astype(np.float32, copy=False), allow_pickle=False)
    return buf.getvalue()


def pillow_block_cache(blocks: int = PILLOW_BLOCKS) -> int:
    """Let Pillow keep up to `blocks` freed image blocks for reuse; returns the setting to restore afterwards.

    By default Pillow returns every image's memory to the system when the image dies, so each full-size
    overlay (the photo, its colour map, their blend) pays for fresh pages again; with the cache the blend
    reuses them (bench/results.md). The cache only holds memory that was in use at once before, so peak memory
    does not grow. DataLoader workers forked afterwards inherit it. A larger value set by the user
    (PILLOW_BLOCKS_MAX) is kept; `restore_pillow_blocks(previous)` puts it back.
    """
    core: Any = Image.core
    before = int(core.get_blocks_max())
    core.set_blocks_max(max(before, blocks))
    return before


def restore_pillow_blocks(previous: int) -> None:
    """Pillow's setting as it was before the run: a notebook that called the API keeps its own."""
    core: Any = Image.core
    core.set_blocks_max(previous)
