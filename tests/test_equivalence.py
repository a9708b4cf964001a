"""Numerical equivalence of the engine's Grad-CAM with reference implementations.

Model: torchvision resnet18 with `weights=None` and fixed random weights (seeded), eval mode, at 224x224. Inputs: two
real photographs (skimage's chelsea and coffee, resized) and two random tensors. References: Captum's LayerGradCam,
torchcam's GradCAM, a from-the-formula autograd reference written here, and pytorch-grad-cam (for the upsampled,
min-max-normalised map). Every comparison prints its measured difference (`pytest -s` shows them).
"""

from __future__ import annotations

import pytest
import torch
from helpers import FIXED_TARGETS, SIZE, assert_nontrivial, fixed, make_images, make_model
from torch import Tensor, nn

from gradcam_cli.cam.engine import CamEngine
from gradcam_cli.render.heatmap import upsample_normalize


def run_ours(model: nn.Module, x: Tensor, classes: Tensor, layer: str = "layer4") -> Tensor:
    """Our raw CAMs (B, T, h, w) for the given (B, T) classes."""
    with CamEngine(model, {layer: model.get_submodule(layer)}, "gradcam") as engine:
        result = engine.run(x, fixed(classes))
    assert torch.equal(result.targets, classes)
    return result.cams[layer]


def assert_cam_close(actual: Tensor, expected: Tensor, label: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Per map (over leading dims): assert_close with rtol and an atol of `atol` times that map's max."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a = actual.reshape(-1, *actual.shape[-2:]).double()
    e = expected.reshape(-1, *expected.shape[-2:]).double()
    worst_abs, worst_rel = 0.0, 0.0
    for i in range(a.shape[0]):
        scale = float(e[i].abs().max())
        diff = float((a[i] - e[i]).abs().max())
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
        torch.testing.assert_close(a[i], e[i], rtol=rtol, atol=atol * scale, msg=lambda m, i=i: f"{label} map {i}: {m}")
    print(f"[{label}] max abs diff {worst_abs:.3e}, max diff / map max {worst_rel:.3e}")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def x() -> Tensor:
    return make_images(4, seed=1)


@pytest.fixture(scope="module")
def classes() -> Tensor:
    return torch.tensor(FIXED_TARGETS).view(-1, 1)


@pytest.fixture(scope="module")
def ours(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    cams = run_ours(model, x, classes)
    assert cams.shape == (4, 1, 7, 7)
    assert cams.dtype == torch.float32
    assert bool((cams >= 0).all())
    assert_nontrivial(cams)
    return cams


def formula_reference(model: nn.Module, x: Tensor, classes: Tensor) -> Tensor:
    """Grad-CAM straight from the formula, autograd through the whole model (params and all).

    A = layer4 output; alpha_k = mean_ij d y_c / d A_k[i, j]; map = ReLU(sum_k alpha_k A_k). Returns (B, T, h, w).
    """
    captured: list[Tensor] = []
    handle = model.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (acts,) = captured
    maps = []
    for t in range(classes.shape[1]):
        score = logits.gather(1, classes[:, t : t + 1]).sum()
        (grad,) = torch.autograd.grad(score, acts, retain_graph=True)
        alpha = grad.mean(dim=(2, 3), keepdim=True)
        maps.append(torch.relu((alpha * acts).sum(dim=1)).detach())
    return torch.stack(maps, dim=1)


def test_matches_captum_layer_gradcam(model: nn.Module, x: Tensor, classes: Tensor, ours: Tensor) -> None:
    from captum.attr import LayerGradCam

    attr = LayerGradCam(model, model.layer4).attribute(x, target=classes[:, 0], relu_attributions=True)
    assert attr.shape == (4, 1, 7, 7)
    ref = attr.detach()
    assert_nontrivial(ref)
    assert_cam_close(ours, ref, "captum LayerGradCam")


def test_matches_torchcam_gradcam(model: nn.Module, x: Tensor, classes: Tensor, ours: Tensor) -> None:
    from torchcam.methods import GradCAM

    # torchcam's GradCAM.__call__ normalises by default (`normalized=True`: per-image `cam -= min; cam /= max + 1e-8`,
    # i.e. min-max normalisation at layer resolution, after the ReLU). We compare like with like both ways:
    # its raw output (`normalized=False`) against our raw CAM, and its normalised output against our CAM
    # min-max normalised per image at layer resolution (the 1e-8 eps is far below the tolerance here).
    idx = classes[:, 0].tolist()
    with GradCAM(model, target_layer="layer4") as extractor:
        raw = extractor(class_idx=idx, scores=model(x), normalized=False)[0]
        normed = extractor(class_idx=idx, scores=model(x), normalized=True)[0]
    assert raw.shape == normed.shape == (4, 7, 7)
    assert_nontrivial(raw[:, None])
    assert_cam_close(ours[:, 0], raw, "torchcam GradCAM raw")

    flat = ours[:, 0].flatten(1)
    lo, hi = flat.amin(dim=1).view(-1, 1, 1), flat.amax(dim=1).view(-1, 1, 1)
    ours_minmax = (ours[:, 0] - lo) / (hi - lo)
    assert float(normed.amax()) <= 1.0 and float(normed.amin()) >= 0.0
    assert_cam_close(ours_minmax, normed, "torchcam GradCAM min-max normalised")


def test_matches_formula_reference(model: nn.Module, x: Tensor, classes: Tensor, ours: Tensor) -> None:
    ref = formula_reference(model, x, classes)
    model.zero_grad(set_to_none=True)
    assert_nontrivial(ref)
    assert_cam_close(ours, ref, "formula reference (float32)")

    # For information only (not asserted): how far float32 is from the same formula in float64.
    ref64 = formula_reference(make_model().double(), x.double(), classes)
    rel = float(((ours.double() - ref64).abs().amax(dim=(-2, -1)) / ref64.abs().amax(dim=(-2, -1))).max())
    print(f"[formula reference (float64), info] max diff / map max {rel:.3e}")


def test_formula_reference_discriminates(model: nn.Module, x: Tensor, classes: Tensor, ours: Tensor) -> None:
    """The reference would catch a wrong class or a missing ReLU: those differ far beyond the tolerance."""
    other = formula_reference(model, x, (classes + 1) % 1000)
    assert float((other - ours).abs().max()) > 1e-2 * float(ours.abs().max())
    with CamEngine(model, {"layer4": model.layer4}, lambda a, g: (g.mean(dim=(2, 3))[..., None, None] * a).sum(1)) as e:
        no_relu = e.run(x, fixed(classes)).cams["layer4"]
    assert float(no_relu.min()) < 0 < float(no_relu.max())
    torch.testing.assert_close(no_relu.clamp(min=0), ours, rtol=1e-5, atol=1e-6 * float(ours.max()))


def test_matches_pytorch_grad_cam_upsampled(model: nn.Module, x: Tensor, classes: Tensor, ours: Tensor) -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    # pytorch-grad-cam: ReLU, min-max normalise at layer resolution, cv2.resize (bilinear, pixel centres aligned),
    # then min-max normalise again at full size (aggregate_multi_layers). Min-max is affine, so that equals
    # upsample-then-normalise, which is what render.upsample_normalize does.
    with GradCAM(model=model, target_layers=[model.layer4]) as cam:
        ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes[:, 0]])
    model.zero_grad(set_to_none=True)
    assert ref.shape == (4, SIZE, SIZE)
    ref_t = torch.from_numpy(ref)
    mine = torch.stack([upsample_normalize(ours[b, 0], (SIZE, SIZE), (0, 0, SIZE, SIZE)) for b in range(4)])
    assert mine.shape == (4, SIZE, SIZE)
    assert float(mine.min()) == 0.0 and float(mine.max()) == 1.0
    diff = float((mine - ref_t).abs().max())
    print(f"[pytorch-grad-cam upsampled+normalised] max abs diff {diff:.3e} ({diff * 255:.4f}/255)")
    assert diff <= 2 / 255
    # and the pictures really differ between images (so the check above is not vacuous)
    assert float((ref_t[0] - ref_t[1]).abs().max()) > 0.1


def test_batch_invariance(model: nn.Module) -> None:
    """An image explained alone gives the same CAM as inside a batch of 8 different images."""
    batch = make_images(8, seed=2)
    batch[5] = batch[0].flip(-1)  # a real photo, mirrored, somewhere other than slot 0
    pos = 3
    classes8 = torch.tensor([189, 126, 287, 203, 70, 105, 231, 259]).view(-1, 1)
    in_batch = run_ours(model, batch, classes8)[pos]
    alone = run_ours(model, batch[pos : pos + 1], classes8[pos : pos + 1])[0]
    assert float(alone.max()) > 0
    assert_cam_close(in_batch, alone, "batch invariance (random image in batch of 8 vs alone)")
    # and a real photograph too
    alone0 = run_ours(model, batch[0:1], classes8[0:1])[0]
    in_batch0 = run_ours(model, batch, classes8)[0]
    assert_cam_close(in_batch0, alone0, "batch invariance (chelsea in batch of 8 vs alone)")
    # the other images of the batch do give different maps (the batch is not degenerate)
    assert not torch.allclose(run_ours(model, batch, classes8)[4], in_batch)


def test_multiple_targets_equal_single_runs(model: nn.Module, x: Tensor) -> None:
    """T=3 fixed classes [1, 5, 7] in one run == three separate single-target runs."""
    multi_classes = torch.tensor([1, 5, 7]).expand(x.shape[0], 3).contiguous()
    multi = run_ours(model, x, multi_classes)
    assert multi.shape == (x.shape[0], 3, 7, 7)
    for t, c in enumerate([1, 5, 7]):
        single = run_ours(model, x, torch.full((x.shape[0], 1), c))
        assert_cam_close(multi[:, t], single[:, 0], f"multi-target slot {t} (class {c}) vs single run")
    # the three slots are really different maps
    assert not torch.allclose(multi[:, 0], multi[:, 1])
    assert not torch.allclose(multi[:, 1], multi[:, 2])
    # and each slot also equals the formula reference for the whole (B, 3) table. The reference sums the 512
    # channels in another order: float32 rounding of terms larger than the map itself reaches a few 1e-6 of the
    # map's max at near-cancelling positions (2.2e-6 seen on a 2-core x86_64 host), so 1e-5 of it here.
    reference = formula_reference(model, x, multi_classes)
    assert_cam_close(multi, reference, "multi-target vs formula reference", atol=1e-5)
    model.zero_grad(set_to_none=True)


def test_engine_logits_equal_plain_forward(model: nn.Module, x: Tensor, classes: Tensor) -> None:
    """Hooking the layer changes nothing downstream: the engine's logits equal a plain forward's."""
    with torch.no_grad():
        plain = model(x)
    with CamEngine(model, {"layer4": model.layer4}, "gradcam") as engine:
        result = engine.run(x, fixed(classes))
    torch.testing.assert_close(result.logits, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(result.probs, plain.softmax(dim=1), rtol=1e-6, atol=1e-7)
    assert not result.logits.requires_grad
    assert not result.cams["layer4"].requires_grad
