"""The worker's decode path copies a photo once: the pixels must still be exactly Pillow's, in and out of a worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from gradcam_cli.data.batches import ImageDataset, collate
from gradcam_cli.data.decode import decode_rgb, rgb_tensor
from gradcam_cli.data.discover import ImageFile
from gradcam_cli.model.loading import InputSpec

SPEC = InputSpec(size=(32, 32), resize_size=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _photo(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(width * 7 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_rgb_tensor_is_the_image_pixels() -> None:
    for width, height in ((1, 1), (3, 2), (17, 5), (640, 3), (5000, 1), (123, 457)):
        img = _photo(width, height)
        out = rgb_tensor(img)
        assert out.shape == (height, width, 3) and out.dtype == torch.uint8 and out.is_contiguous()
        np.testing.assert_array_equal(out.numpy(), np.asarray(img))


class _Probe(torch.utils.data.Dataset[tuple[bool, torch.Tensor, torch.Tensor]]):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int) -> tuple[bool, torch.Tensor, torch.Tensor]:
        img = _photo(300, 200 + index)
        out = rgb_tensor(img)
        return out.is_shared(), out, torch.from_numpy(np.asarray(img).copy())


def test_in_a_worker_it_is_born_in_shared_memory() -> None:
    """Born shared, the DataLoader hands the worker's tensor over without another copy; same pixels."""
    loader = torch.utils.data.DataLoader(_Probe(), batch_size=None, num_workers=1)
    seen = list(loader)
    assert len(seen) == 3
    for shared, out, reference in seen:
        assert shared
        assert torch.equal(out, reference)


def test_no_copy_paths_keep_orientation_and_modes(tmp_path: Path) -> None:
    """Orientation 1 / no EXIF and RGB skip Pillow's copies; rotated, greyscale, palette and RGBA still convert."""
    base = _photo(40, 30)
    files = []
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}.png"
        base.save(path, exif=exif)
        files.append(path)
    for mode in ("L", "P", "RGBA"):
        path = tmp_path / f"m{mode}.png"
        base.convert(mode).save(path)
        files.append(path)
    for path in files:
        img = decode_rgb(path)
        assert img.mode == "RGB"
        with Image.open(path) as raw:
            expected = ImageOps.exif_transpose(raw)
            if expected.mode == "RGBA":
                white = Image.new("RGBA", expected.size, (255, 255, 255, 255))
                expected = Image.alpha_composite(white, expected)
            expected = expected.convert("RGB")
        np.testing.assert_array_equal(np.asarray(img), np.asarray(expected), err_msg=path.name)
        sample = ImageDataset([ImageFile(path, path.name)], SPEC, keep_original=True)[0]
        assert sample.error is None and sample.original is not None
        np.testing.assert_array_equal(sample.original.numpy(), np.asarray(expected), err_msg=path.name)
        assert collate([sample]).originals[0] is sample.original
