"""The CUDA paths on a real GPU: device decode (nvJPEG), device blend + JPEG encode, autocast, channels_last and
out-of-memory batch splitting with a real allocator limit.

These need a CUDA device and are skipped without one (CI has none); tests/test_gpu_paths.py and
tests/test_devicedecode.py exercise the same code on the CPU. docs/speed.md says where and when these ran.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from gradcam_cli import explain
from gradcam_cli.cam.engine import CamEngine, run_batch
from gradcam_cli.cam.targets import TargetSelector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_images"


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        return {row["path"]: row for row in csv.DictReader(fh)}


def _heat(out: Path, row: dict[str, str]) -> np.ndarray:
    return np.asarray(Image.open(out / row["heatmap"]), dtype=np.float64)


def _run(out: Path, **settings: object) -> dict[str, dict[str, str]]:
    explain(SAMPLES, out, model="resnet18", weights="none", quiet=True, **settings)
    return _rows(out)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, str]]]:
    out = tmp_path_factory.mktemp("cpu") / "out"
    return out, _run(out, device="cpu", decode="workers", channels_last=False)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_cuda_run_matches_the_cpu_run(tmp_path: Path, cpu_run: tuple[Path, dict[str, dict[str, str]]]) -> None:
    """Defaults on CUDA: JPEGs decoded by nvJPEG, overlays blended and JPEG-encoded on the GPU. Same predictions
    as the CPU run, heatmaps a few grey levels apart at most (decoders and resize rounding differ)."""
    cpu_out, cpu_rows = cpu_run
    out = tmp_path / "cuda"
    rows = _run(out, device="cuda")
    manifest = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert manifest["device"].startswith("cuda")
    assert manifest["decode"] == "device", manifest.get("decode_device_error")
    assert manifest["device_decoded"]["jpeg"] == 6  # the six .jpg files of sample_images
    assert manifest["overlay_jpeg"] == "device", manifest.get("overlay_jpeg_device_error")
    assert manifest["channels_last"] is False
    assert rows.keys() == cpu_rows.keys()
    for path, row in rows.items():
        ref = cpu_rows[path]
        assert row["status"] == "ok" and row["pred_index"] == ref["pred_index"], path
        assert abs(float(row["pred_prob"]) - float(ref["pred_prob"])) < 2e-3, path
        a, b = _heat(out, row), _heat(cpu_out, ref)
        assert a.shape == b.shape and np.abs(a - b).mean() < 1.5 and _corr(a, b) > 0.995, path
        overlay = np.asarray(Image.open(out / row["overlay"]), dtype=np.float64)
        ref_overlay = np.asarray(Image.open(cpu_out / ref["overlay"]), dtype=np.float64)
        assert overlay.shape == ref_overlay.shape and np.abs(overlay - ref_overlay).mean() < 4.0, path


def test_cuda_with_pillow_decoding_matches_too(tmp_path: Path, cpu_run: tuple[Path, dict[str, dict[str, str]]]) -> None:
    cpu_out, cpu_rows = cpu_run
    out = tmp_path / "cuda_workers"
    rows = _run(out, device="cuda", decode="workers")
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["decode"] == "workers"
    for path, row in rows.items():
        a, b = _heat(out, row), _heat(cpu_out, cpu_rows[path])
        assert row["pred_index"] == cpu_rows[path]["pred_index"] and np.abs(a - b).max() <= 2, path


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_keeps_maps_and_predictions(
    tmp_path: Path, amp: str, cpu_run: tuple[Path, dict[str, dict[str, str]]]
) -> None:
    cpu_out, cpu_rows = cpu_run
    out = tmp_path / amp
    rows = _run(out, device="cuda", amp=amp)
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["amp"] == amp
    same = sum(row["pred_index"] == cpu_rows[path]["pred_index"] for path, row in rows.items())
    assert same >= len(rows) - 1  # a near tie may flip under bf16's 3 significant digits
    for path, row in rows.items():
        assert row["status"] == "ok", row
        assert _corr(_heat(out, row), _heat(cpu_out, cpu_rows[path])) > 0.97, path


def test_channels_last_on_cuda(tmp_path: Path, cpu_run: tuple[Path, dict[str, dict[str, str]]]) -> None:
    cpu_out, cpu_rows = cpu_run
    out = tmp_path / "cl"
    rows = _run(out, device="cuda", channels_last=True, decode="workers")
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["channels_last"] is True
    for path, row in rows.items():
        assert np.abs(_heat(out, row) - _heat(cpu_out, cpu_rows[path])).max() <= 2, path


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """TF32 off for cuDNN and matmuls while a test compares runs of different batch sizes.

    cuDNN picks its convolution algorithm per input shape, and with TF32 (on for cuDNN by default) each
    algorithm rounds the products to 10 bits of mantissa in its own order: the same image in a batch of 8
    and in a batch of 32 can differ by ~1e-3 relative, the tolerance of the comparison. In float32 the
    algorithms agree to ~1e-6, so what is compared is the splitting, not the rounding.
    """
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@pytest.mark.usefixtures("no_tf32")
def test_real_out_of_memory_halves_the_batch() -> None:
    """The caching allocator capped between what 8 and 16 images reserve: 32 and 16 fail, the halves of 8 run,
    nothing is lost and the maps are those of the uncapped run (in float32: `no_tf32`)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval().cuda()
    selector = TargetSelector(["pred"], [])
    x = torch.randn(32, 3, 320, 320, device="cuda")
    with CamEngine(model, {"layer4": model.layer4}, "gradcam") as engine:
        whole = engine.run(x, selector)

        def reserved_peak(n: int) -> int:
            # the cap applies to what the allocator reserves (whole segments), not to the bytes in tensors
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            engine.run(x[:n], selector)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_reserved()

        r8, r16 = reserved_peak(8), reserved_peak(16)
        assert r16 > r8 * 1.2, (r8, r16)
        limit = (r8 + r16) / 2
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(limit / total)
        failed = False
        try:
            try:
                engine.run(x, selector)
            except torch.cuda.OutOfMemoryError:
                failed = True  # the cap is real
            torch.cuda.empty_cache()
            split = run_batch(engine, x, lambda a, b: selector)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    assert failed
    assert split.cams["layer4"].shape == whole.cams["layer4"].shape
    assert torch.equal(split.targets, whole.targets)
    torch.testing.assert_close(split.cams["layer4"], whole.cams["layer4"], rtol=1e-3, atol=1e-4)


def test_gpu_memory_stays_flat(tmp_path: Path) -> None:
    """Peak GPU memory of a 64-image run equals that of a 16-image run (streaming, batch 8)."""
    folder = tmp_path / "many"
    folder.mkdir()
    photo = Image.open(SAMPLES / "rocket.jpg")
    for i in range(64):
        photo.save(folder / f"{i:03d}.jpg", quality=90)
    peaks = []
    for n in (16, 64):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        explain(
            folder,
            tmp_path / f"o{n}",
            model="resnet18",
            weights="none",
            quiet=True,
            device="cuda",
            batch_size=8,
            limit=n,
        )
        peaks.append(torch.cuda.max_memory_allocated())
    assert peaks[1] <= peaks[0] * 1.05, peaks
