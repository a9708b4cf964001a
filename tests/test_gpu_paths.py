"""The GPU-oriented options, exercised on the CPU: autocast, channels_last, out-of-memory batch splitting and
the device JPEG path."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from gradcam_cli import explain, load_settings
from gradcam_cli.cam.engine import CamEngine, run_batch
from gradcam_cli.cam.targets import TargetSelector
from gradcam_cli.model.forward import autocast
from gradcam_cli.render.colormaps import lut
from gradcam_cli.render.overlay import Overlayer, blend


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def _inputs() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(6, 3, 96, 96)


def _tiny() -> torch.nn.Module:
    """A small GAP + Linear classifier whose `layer` has 16 channels: the methods' own passes (one per
    channel) stay cheap."""
    from collections import OrderedDict

    torch.manual_seed(3)
    nn = torch.nn
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU()),
            layer=nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(16, 10),
        )
    ).eval()


def test_oom_halves_the_batch_and_keeps_every_image(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, x = _model(), _inputs()
    selector = TargetSelector(["topk:2"], [])
    with CamEngine(model, {"layer4": model.layer4}, "gradcam") as engine:
        whole = engine.run(x, selector)
        real_run = engine.run
        sizes: list[int] = []

        def tight_memory(batch: torch.Tensor, select: object) -> object:
            sizes.append(batch.shape[0])
            if batch.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_run(batch, select)

        monkeypatch.setattr(engine, "run", tight_memory)
        split = run_batch(engine, x, lambda a, b: selector)
    assert sizes == [6, 3, 1, 2, 3, 1, 2]  # 6 -> 3 + 3 -> (1 + 2) + (1 + 2)
    assert split.cams["layer4"].shape == whole.cams["layer4"].shape == (6, 2, 3, 3)
    torch.testing.assert_close(split.cams["layer4"], whole.cams["layer4"], rtol=1e-5, atol=1e-6)
    assert torch.equal(split.targets, whole.targets)


def test_oom_retry_runs_after_the_failed_attempt_is_released(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The failed attempt's tensors (held by its traceback's frames) are gone before the halves run; retrying
    inside the `except` block would keep them on the device and make the retry fail too."""
    import gc
    import weakref

    model, x = _model(), _inputs()
    alive_at_retry: list[bool] = []
    with CamEngine(model, {"layer4": model.layer4}, "gradcam") as engine:
        real_run = engine.run
        failed: list[weakref.ref[torch.Tensor]] = []

        def big_then_small(batch: torch.Tensor, select: object) -> object:
            if batch.shape[0] > 3:
                activations = torch.empty(1024, 1024)  # what a forward holds when the allocator gives up
                failed.append(weakref.ref(activations))
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            gc.disable()  # only reference counting may free it, as on the device between two allocations
            try:
                alive_at_retry.append(failed[0]() is not None)
            finally:
                gc.enable()
            return real_run(batch, select)

        monkeypatch.setattr(engine, "run", big_then_small)
        run_batch(engine, x, lambda a, b: TargetSelector(["pred"], []))
    assert alive_at_retry == [False, False]


def test_oom_on_a_single_image_is_raised(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model = _model()
    with CamEngine(model, {"layer4": model.layer4}, "gradcam") as engine:

        def no_memory(batch: torch.Tensor, select: object) -> object:
            raise torch.cuda.OutOfMemoryError("simulated")

        monkeypatch.setattr(engine, "run", no_memory)
        try:
            run_batch(engine, _inputs()[:1], lambda a, b: TargetSelector(["pred"], []))
        except torch.cuda.OutOfMemoryError:
            pass
        else:
            raise AssertionError("a single image that does not fit must raise, not vanish")


def test_oom_in_the_batched_backward_splits_the_batch_and_keeps_it_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory in the vmapped backward is no reason to give up vmap: the batch is halved instead."""
    model, x = _model(), _inputs()
    selector = TargetSelector(["topk:2"], [])
    real_grad = torch.autograd.grad
    batched_rows: list[int] = []

    def tight_memory(*args: object, **kwargs: object) -> object:
        if kwargs.get("is_grads_batched"):
            rows = kwargs["grad_outputs"].shape[1]  # type: ignore[union-attr]
            batched_rows.append(rows)
            if rows > 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_grad(*args, **kwargs)  # type: ignore[arg-type]

    with CamEngine(model, {"layer4": model.layer4}, "gradcam") as engine:
        whole = engine.run(x, selector)
        monkeypatch.setattr(torch.autograd, "grad", tight_memory)
        split = run_batch(engine, x, lambda a, b: selector)
        assert engine.batched_backward
    assert batched_rows == [6, 3, 3]
    torch.testing.assert_close(split.cams["layer4"], whole.cams["layer4"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ablationcam", "scorecam"])
def test_oom_in_a_methods_passes_halves_the_chunk(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ablation-CAM's head and Score-CAM's masked forwards: out of memory halves the chunk's rows (same maps);
    Ablation-CAM keeps its cheapest way of running the head instead of moving to full-size copies."""
    model, x = _tiny(), _inputs()[:2]
    selector = TargetSelector(["pred"], [])
    name = "_forward_replacing" if method == "ablationcam" else "_forward"
    real = getattr(CamEngine, name)
    rows: list[int] = []

    def tight_memory(self: CamEngine, *args: torch.Tensor) -> torch.Tensor:
        n = args[-1].shape[0]
        if self._capture is False and n > 1:
            rows.append(n)
            if n > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *args)

    with CamEngine(model, {"layer": model.layer}, method, chunk_size=8) as engine:
        whole = engine.run(x, selector)
        monkeypatch.setattr(CamEngine, name, tight_memory)
    with CamEngine(model, {"layer": model.layer}, method, chunk_size=8) as engine:
        split = run_batch(engine, x, lambda a, b: selector)
        assert getattr(engine.method, "prefix", "single") == "single"
    assert 8 in rows and max(r for r in rows if r != 8) <= 4
    torch.testing.assert_close(split.cams["layer"], whole.cams["layer"], rtol=1e-4, atol=1e-6)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


def test_bf16_autocast_gives_float32_maps_close_to_full_precision() -> None:
    model, x = _model(), _inputs()
    selector = TargetSelector(["3"], [])
    with CamEngine(model, {"layer4": model.layer4}, "gradcam") as engine:
        full = engine.run(x, selector)
        half = run_batch(engine, x, lambda a, b: selector, amp="bf16")
    cams = half.cams["layer4"]
    assert cams.dtype == torch.float32 and torch.isfinite(cams).all()
    assert _cosine(cams, full.cams["layer4"]) > 0.9


def _fc_dtypes(model: torch.nn.Module) -> list[torch.dtype]:
    """The dtype of every output of the model's final Linear layer from now on (a forward hook)."""
    seen: list[torch.dtype] = []
    model.fc.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    return seen


def test_methods_own_passes_under_bf16_autocast() -> None:
    """Score-CAM's masked forwards run under the batch's autocast (whole forwards: what --amp speeds up);
    Ablation-CAM's head forwards take the bf16 activation but run in float32 (score drops below bf16's
    rounding). Both give float32 maps close to full precision."""
    x, selector = _inputs()[:2], TargetSelector(["pred"], [])
    for method, pass_dtype in (("scorecam", torch.bfloat16), ("ablationcam", torch.float32)):
        model = _tiny()
        with CamEngine(model, {"layer": model.layer}, method, chunk_size=8) as engine:
            full = engine.run(x, selector).cams["layer"]
            seen = _fc_dtypes(model)
            half = run_batch(engine, x, lambda a, b: selector, amp="bf16").cams["layer"]
        assert seen[0] == torch.bfloat16  # the batch's forward
        assert len(seen) > 2 and set(seen[1:]) == {pass_dtype}, (method, set(seen[1:]))
        assert half.dtype == torch.float32 and _cosine(half, full) > 0.95, method


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_probe_runs_the_first_chunk_of_a_methods_passes(method: str) -> None:
    """The start-up probe (engine.check) runs one chunk of the method's own passes under the caller's autocast,
    so what fails there fails before OUT is prepared, and it leaves the method as it found it."""
    model = _tiny()
    with CamEngine(model, {"layer": model.layer}, method, chunk_size=8) as engine:
        seen = _fc_dtypes(model)
        prefix = getattr(engine.method, "prefix", None)
        with autocast(torch.device("cpu"), "bf16"):
            result = engine.check(torch.zeros(1, 3, 64, 64), TargetSelector(["pred"], []))
        assert getattr(engine.method, "prefix", None) == prefix
    assert len(seen) == 2  # the probe's forward, then one chunk (8 rows) in one forward
    assert result.cams["layer"].shape == (1, 1, 16, 16) and not result.cams["layer"].any()


def test_a_failing_pass_stops_the_run_before_out_is_prepared(
    tmp_path: Path, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradcam_cli.cam.methods.ablation import AblationCam

    def broken_head(*args: object) -> torch.Tensor:
        raise RuntimeError("mat1 and mat2 must have the same dtype (simulated)")

    monkeypatch.setattr(AblationCam, "head", broken_head)
    make_image(tmp_path / "in" / "a.png")
    settings = load_settings(None, model="resnet18", weights="none", input_size=64, workers=0, device="cpu")
    with pytest.raises(RuntimeError, match="simulated"):
        explain([tmp_path / "in"], tmp_path / "out", settings.replace(method="ablationcam", amp="bf16"))
    assert not (tmp_path / "out" / "run.json").exists()


def test_channels_last_gives_the_same_maps() -> None:
    model, x = _model(), _inputs()
    selector = TargetSelector(["pred"], [])
    with CamEngine(model, {"layer4": model.layer4}, "gradcam") as engine:
        plain = engine.run(x, selector)
    model.to(memory_format=torch.channels_last)
    with CamEngine(model, {"layer4": model.layer4}, "gradcam") as engine:
        cl = engine.run(x.contiguous(memory_format=torch.channels_last), selector)
    torch.testing.assert_close(cl.cams["layer4"], plain.cams["layer4"], rtol=1e-4, atol=1e-5)


def test_explain_uses_channels_last_on_the_cpu_unless_told_not_to(
    tmp_path: Path, make_image: Callable[..., Path]
) -> None:
    """auto (the default) resolves to channels_last on the CPU and says so in run.json; the maps are the same."""
    folder = tmp_path / "in"
    for i in range(3):
        make_image(folder / f"{i}.png", size=(80, 64), seed=i)
    runs = {}
    for name, flag in (("auto", None), ("off", False), ("on", True)):
        settings = load_settings(
            None,
            model="resnet18",
            weights="none",
            input_size=96,
            workers=0,
            save="npy",
            channels_last=flag,
            device="cpu",  # auto would pick a GPU where there is one, and channels_last auto is off there
        )
        explain([folder], tmp_path / name, settings)
        manifest = json.loads((tmp_path / name / "run.json").read_text())
        runs[name] = (manifest["channels_last"], [np.load(p) for p in sorted((tmp_path / name).rglob("*.npy"))])
    assert [runs[n][0] for n in ("auto", "off", "on")] == [True, False, True]
    assert len(runs["auto"][1]) == 3
    for auto, off in zip(runs["auto"][1], runs["off"][1], strict=True):
        np.testing.assert_allclose(auto, off, rtol=1e-4, atol=1e-5 * float(np.abs(off).max()))


def _overlay_inputs() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    from gradcam_cli.render.heatmap import heatmap

    torch.manual_seed(2)
    original = (torch.rand(48, 64, 3) * 255).to(torch.uint8)
    heat = heatmap(torch.rand(5, 5), (48, 64), (0.0, 0.0, 64.0, 48.0)).pixels
    return original, heat, lut("jet")


def test_device_jpeg_path_gives_the_same_overlay_as_pillow() -> None:
    """The CUDA path (blend on the device, torchvision.io JPEG there) run on CPU tensors: a JPEG of the same picture."""
    original, heat, table = _overlay_inputs()
    device_path = Overlayer(table, torch.device("cpu"), 0.5, device_codec=True)
    host_path = Overlayer(table, torch.device("cpu"), 0.5)
    encode = device_path.encoder(original, heat, heat.numpy())
    device_path.flush()
    ours = Image.open(io.BytesIO(encode()))
    pillow = Image.open(io.BytesIO(host_path.encoder(original, heat, heat.numpy())()))
    assert ours.format == "JPEG" and ours.size == pillow.size == (64, 48)
    assert device_path.device_codec and device_path.codec_failure is None
    # both are quality-90 JPEGs of overlays that agree to 1/255 (integer vs Pillow blend rounding)
    difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(pillow, dtype=np.int16))
    assert difference.mean() < 3.0, difference.mean()


def test_device_jpeg_failure_falls_back_to_pillow_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchvision without nvJPEG fails the first call; that overlay and all later ones go through Pillow."""
    original, heat, table = _overlay_inputs()
    calls: list[int] = []

    def no_nvjpeg(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        raise RuntimeError("encode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(torchvision.io, "encode_jpeg", no_nvjpeg)
    colours = Overlayer(table, torch.device("cpu"), 0.5, device_codec=True)
    for _ in range(3):
        encode = colours.encoder(original, heat, heat.numpy())
        colours.flush()
        assert Image.open(io.BytesIO(encode())).format == "JPEG"
    assert calls == [1] and not colours.device_codec  # the 16x16 test image, before the first overlay
    assert colours.codec_failure == "RuntimeError: encode_jpegs_cuda: torchvision not compiled with nvJPEG support"


def test_device_jpegs_of_a_batch_in_one_call_and_a_failing_one_goes_to_pillow_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch's overlays are encoded in one list call. When one image makes the call fail (or the device runs
    out of memory), the others are encoded there one by one, that one by Pillow; the device codec stays on
    for the next batch."""
    original, heat, table = _overlay_inputs()
    odd = original.clone()
    odd[0, 0] = torch.tensor([1, 2, 3], dtype=torch.uint8)  # the image the (simulated) encoder rejects
    real = torchvision.io.encode_jpeg
    calls: list[int] = []

    def picky(images: list[torch.Tensor], quality: int) -> list[torch.Tensor]:
        calls.append(len(images))
        if any(bool((image[:, 0, 0] == odd_pixel).all()) for image in images):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(images, quality=quality)  # type: ignore[return-value]

    odd_pixel = blend(odd, heat, torch.from_numpy(table), 0.5)[0, 0]
    colours = Overlayer(table, torch.device("cpu"), 0.5, device_codec=True)
    colours._codec_works(torch.device("cpu"))  # the start-up check, before the fault is injected
    monkeypatch.setattr(torchvision.io, "encode_jpeg", picky)
    encoders = [colours.encoder(o, heat, heat.numpy()) for o in (original, odd, original)]
    colours.flush()
    assert calls == [3, 1, 1, 1]  # the list call, then one by one
    assert colours.device_codec and colours.codec_fallbacks == 1 and colours.codec_failure is None
    pictures = [np.asarray(Image.open(io.BytesIO(encode())), dtype=np.int16) for encode in encoders]
    assert np.array_equal(pictures[0], pictures[2])
    assert np.abs(pictures[1] - pictures[0]).mean() < 3.0  # the same overlay, encoded by Pillow
    calls.clear()
    more = [colours.encoder(original, heat, heat.numpy()) for _ in range(2)]
    colours.flush()
    assert calls == [2] and all(Image.open(io.BytesIO(encode())).format == "JPEG" for encode in more)


def test_metric_passes_halve_their_chunk_on_oom_after_releasing_the_failed_attempt() -> None:
    """The metric passes' forward (deletion/insertion/drop chunks) goes through the batch's splitter: halves
    after the failed attempt's tensors are gone, the same logits as in one piece."""
    import gc
    import weakref

    from gradcam_cli.audit.batch_maps import PassSetup
    from gradcam_cli.audit.evaluate import Evaluator
    from gradcam_cli.config import Settings
    from gradcam_cli.model.loading import InputSpec, LoadedModel

    tiny = _tiny()
    failed: list[weakref.ref[torch.Tensor]] = []
    sizes: list[int] = []
    alive_at_retry: list[bool] = []

    class TightMemory(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(x.shape[0])
            if x.shape[0] > 2:
                held = torch.empty(1024, 1024)  # what the failed forward held
                failed.append(weakref.ref(held))
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            gc.disable()
            try:
                alive_at_retry.append(any(ref() is not None for ref in failed))
            finally:
                gc.enable()
            return tiny(x)

    spec = InputSpec(size=(96, 96), resize_size=96, mean=(0.5,) * 3, std=(0.5,) * 3)
    x = _inputs()
    loaded = LoadedModel(TightMemory(), "tiny", "none", spec, [])
    evaluator = Evaluator(PassSetup(Settings(), loaded, {}, torch.device("cpu"), None, None))
    with torch.no_grad():
        whole = tiny(x)
    torch.testing.assert_close(evaluator.forward(x), whole)
    assert sizes == [6, 3, 1, 2, 3, 1, 2] and not any(alive_at_retry)
