"""`--decode device`: JPEGs read by the workers, decoded, oriented, resized and cropped on the compute device.

Everything here runs on the CPU (torchvision's libjpeg-turbo in the main process); the same tests run on CUDA
(nvJPEG) where a GPU is present, via DEVICES. Pillow in the workers is the reference: the device path must give
the same rows, the same errors and nearly the same pixels.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import STORED_FOR_ORIENTATION, build_corpus, exif_jpeg, smooth_rgb
from helpers import invoke, rows_of
from PIL import Image

from gradcam_cli.data.batches import Batch, ImageDataset, collate
from gradcam_cli.data.decode import decode_rgb, model_input, probe_jpeg
from gradcam_cli.data.device import DeviceDecoder, device_decoder_error, orient, resize_crop
from gradcam_cli.data.discover import ImageFile
from gradcam_cli.model.loading import InputSpec

REPO = Path(__file__).resolve().parent.parent
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PHOTOS = ["china.jpg", "flower.jpg", "grace_hopper.jpg", "retina.jpg", "rocket.jpg"]
FULL = InputSpec(size=(224, 224), resize_size=224, mean=(0.5,) * 3, std=(0.5,) * 3, mode="full")
CROP = InputSpec(size=(224, 224), resize_size=256, mean=(0.5,) * 3, std=(0.5,) * 3, mode="crop")
BICUBIC = InputSpec(
    size=(224, 224), resize_size=249, mean=(0.5,) * 3, std=(0.5,) * 3, mode="crop", interpolation="bicubic"
)


def _jpeg(array: np.ndarray, **params: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95, **params)
    return buf.getvalue()


# --- the pieces ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_is_what_a_viewer_shows(orientation: int) -> None:
    upright = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](upright))
    shown = orient(torch.from_numpy(stored).permute(2, 0, 1), orientation).permute(1, 2, 0)
    assert np.array_equal(shown.numpy(), upright)


def test_probe_takes_plain_jpegs_and_leaves_the_rest_to_pillow(tmp_path: Path) -> None:
    rgb = smooth_rgb(40, 24)
    cases: dict[str, tuple[bytes, bool]] = {
        "rgb.jpg": (_jpeg(rgb), True),
        "grey.jpg": (_jpeg(rgb[..., 0]), True),
        "progressive.jpg": (_jpeg(rgb, progressive=True), True),
        "oriented.jpg": (exif_jpeg(rgb, 6), True),
        "padded.jpg": (_jpeg(rgb) + b"\x00\x00", True),  # zero padding after EOI, as some cameras write
        "cmyk.jpg": (_jpeg_cmyk(rgb), False),
        "cut.jpg": (_jpeg(rgb)[:-300], False),  # no end marker: Pillow says "truncated"
        "trailer.jpg": (_jpeg(rgb) + b"extra data after the image", False),
        "png.jpg": (_png(rgb), False),
        "empty.jpg": (b"", False),
        "text.jpg": (b"hello, not a JPEG at all", False),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    for name, (data, taken) in cases.items():
        probed = probe_jpeg(tmp_path / name)
        assert (probed is not None) == taken, name
        if probed is not None:
            encoded, width, height = probed
            assert bytes(encoded.data.numpy()) == data
            assert (width, height) == ((24, 40) if name == "oriented.jpg" else (40, 24))  # stored, not shown
            assert encoded.orientation == (6 if name == "oriented.jpg" else 1)
    assert probe_jpeg(tmp_path / "rgb.jpg", max_pixels=40 * 24 - 1) is None  # Pillow path refuses it with reason
    assert probe_jpeg(tmp_path / "missing.jpg") is None
    os.mkfifo(tmp_path / "fifo.jpg")
    assert probe_jpeg(tmp_path / "fifo.jpg") is None  # never blocks


def _jpeg_cmyk(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("spec", [FULL, CROP, BICUBIC], ids=["full", "crop", "bicubic"])
@pytest.mark.parametrize("name", PHOTOS)
def test_device_input_matches_pillow_input(name: str, spec: InputSpec) -> None:
    """Real photos: torchvision decode + interpolate(antialias) against Pillow decode + resize (the reference).

    Measured on these photos: at most a few grey levels apart, under 0.5 on average (bicubic a little further
    at the sharpest edges, where the filter overshoots and both clamp to 0-255)."""
    path = REPO / "sample_images" / name
    img = decode_rgb(path)
    reference, _box = model_input(img, spec)
    decoded = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    ours = resize_crop(decoded, _geometry(img.width, img.height, spec), spec.interpolation)
    diff = (ours.int() - torch.from_numpy(reference).int()).abs()
    assert ours.shape == reference.shape
    largest = 8 if spec.interpolation == "bicubic" else 6
    assert diff.float().mean() < 0.5 and diff.max() <= largest, (float(diff.float().mean()), int(diff.max()))


def _geometry(width: int, height: int, spec: InputSpec):  # type: ignore[no-untyped-def]
    from gradcam_cli.data.decode import input_geometry

    return input_geometry(width, height, spec)


def test_crop_that_overhangs_is_zero_padded_like_pillow() -> None:
    """A crop larger than the resized image (resize_size < crop size): Pillow pads with black; so do we."""
    spec = InputSpec(size=(40, 40), resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, mode="crop")
    img = Image.fromarray(np.full((50, 64, 3), 200, dtype=np.uint8))
    reference, _ = model_input(img, spec)
    ours = resize_crop(torch.from_numpy(np.array(img)).permute(2, 0, 1), _geometry(64, 50, spec))
    assert ours.shape == reference.shape
    assert torch.equal(ours, torch.from_numpy(reference))


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_finishes_a_mixed_batch(tmp_path: Path, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """JPEGs for the device, a PNG the worker decoded, a JPEG the device rejects (Pillow decodes it here) and
    one neither can read (an error row): inputs stacked on the device in order, originals full size."""
    rgb = smooth_rgb(64, 48)
    files = {
        "a.jpg": _jpeg(rgb),
        "b.png": _png(rgb),
        "c.jpg": exif_jpeg(rgb, 8),
        "d.jpg": _jpeg(rgb[::-1].copy()),
        "e.jpg": _cut_scan(_jpeg(rgb)),  # header intact, scan cut short: both decoders accept it
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    listed = [ImageFile(tmp_path / name, name) for name in files]
    dataset = ImageDataset(listed, FULL, keep_original=True, device_decode=True)
    batch = collate([dataset[i] for i in range(len(listed))])
    assert batch.inputs is None and [e is not None for e in batch.encoded] == [True, False, True, True, True]

    import gradcam_cli.data.device as dd

    real = dd._decode

    def reject_d(datas: list[torch.Tensor], dev: torch.device) -> list[torch.Tensor]:
        if any(bytes(d[-50:].numpy()) == files["d.jpg"][-50:] for d in datas):
            raise RuntimeError("nvjpeg: unsupported (simulated)")
        return real(datas, dev)

    monkeypatch.setattr(dd, "_decode", reject_d)
    decoder = DeviceDecoder(FULL, torch.device(device), True, lambda i: listed[i].path, None)
    done = decoder.finish(batch)
    pillow = [dataset.__class__(listed, FULL, True)[i] for i in range(len(listed))]
    kept = [i for i, s in enumerate(pillow) if s.error is None]
    assert done.indices == kept
    assert [i for i, _ in done.errors] == [i for i, s in enumerate(pillow) if s.error is not None]
    assert done.inputs is not None and done.inputs.device.type == torch.device(device).type
    assert done.inputs.shape == (len(kept), 3, 224, 224)
    for pos, i in enumerate(kept):
        reference = pillow[i]
        assert done.sizes[pos] == reference.size
        original = done.originals[pos]
        assert original is not None and tuple(original.shape) == (*reference.size, 3)
        if listed[i].rel == "e.jpg" and device != "cpu":
            # nvJPEG decodes a cut scan without complaint but fills the missing part with other values than
            # libjpeg's grey: on corrupt data only the status and the size have to agree
            continue
        diff = (done.inputs[pos].cpu().int() - reference.input.int()).abs()  # type: ignore[union-attr]
        assert diff.float().mean() < 1.0, (listed[i].rel, float(diff.float().mean()))
        odiff = (original.cpu().int() - reference.original.int()).abs()  # type: ignore[union-attr]
        assert odiff.float().mean() < 1.5, (listed[i].rel, float(odiff.float().mean()))
    assert decoder.fallbacks >= 1  # d.jpg went through Pillow
    assert done.encoded == [None] * len(kept) and done.parts == []


def test_an_image_the_device_cannot_resize_goes_to_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's antialiased resize refuses extreme downscales (shared memory): simulated here for the wide image
    only. That image is decoded by Pillow (its input exactly the workers'), the others stay on the device."""
    import gradcam_cli.data.device as dd

    names = ["a.jpg", "wide.jpg", "b.jpg"]
    for name, (w, h) in zip(names, [(64, 48), (400, 16), (48, 64)], strict=True):
        (tmp_path / name).write_bytes(_jpeg(smooth_rgb(w, h)))
    listed = [ImageFile(tmp_path / name, name) for name in names]
    dataset = ImageDataset(listed, FULL, keep_original=True, device_decode=True)
    batch = collate([dataset[i] for i in range(len(listed))])
    real = dd.resize_crop

    def shared_memory_limit(img: torch.Tensor, geo: object, interpolation: str = "bilinear") -> torch.Tensor:
        if img.shape[2] > 10 * img.shape[1]:
            raise RuntimeError("CUDA error: too many resources requested for launch (simulated)")
        return real(img, geo, interpolation)  # type: ignore[arg-type]

    monkeypatch.setattr(dd, "resize_crop", shared_memory_limit)
    decoder = DeviceDecoder(FULL, torch.device("cpu"), True, lambda i: listed[i].path, None)
    done = decoder.finish(batch)
    assert done.indices == [0, 1, 2] and done.errors == []
    assert (decoder.decoded, decoder.fallbacks) == (2, 1)
    pillow = ImageDataset(listed, FULL, keep_original=True)[1]
    assert done.inputs is not None and torch.equal(done.inputs[1], pillow.input)  # type: ignore[arg-type]
    assert done.originals[1] is not None and tuple(done.originals[1].shape) == (16, 400, 3)


def test_decode_time_waits_for_the_device_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage clock stops after torch.cuda.synchronize on CUDA (asynchronous kernels), never elsewhere."""
    synced: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    for device in ("cpu", "cuda"):
        decoder = DeviceDecoder(FULL, torch.device(device), False, lambda i: Path("unused"), None)
        decoder._stop_clock(0.0)
        assert decoder.seconds > 0
    assert synced == [torch.device("cuda")]


def _cut_scan(jpeg: bytes) -> bytes:
    """The JPEG with only 20 bytes of its scan data left, then the end marker."""
    sos = jpeg.index(b"\xff\xda")
    return jpeg[: sos + 20] + b"\xff\xd9"


def test_batch_without_jpegs_is_left_alone() -> None:
    batch = Batch(indices=[0], inputs=torch.zeros(1, 3, 4, 4, dtype=torch.uint8), encoded=[None], originals=[None])
    decoder = DeviceDecoder(FULL, torch.device("cpu"), False, lambda i: Path("unused"), None)
    assert decoder.finish(batch) is batch and decoder.decoded == 0


@pytest.mark.parametrize("device", DEVICES)
def test_device_can_decode(device: str) -> None:
    assert device_decoder_error(torch.device(device)) is None


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe_flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cfg = tmp_path_factory.mktemp("probe") / "probe.yaml"
    cfg.write_text("input_size: [24, 40]\nmean: [0, 0, 0]\nstd: [1, 1, 1]\n", encoding="utf-8")
    return ["--model", "toy_models:probe", "-c", str(cfg), "--workers", "0", "-q"]


@pytest.mark.parametrize("device", DEVICES)
def test_corpus_gives_the_same_rows_with_either_decoder(tmp_path: Path, probe_flags: list[str], device: str) -> None:
    """The whole hostile corpus (tests/corpus.py): the same status and error text for every file, and the same
    heatmap sizes, whether Pillow or the device decodes the JPEGs."""
    root = tmp_path / "in"
    cases = build_corpus(root, special=False)
    runs = {}
    for mode in ("workers", "device"):
        out = tmp_path / mode
        result = invoke("explain", root, "-o", out, *probe_flags, "--decode", mode, "--device", device)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        runs[mode] = {row["path"]: row for row in rows_of(out)}
    manifest = json.loads((tmp_path / "device" / "run.json").read_text(encoding="utf-8"))
    taken = sum(probe_jpeg(root / c.rel) is not None for c in cases if (root / c.rel).is_file())
    assert taken >= 5  # corrupt-in-the-middle and four EXIF orientations; the truncated and CMYK ones stay Pillow's
    assert manifest["decode"] == "device" and manifest["device_decoded"] == {"jpeg": taken, "pillow_fallback": 0}
    assert "device_decode" in manifest["stage_seconds"]
    assert json.loads((tmp_path / "workers" / "run.json").read_text(encoding="utf-8"))["decode"] == "workers"
    assert runs["workers"].keys() == runs["device"].keys() and len(runs["device"]) == len(cases)
    for path, row in runs["workers"].items():
        other = runs["device"][path]
        assert (row["status"], row["error"]) == (other["status"], other["error"]), path
    for case in cases:
        if case.expect == "ok":  # the real file names (the CSV escapes names that are not UTF-8)
            a = Image.open(tmp_path / "workers" / "heatmaps" / f"{case.rel}.png")
            b = Image.open(tmp_path / "device" / "heatmaps" / f"{case.rel}.png")
            assert a.size == b.size == case.size, case.rel
            assert Image.open(tmp_path / "device" / "overlays" / f"{case.rel}.jpg").size == case.size


def test_auto_is_workers_on_the_cpu_and_a_failing_device_is_reported(
    tmp_path: Path, probe_flags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(_jpeg(smooth_rgb(40, 24)))
    result = invoke("explain", tmp_path / "in", "-o", tmp_path / "auto", *probe_flags, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "auto" / "run.json").read_text(encoding="utf-8"))["decode"] == "workers"

    import gradcam_cli.data.device as dd

    monkeypatch.setattr(dd, "device_decoder_error", lambda device: "no nvJPEG in this build (simulated)")
    result = invoke("explain", tmp_path / "in", "-o", tmp_path / "dev", *probe_flags, "--decode", "device")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("Error: --decode device: torchvision cannot decode")
    assert "no nvJPEG in this build (simulated)" in result.output


def test_decode_is_validated(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("decode: gpu\n", encoding="utf-8")
    result = invoke("explain", tmp_path, "-o", tmp_path / "o", "-c", cfg)
    assert result.exit_code == 2
    assert "config key 'decode': expected one of auto, workers, device, got 'gpu'" in result.output
