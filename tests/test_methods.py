"""Every CAM method against a reference implementation, or, where ours differs on purpose, against the formula.

Model: torchvision resnet18 with `weights=None` and fixed random weights (seed 0), eval mode, 224x224 inputs (two
photographs and two random tensors, as in test_equivalence.py). References: pytorch-grad-cam 1.5 (GradCAM,
GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM, EigenCAM, EigenGradCAM, ScoreCAM, AblationCAM,
GuidedBackpropReLUModel), Captum (GuidedBackprop, GuidedGradCam) and torchcam (CAM).

Comparisons are at the target layer's resolution after per-image min-max normalisation, max abs difference <= 1e-4.
pytorch-grad-cam is asked for its maps at layer resolution by telling it the "input size" is the layer's size:
its own pipeline (ReLU, cv2 resize to that size, i.e. none, min-max) then runs unchanged. Every comparison
prints its measured difference (`pytest -s` shows them).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FIXED_TARGETS, SIZE, assert_nontrivial, fixed, make_images, make_model
from torch import Tensor, nn

from gradcam_cli.cam.engine import AUGMENTATIONS, CamEngine
from gradcam_cli.cam.fuse import minmax
from gradcam_cli.cam.methods import get_spec, method_names
from gradcam_cli.cam.methods.base import first_component
from gradcam_cli.cam.methods.gradient import gradcampp

TOL = 1e-4


# ------------------------------------------------------------------------------------------------ helpers


def run(model: nn.Module, x: Tensor, classes: Tensor, method: str | Callable[..., Tensor], layer: str = "layer4", **kw):
    """Our CamResult for fixed (B, T) classes."""
    with CamEngine(model, {layer: model.get_submodule(layer)}, method, **kw) as engine:
        result = engine.run(x, fixed(classes))
    assert torch.equal(result.targets, classes)
    return result


def compare(ours: Tensor, ref: Tensor, label: str, tol: float = TOL) -> float:
    """Per-image min-max both (N, h, w) maps, then max abs difference <= tol; returns it."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = float((minmax(ours.double()) - minmax(ref.double())).abs().max())
    print(f"[{label}] max abs diff after per-image min-max: {diff:.3e}")
    assert diff <= tol, f"{label}: {diff:.3e} > {tol}"
    return diff


def pgc_layer_maps(cam_cls: type, model: nn.Module, x: Tensor, classes: Tensor, layer: str = "layer4", **call_kw):
    """pytorch-grad-cam's own ReLU'd, min-max-normalised maps at the layer's resolution, (B, h, w)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    module = model.get_submodule(layer)
    with torch.no_grad():
        h, w = _layer_output(model, module, x[:1]).shape[-2:]
    with cam_cls(model=model, target_layers=[module]) as cam:
        cam.get_target_width_height = lambda _input: (w, h)  # resize to the layer's own size = no resize
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes[:, 0]], **call_kw)
    model.zero_grad(set_to_none=True)
    return torch.from_numpy(np.asarray(maps)).float()


def _layer_output(model: nn.Module, module: nn.Module, x: Tensor) -> Tensor:
    out: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, o: out.append(o))
    try:
        model(x)
    finally:
        handle.remove()
    return out[0]


def acts_and_grads(model: nn.Module, x: Tensor, classes: Tensor, layer: str = "layer4") -> tuple[Tensor, Tensor]:
    """A (B, K, h, w) and dy_c/dA from plain autograd through the whole model (the formulas' inputs)."""
    captured: list[Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, o: captured.append(o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (a,) = captured
    (g,) = torch.autograd.grad(logits.gather(1, classes[:, :1]).sum(), a)
    model.zero_grad(set_to_none=True)
    return a.detach(), g.detach()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def x() -> Tensor:
    return make_images(4, seed=1)


@pytest.fixture(scope="module")
def x_small(x: Tensor) -> Tensor:
    """Two of the images at 128 px (layer4 4x4) for the tests that check our own formulas and properties."""
    return F.interpolate(x[:2], size=(128, 128), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def classes() -> Tensor:
    return torch.tensor(FIXED_TARGETS).view(-1, 1)


@pytest.fixture(scope="module")
def ag(model: nn.Module, x: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    return acts_and_grads(model, x, classes)


def test_method_names_in_sync_with_config() -> None:
    """config.py (no torch) reads the --method names from the registry; every registered method says when to use
    it and its implementation can be built."""
    from gradcam_cli.cam.methods import BUILT_IN_METHODS
    from gradcam_cli.cam.methods.base import build_method
    from gradcam_cli.config import METHOD_NAMES

    assert METHOD_NAMES == BUILT_IN_METHODS == method_names()[: len(BUILT_IN_METHODS)]
    assert all(get_spec(name).when for name in METHOD_NAMES)
    assert all(build_method(name).spec is get_spec(name) for name in METHOD_NAMES)


# ------------------------------------------------------------------------- gradient methods vs pgc


GRADIENT_METHODS = ("gradcam", "xgradcam", "hirescam", "layercam")


@pytest.fixture(scope="module")
def ours_layer3(model: nn.Module, x: Tensor, classes: Tensor) -> dict[str, Tensor]:
    """Our layer3 maps of the four plain gradient methods, (4, 14, 14) each, computed once for the tests below."""
    return {n: run(model, x, classes, n, layer="layer3").cams["layer3"][:, 0] for n in GRADIENT_METHODS}


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_methods_match_pytorch_grad_cam(
    model: nn.Module, x: Tensor, classes: Tensor, ours_layer3: dict[str, Tensor], name: str
) -> None:
    """At layer3 (14x14), where dy/dA varies over positions (it passes through layer4).

    At layer4 resnet18 is GAP+FC, so dy/dA is constant over positions and HiResCAM and XGrad-CAM reduce to Grad-CAM
    exactly: a comparison there could not tell the formulas apart (test_equivalence.py covers Grad-CAM at layer4).
    """
    import pytorch_grad_cam as pgc

    ref_cls = {"gradcam": pgc.GradCAM, "xgradcam": pgc.XGradCAM, "hirescam": pgc.HiResCAM, "layercam": pgc.LayerCAM}
    ours = ours_layer3[name]
    ref = pgc_layer_maps(ref_cls[name], model, x, classes, layer="layer3")
    assert ours.shape == ref.shape == (4, 14, 14)
    assert_nontrivial(ref[:, None])
    compare(ours, ref, f"{name} vs pytorch-grad-cam (layer3)")


def test_gradient_methods_are_different_maps(ours_layer3: dict[str, Tensor]) -> None:
    """Guard against one formula standing in for another: at layer3 the four maps differ well beyond the tolerance."""
    maps = {n: minmax(m) for n, m in ours_layer3.items()}
    for i, first in enumerate(GRADIENT_METHODS):
        for second in GRADIENT_METHODS[i + 1 :]:
            diff = float((maps[first] - maps[second]).abs().max())
            assert diff > 100 * TOL, (first, second, diff)


def test_gradcampp_paper_alpha_and_pytorch_grad_cam_eps(
    model: nn.Module, x: Tensor, classes: Tensor, ag: tuple[Tensor, Tensor]
) -> None:
    """Ours is the paper's alpha with no eps; pytorch-grad-cam adds eps=1e-6 to the denominator on purpose-free grounds.

    Here the layer4 gradients are ~1e-3, so g^2 ~ 1e-6 and that eps changes alpha by tens of percent: our maps
    and pytorch-grad-cam's differ (measured and printed). So (1) ours is checked against the formula written out
    below and (2) the same code with eps=1e-6 must reproduce pytorch-grad-cam within 1e-4.
    """
    import pytorch_grad_cam as pgc

    a, g = ag
    ours = run(model, x, classes, "gradcampp").cams["layer4"][:, 0]
    # (1) the formula: alpha = g^2 / (2 g^2 + sum_ab A * g^3), 0 where g == 0; w = sum_ij alpha relu(g)
    a64, g64 = a.double(), g.double()
    sum_a = a64.sum(dim=(2, 3), keepdim=True)
    alpha = g64**2 / (2 * g64**2 + sum_a * g64**3)
    alpha = torch.where(g64 != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * g64.clamp(min=0)).sum(dim=(2, 3))
    formula = torch.relu((weights[:, :, None, None] * a64).sum(1))
    assert float(formula.amax()) > 0
    rel = float(((ours.double() - formula).abs().amax(dim=(1, 2)) / formula.amax(dim=(1, 2))).max())
    print(f"[gradcampp vs paper formula (float64)] max diff / map max {rel:.3e}")
    assert rel < 1e-4
    # (2) with pytorch-grad-cam's eps the same code reproduces it
    ref = pgc_layer_maps(pgc.GradCAMPlusPlus, model, x, classes)
    with_eps = partial(gradcampp, eps=1e-6)
    compare(run(model, x, classes, with_eps).cams["layer4"][:, 0], ref, "gradcampp(eps=1e-6) vs pytorch-grad-cam")
    measured = float((minmax(ours) - minmax(ref)).abs().max())
    print(f"[gradcampp (paper, no eps) vs pytorch-grad-cam, info] max abs diff {measured:.3e}")
    # what eps does is visible at this tolerance (else the check above would not tell the two apart)
    assert measured > 10 * TOL


# -------------------------------------------------------------------------- eigen methods, up to sign


@pytest.mark.parametrize("name", ["eigencam", "eigengradcam"])
def test_eigen_methods_match_pytorch_grad_cam_up_to_sign(
    model: nn.Module, x: Tensor, classes: Tensor, ag: tuple[Tensor, Tensor], name: str
) -> None:
    """The principal component's sign is arbitrary in an SVD; ours is fixed (positive correlation with the
    channel sum, see gradcam_cli.methods), pytorch-grad-cam's is whatever LAPACK returns, and it ReLUs after.
    So per image: pgc's map == minmax(ReLU(s * ours_signed)) with s = the sign that aligns the two projections.
    """
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    a, g = ag
    tensor = a if name == "eigencam" else g * a
    signed = first_component(tensor)  # (B, h, w) our signed projection
    # documented sign: positive correlation with the channel sum (for eigencam: the mean activation)
    reference = tensor.sum(1).flatten(1)
    reference = reference - reference.mean(1, keepdim=True)
    assert bool(((signed.flatten(1) * reference).sum(1) >= 0).all())
    ours = run(model, x, classes, name).cams["layer4"][:, 0]
    torch.testing.assert_close(ours, torch.relu(signed), rtol=1e-5, atol=1e-6 * float(signed.abs().max()))
    pgc_signed = torch.from_numpy(get_2d_projection(tensor.numpy()))
    s = torch.sign((pgc_signed * signed).flatten(1).sum(1)).view(-1, 1, 1)
    compare(signed, s * pgc_signed, f"{name} signed projection vs pytorch-grad-cam get_2d_projection")
    ref_cls = pgc.EigenCAM if name == "eigencam" else pgc.EigenGradCAM
    ref = pgc_layer_maps(ref_cls, model, x, classes)
    compare(torch.relu(s * signed), ref, f"{name} vs pytorch-grad-cam (its sign)")
    print(f"[{name}] pytorch-grad-cam's sign agrees with ours on {int((s > 0).sum())} of {len(s)} images")


def test_eigen_smooth_matches_pytorch_grad_cam_up_to_sign(
    model: nn.Module, x: Tensor, classes: Tensor, ag: tuple[Tensor, Tensor]
) -> None:
    """--eigen-smooth: the first principal component of alpha_k A_k instead of their sum (pgc's eigen_smooth)."""
    import pytorch_grad_cam as pgc

    a, g = ag[0][:2], ag[1][:2]  # the two photographs
    signed = first_component(g.mean(dim=(2, 3), keepdim=True) * a)
    ours = run(model, x[:2], classes[:2], "gradcam", eigen_smooth=True).cams["layer4"][:, 0]
    torch.testing.assert_close(ours, torch.relu(signed), rtol=1e-5, atol=1e-6 * float(signed.abs().max()))
    ref = pgc_layer_maps(pgc.GradCAM, model, x[:2], classes[:2], eigen_smooth=True)
    # pgc's sign is arbitrary: per image take the sign under which its ReLU'd map matches
    candidates = torch.stack([minmax(torch.relu(signed)), minmax(torch.relu(-signed))])
    best = (candidates - minmax(ref)[None]).abs().amax(dim=(2, 3)).argmin(dim=0)
    chosen = torch.where(best.view(-1, 1, 1) == 0, torch.relu(signed), torch.relu(-signed))
    compare(chosen, ref, "gradcam --eigen-smooth vs pytorch-grad-cam eigen_smooth=True (its sign)")


# ------------------------------------------------------------------------------- gradient-free methods


@pytest.mark.slow
def test_scorecam_matches_pytorch_grad_cam(model: nn.Module, x: Tensor, classes: Tensor) -> None:
    """At layer1 (64 channels: one forward per channel, so 64 forwards here and 64 in the reference), coffee image.

    chunk_size 24 splits the 64 masked inputs into 24 + 24 + 16 rows, so the chunking itself is exercised.
    """
    import pytorch_grad_cam as pgc

    xi, ci = x[1:2], classes[1:2]
    ours = run(model, xi, ci, "scorecam", layer="layer1", chunk_size=24).cams["layer1"][:, 0]
    ref = pgc_layer_maps(pgc.ScoreCAM, model, xi, ci, layer="layer1")
    assert ours.shape == ref.shape == (1, 56, 56)
    compare(ours, ref, "scorecam vs pytorch-grad-cam (layer1)")
    # not vacuous: the same map with uniform channel weights (no scores) is off by much more than the tolerance
    a = _layer_output(model, model.layer1, xi).detach()
    uniform = torch.relu(a.mean(1))
    assert float((minmax(uniform) - minmax(ref)).abs().max()) > 10 * TOL


@pytest.mark.slow
def test_ablationcam_matches_pytorch_grad_cam(model: nn.Module, x: Tensor, classes: Tensor) -> None:
    """At layer1 (64 channels), coffee image, whose target score is positive (pgc divides by y, we by |y|)."""
    import pytorch_grad_cam as pgc

    xi, ci = x[1:2], classes[1:2]
    with torch.no_grad():
        assert float(model(xi)[0, ci[0, 0]]) > 0
    ours = run(model, xi, ci, "ablationcam", layer="layer1", chunk_size=24).cams["layer1"][:, 0]
    ref = pgc_layer_maps(pgc.AblationCAM, model, xi, ci, layer="layer1")
    compare(ours, ref, "ablationcam vs pytorch-grad-cam (layer1)")
    a = _layer_output(model, model.layer1, xi).detach()
    assert float((minmax(torch.relu(a.mean(1))) - minmax(ref)).abs().max()) > 10 * TOL


def resnet_head(model: nn.Module, a: Tensor) -> Tensor:
    """resnet18 after layer4, written out: fc(flatten(avgpool(A)))."""
    return model.fc(torch.flatten(model.avgpool(a), 1))


def test_ablationcam_formula_with_negative_scores(model: nn.Module, x: Tensor, classes: Tensor) -> None:
    """Ours divides the score drop by |y|, not y (the paper, pytorch-grad-cam): checked against the formula.

    Image 0's target logit is negative, image 1's positive. With y < 0 the paper's weights all flip sign and
    its map shows where removing a channel RAISES the score; ours keeps meaning "evidence for the class".
    Also checks the reduced-size-prefix shortcut (engine._head) against the always-exact full-size prefix.
    """
    xi, ci = x[:2], classes[:2]
    a = _layer_output(model, model.layer4, xi).detach().double()
    head = copy.deepcopy(model).double()
    with torch.no_grad():  # the formula in float64: ours is float32, and y - y_k is a difference of close logits
        y = resnet_head(head, a).gather(1, ci)[:, 0]  # (2,)
        assert float(y[0]) < 0 < float(y[1])
        k = a.shape[1]
        ablated = a[:, None].repeat(1, k, 1, 1, 1)  # (2, K, K, 7, 7): row j has channel j zeroed
        ablated[:, torch.arange(k), torch.arange(k)] = 0
        y_k = torch.stack([resnet_head(head, ablated[i]).gather(1, ci[i].expand(k, 1))[:, 0] for i in range(2)])
    weights = (y[:, None] - y_k) / y.abs()[:, None]
    formula = torch.relu((weights[:, :, None, None] * a).sum(1))
    paper = torch.relu(((y[:, None] - y_k) / y[:, None])[:, :, None, None].mul(a).sum(1))
    with CamEngine(model, {"layer4": model.layer4}, "ablationcam", chunk_size=513) as engine:
        ours = engine.run(xi, fixed(ci)).cams["layer4"][:, 0]
        assert engine.method.prefix == "single", "one reduced-size image should do for resnet18's prefix"
    # one channel moves a layer4 logit by ~1e-4 of its size here, so the formula is evaluated in float64 (a
    # float32 formula is itself off by ~1e-4 through that cancellation)
    compare(ours, formula, "ablationcam vs float64 formula (|y|)")
    compare(ours[1:], paper[1:], "ablationcam vs float64 paper formula where y > 0")
    assert float((minmax(ours[:1]) - minmax(paper[:1].float())).abs().max()) > 0.1  # y < 0: the paper's differs


class TinyNet(nn.Module):
    """conv -> ReLU -> conv (target) -> ReLU(inplace) -> GAP -> fc: every method runs on it in milliseconds."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU())
        self.target = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        self.fail_after = fail_after
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("model failed mid-run")
        return self.fc(torch.flatten(self.pool(self.act(self.target(self.stem(x)))), 1))


class PooledSkipNet(nn.Module):
    """stem -> target conv -> + mean-pooled stem output (a skip around the target) -> GAP -> fc.

    The pooled skip broadcasts over any spatial size, so running the part before the target on a reduced-size
    image does NOT fail: it silently adds a wrong skip. Only the engine's control row can notice.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.target = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def head(self, a: Tensor, stem: Tensor) -> Tensor:
        return self.fc(torch.relu(a + stem.mean(dim=(2, 3), keepdim=True)).mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        return self.head(self.target(s), s)


class BatchReshapeNet(TinyNet):
    """TinyNet whose head reshapes with the INPUT's batch size (as lukemelas' EfficientNet: `x.view(bs, -1)`)."""

    def forward(self, x: Tensor) -> Tensor:
        bs = x.size(0)
        return self.fc(self.pool(self.act(self.target(self.stem(x)))).view(bs, -1))


@pytest.mark.parametrize(("net", "prefix"), [("tiny", "single"), ("batch-reshape", "small"), ("pooled-skip", "full")])
def test_ablation_prefix_shortcuts_are_checked(net: str, prefix: str) -> None:
    """Ablation-CAM throws away what runs before the target layer, so it runs it as cheaply as the model allows.

    TinyNet: one reduced-size image. BatchReshapeNet: a head that needs n rows from the input fails that (wrong
    shape) and gets n reduced-size copies. PooledSkipNet: a skip around the target broadcasts over any size, so
    both shortcuts would silently add a wrong skip; the control row catches it and the full-size prefix runs.
    Every way must give the formula's map, and the same map as the full-size prefix.
    """
    model: nn.Module = {"tiny": TinyNet, "batch-reshape": BatchReshapeNet, "pooled-skip": PooledSkipNet}[net]().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cls = torch.tensor([[1], [3]])
    with CamEngine(model, {"target": model.target}, "ablationcam", chunk_size=3) as engine:
        ours = engine.run(x, fixed(cls)).cams["target"][:, 0]
        assert engine.method.prefix == prefix
        engine.method.prefix = "full"
        full = engine.run(x, fixed(cls)).cams["target"][:, 0]
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6 * float(full.max()))
    with torch.no_grad():
        if net == "pooled-skip":
            s = model.stem(x)
            a = model.target(s)
            head = lambda t, i: model.head(t, s[i : i + 1])  # noqa: E731
        else:
            a = model.target(model.stem(x))
            head = lambda t, i: model.fc(torch.relu(t).mean(dim=(2, 3)))  # noqa: E731
        k = a.shape[1]
        maps = []
        for i in range(2):
            rows = a[i : i + 1].repeat(k + 1, 1, 1, 1)
            rows[torch.arange(1, k + 1), torch.arange(k)] = 0
            y = head(rows, i)[:, cls[i, 0]]
            w = (y[0] - y[1:]) / y[0].abs()
            maps.append((w[:, None, None] * a[i]).sum(0))
    formula = torch.relu(torch.stack(maps))
    assert float(formula.max()) > 0
    torch.testing.assert_close(ours, formula, rtol=1e-4, atol=1e-5 * float(formula.max()))
    # --counterfactual explains -y: every weight flips, the map is ReLU(-sum_k w_k A_k)
    with CamEngine(model, {"target": model.target}, "ablationcam", counterfactual=True) as engine:
        counter = engine.run(x, fixed(cls)).cams["target"][:, 0]
    counter_formula = torch.relu(-torch.stack(maps))
    assert float(counter_formula.max()) > 0
    torch.testing.assert_close(counter, counter_formula, rtol=1e-4, atol=1e-5 * float(counter_formula.max()))


def test_cam_matches_torchcam_and_gradcam(model: nn.Module, x: Tensor, classes: Tensor) -> None:
    """CAM = ReLU(sum_k W[c, k] A_k); for GAP+FC it is h*w times Grad-CAM.

    torchcam's CAM (`normalized=False`) is the same sum WITHOUT the ReLU (the 2016 paper's map); every map of
    gradcam-cli is ReLU'd ("evidence for the class"), so ours must equal ReLU(torchcam's), and min-max'ed
    likewise. Its negative part is what `--counterfactual` shows.
    """
    from torchcam.methods import CAM

    ours = run(model, x, classes, "cam").cams["layer4"][:, 0]
    with CAM(model, target_layer="layer4", fc_layer="fc") as extractor:
        raw = extractor(class_idx=classes[:, 0].tolist(), scores=model(x), normalized=False)[0]
    assert raw.shape == ours.shape == (4, 7, 7)
    assert float(raw.min()) < 0 < float(raw.max())
    ref = torch.relu(raw)
    assert_nontrivial(ref[:, None])
    rel = float(((ours - ref).abs().amax(dim=(1, 2)) / ref.amax(dim=(1, 2))).max())
    print(f"[cam vs ReLU(torchcam CAM raw)] max diff / map max {rel:.3e}")
    assert rel < 1e-5
    compare(ours, ref, "cam vs ReLU(torchcam CAM)")
    counter = run(model, x, classes, "cam", counterfactual=True).cams["layer4"][:, 0]
    compare(counter, torch.relu(-raw), "cam --counterfactual vs ReLU(-torchcam CAM)")
    gradcam = run(model, x, classes, "gradcam").cams["layer4"][:, 0]
    torch.testing.assert_close(ours, 49 * gradcam, rtol=1e-4, atol=1e-5 * float(ours.max()))


# ------------------------------------------------------------------------------------------------ guided


def test_guided_backprop_matches_captum_and_pytorch_grad_cam(model: nn.Module, x: Tensor, classes: Tensor) -> None:
    from captum.attr import GuidedBackprop
    from pytorch_grad_cam import GuidedBackpropReLUModel

    xi, ci = x[:2], classes[:2]
    result = run(model, xi, ci, "guided-backprop")
    assert list(result.cams) == ["input"] and list(result.guided) == ["input"]
    ours = result.guided["input"][:, 0]  # (2, 3, 224, 224)
    assert ours.shape == (2, 3, SIZE, SIZE)
    torch.testing.assert_close(result.cams["input"][:, 0], ours.abs().amax(dim=1))
    captum = GuidedBackprop(model).attribute(xi.clone(), target=ci[:, 0]).detach()
    model.zero_grad(set_to_none=True)
    # per image, all three colour channels min-max'ed together
    compare(ours.flatten(1, 2), captum.flatten(1, 2), "guided backprop vs Captum GuidedBackprop")
    # pytorch-grad-cam's model wrapper replaces ReLUs by fresh nn.ReLU() afterwards (losing inplace=True): a copy
    pgc_model = GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")
    ref = torch.from_numpy(pgc_model(xi[1:2], int(ci[1, 0]))).permute(2, 0, 1)[None]  # one image per call
    compare(ours[1:].flatten(1, 2), ref.flatten(1, 2), "guided backprop vs pytorch-grad-cam GuidedBackpropReLUModel")
    # two classes per image through the one vmapped guided backward == two single-class runs
    pair = torch.cat([ci, torch.tensor([[7], [9]])], dim=1)
    both = run(model, xi, pair, "guided-backprop").guided["input"]
    torch.testing.assert_close(both[:, 0], ours, rtol=1e-5, atol=1e-6 * float(ours.abs().max()))
    second = run(model, xi, pair[:, 1:], "guided-backprop").guided["input"][:, 0]
    torch.testing.assert_close(both[:, 1], second, rtol=1e-5, atol=1e-6 * float(second.abs().max()))
    # not vacuous: the plain input gradient is a different picture
    plain = xi.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(plain).gather(1, ci).sum(), plain)
    assert float((minmax(grad.flatten(1, 2)) - minmax(ours.flatten(1, 2))).abs().max()) > 0.05


def test_guided_gradcam_matches_captum(model: nn.Module, x: Tensor, classes: Tensor) -> None:
    """Guided Grad-CAM = guided backprop x bilinearly upsampled Grad-CAM (Captum with interpolate_mode='bilinear')."""
    from captum.attr import GuidedGradCam

    xi, ci = x[1:2], classes[1:2]
    result = run(model, xi, ci, "guided-gradcam")
    ours = result.guided["layer4"][:, 0]
    ref = GuidedGradCam(model, model.layer4).attribute(xi.clone(), target=ci[:, 0], interpolate_mode="bilinear")
    model.zero_grad(set_to_none=True)
    compare(ours.flatten(1, 2), ref.detach().flatten(1, 2), "guided grad-cam vs Captum GuidedGradCam")
    # heatmaps of guided-gradcam are its Grad-CAM; the guided map is the product with guided backprop
    gradcam = run(model, xi, ci, "gradcam").cams["layer4"]
    torch.testing.assert_close(result.cams["layer4"], gradcam)
    gbp = run(model, xi, ci, "guided-backprop").guided["input"][:, 0]
    up = F.interpolate(gradcam, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, gbp * up, rtol=1e-5, atol=1e-6 * float(ours.abs().max()))


# ------------------------------------------------------------------------------ counterfactual, smoothing


def test_counterfactual_is_the_negated_gradient(
    model: nn.Module, x: Tensor, classes: Tensor, ag: tuple[Tensor, Tensor]
) -> None:
    """--counterfactual: Grad-CAM of -y: ReLU(-sum_k alpha_k A_k); it lights up exactly where the normal map is 0."""
    a, g = ag
    pre = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1)
    normal = run(model, x, classes, "gradcam").cams["layer4"][:, 0]
    counter = run(model, x, classes, "gradcam", counterfactual=True).cams["layer4"][:, 0]
    scale = float(pre.abs().max())
    torch.testing.assert_close(normal, torch.relu(pre), rtol=1e-5, atol=1e-6 * scale)
    torch.testing.assert_close(counter, torch.relu(-pre), rtol=1e-5, atol=1e-6 * scale)
    assert float(counter.max()) > 0 and float((normal * counter).abs().max()) == 0.0
    cam_counter = run(model, x, classes, "cam", counterfactual=True).cams["layer4"][:, 0]
    torch.testing.assert_close(cam_counter, 49 * counter, rtol=1e-4, atol=1e-5 * float(cam_counter.max()))


def test_aug_smooth_is_the_mean_over_augmentations(model: nn.Module, x_small: Tensor, classes: Tensor) -> None:
    """--aug-smooth = mean over AUGMENTATIONS of the raw maps, each un-flipped, classes fixed from the original."""
    xi, ci = x_small[:1], classes[:1]
    smooth = run(model, xi, ci, "gradcam", aug_smooth=True).cams["layer4"]
    views = []
    for flip, factor in AUGMENTATIONS:
        xa = xi * factor
        m = run(model, xa.flip(-1) if flip else xa, ci, "gradcam").cams["layer4"]
        views.append(m.flip(-1) if flip else m)
    formula = torch.stack(views).mean(0)
    torch.testing.assert_close(smooth, formula, rtol=1e-5, atol=1e-6 * float(formula.max()))
    # the augmentation set is closed under mirroring: smoothing a mirrored image gives the mirrored map
    mirrored = run(model, xi.flip(-1), ci, "gradcam", aug_smooth=True).cams["layer4"]
    torch.testing.assert_close(mirrored, smooth.flip(-1), rtol=1e-4, atol=1e-5 * float(smooth.max()))
    assert not torch.allclose(smooth, views[0], rtol=1e-3)  # the augmentations do change the map


# ----------------------------------------------------------------------------------- targets and layers


def test_topk_targets_take_one_backward(model: nn.Module, x_small: Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """T=5 classes per image: ONE autograd.grad call (vmapped), and each slot equals its own single-class run."""
    x = x_small
    calls: list[bool] = []
    real_grad = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        calls.append(bool(kwargs.get("is_grads_batched", False)))
        return real_grad(*args, **kwargs)

    table = torch.tensor([[1, 5, 7, 189, 900]]).expand(2, 5).contiguous()
    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    with CamEngine(model, {"layer3": model.layer3, "layer4": model.layer4}, "gradcampp") as engine:
        multi = engine.run(x, fixed(table)).cams
        assert engine.backward_passes == 1 and engine.batched_backward
    assert calls == [True]
    monkeypatch.undo()
    for t in (0, 3):
        single = run(model, x, table[:, t : t + 1], "gradcampp")
        with CamEngine(model, {"layer3": model.layer3}, "gradcampp") as engine:
            single3 = engine.run(x, fixed(table[:, t : t + 1])).cams["layer3"]
        for name, ref in (("layer4", single.cams["layer4"]), ("layer3", single3)):
            torch.testing.assert_close(multi[name][:, t : t + 1], ref, rtol=1e-4, atol=1e-6 * float(ref.max()))
    assert not torch.allclose(multi["layer4"][:, 0], multi["layer4"][:, 1])


class _NoVmap(torch.autograd.Function):
    """Identity whose backward calls .item(): it works, but vmap cannot batch it (data-dependent Python)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        return t.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad * (1.0 if float(grad.abs().sum().item()) >= 0 else 0.0)


class HeadWithoutBatchingRule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1)
        )
        self.fc = nn.Linear(16, 6)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(_NoVmap.apply(self.features(x)).mean(dim=(2, 3)))


def test_falls_back_to_one_backward_per_slot_when_vmap_cannot_run() -> None:
    model = HeadWithoutBatchingRule().eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    table = torch.tensor([[0, 2, 5]]).expand(3, 3).contiguous()
    with CamEngine(model, {"features": model.features}, "gradcam") as engine:
        first = engine.run(x, fixed(table)).cams["features"]
        assert not engine.batched_backward  # the vmapped try failed; remembered for the next batches
        assert engine.backward_passes == 1 + 3
        second = engine.run(x, fixed(table)).cams["features"]
        assert engine.backward_passes == 1 + 3 + 3
    torch.testing.assert_close(first, second)
    for t in range(3):
        with CamEngine(model, {"features": model.features}, "gradcam") as engine:
            alone = engine.run(x, fixed(table[:, t : t + 1])).cams["features"]
        assert float(alone.max()) > 0
        torch.testing.assert_close(first[:, t : t + 1], alone, rtol=1e-5, atol=1e-6 * float(alone.max()))


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_fuse_layers(model: nn.Module, x_small: Tensor, classes: Tensor, mode: str) -> None:
    """Fused map: each layer's map upsampled to the largest layer (layer3, 8x8 at 128 px), min-max'ed, then mean/max."""
    layers = {"layer3": model.layer3, "layer4": model.layer4}
    ci = classes[:2]
    with CamEngine(model, layers, "gradcam") as engine:
        per_layer = engine.run(x_small, fixed(ci)).cams
    with CamEngine(model, layers, "gradcam", fuse=mode) as engine:
        fused = engine.run(x_small, fixed(ci)).cams
    assert list(fused) == ["fused(layer3+layer4)"]
    got = fused["fused(layer3+layer4)"]
    assert got.shape == (2, 1, 8, 8) and per_layer["layer4"].shape == (2, 1, 4, 4)
    up4 = F.interpolate(per_layer["layer4"], size=(8, 8), mode="bilinear", align_corners=False)
    parts = torch.stack([minmax(per_layer["layer3"]), minmax(up4)])
    want = parts.mean(0) if mode == "mean" else parts.amax(0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, parts[0], atol=1e-3) and not torch.allclose(got, parts[1], atol=1e-3)


def test_module_input_layer_is_what_the_module_receives(model: nn.Module, x_small: Tensor, classes: Tensor) -> None:
    """`avgpool:input` hooks the pooling's input, which is layer4's output: the same maps, both ways."""
    ci = classes[:2]
    with CamEngine(model, {"layer4": model.layer4, "avgpool:input": model.avgpool}, "gradcam") as engine:
        cams = engine.run(x_small, fixed(ci)).cams
    assert float(cams["layer4"].max()) > 0
    torch.testing.assert_close(cams["avgpool:input"], cams["layer4"], rtol=1e-5, atol=1e-6)
    assert hooks_and_swaps(model)[0] == hooks_and_swaps(make_model())[0]


# ------------------------------------------------------------------------------- hooks and swapped ReLUs


def swapped_relus(model: nn.Module) -> list[nn.Module]:
    """The model's ReLU modules whose forward is currently replaced by guided backprop's."""
    return [m for m in model.modules() if "forward" in m.__dict__ and getattr(m, "_gradcam_guided", False)]


def hooks_and_swaps(model: nn.Module) -> tuple[list[tuple[int, int, int, int]], list[str]]:
    hooks = [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
        for m in model.modules()
    ]
    relus = [type(m).__name__ for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    assert not swapped_relus(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    return hooks, relus


@pytest.mark.parametrize("method", method_names())
def test_hooks_and_relus_restored_after_every_method(method: str) -> None:
    model = TinyNet().eval()
    # CAM needs the map that GAP averages, i.e. the pooling's input (the target conv's output after a ReLU)
    layers: dict[str, nn.Module] = {"pool:input": model.pool} if method == "cam" else {"target": model.target}
    before = hooks_and_swaps(model)
    flags = [p.requires_grad for p in model.parameters()]
    seen_swapped: list[int] = []
    probe = model.fc.register_forward_pre_hook(lambda _m, _i: seen_swapped.append(len(swapped_relus(model))))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with CamEngine(model, layers, method) as engine:
        result = engine.run(x, fixed(torch.tensor([[1, 3], [0, 4]])))
    probe.remove()
    assert hooks_and_swaps(model) == before
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    guided = get_spec(method).input_grads
    # during the call every ReLU module (stem's and act) was swapped; outside it none is
    assert seen_swapped and set(seen_swapped) == ({2} if guided else {0})
    for maps in result.cams.values():
        assert maps.shape[:2] == (2, 2) and bool(torch.isfinite(maps).all())
    assert bool(result.guided) == guided


@pytest.mark.parametrize("method", ["guided-backprop", "guided-gradcam", "scorecam", "ablationcam", "gradcam"])
def test_hooks_and_relus_restored_after_an_exception(method: str) -> None:
    """The model raises on its 2nd forward: inside Score-CAM / Ablation-CAM passes, or on the next batch."""
    model = TinyNet(fail_after=1).eval()
    before = hooks_and_swaps(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match="model failed"), CamEngine(model, {"target": model.target}, method) as e:
        e.run(x, fixed(torch.tensor([[1], [0]])))
        e.run(x, fixed(torch.tensor([[1], [0]])))
    assert hooks_and_swaps(model) == before
    assert all(p.requires_grad for p in model.parameters())

    # and when target selection raises in the middle of a guided call (ReLUs swapped at that moment)
    model = TinyNet().eval()

    def bad(_logits: Tensor) -> Tensor:
        raise ValueError("no targets")

    with pytest.raises(ValueError, match="no targets"), CamEngine(model, {"target": model.target}, method) as engine:
        engine.run(x, bad)
    assert hooks_and_swaps(model) == before


def test_option_errors_are_one_line() -> None:
    from gradcam_cli.errors import GradcamError

    model = TinyNet().eval()
    layers: dict[str, nn.Module] = {"target": model.target}
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: CamEngine(model, layers, "eigencam", counterfactual=True), "--counterfactual"),
        (lambda: CamEngine(model, layers, "eigencam", eigen_smooth=True), "--eigen-smooth"),
        (lambda: CamEngine(model, layers, "guided-backprop", eigen_smooth=True), "--eigen-smooth"),
        (lambda: CamEngine(model, layers, "gradcam", fuse="mean"), "two or more --layer"),
        (lambda: CamEngine(model, layers, "guided-backprop", fuse="max"), "does not use target layers"),
        (lambda: CamEngine(model, layers, "scorecam", chunk_size=0), "--chunk-size"),
        (lambda: CamEngine(model, layers, "gradcam++"), "--method"),
    ]
    for make, needle in cases:
        with pytest.raises(GradcamError, match=needle.replace("+", r"\+")) as info:
            make()
        assert "\n" not in str(info.value)


def test_cam_needs_gap_and_fc(model: nn.Module, x: Tensor) -> None:
    """`cam` refuses layers that do not feed GAP + the final Linear directly, naming the way out."""
    from gradcam_cli.errors import GradcamError

    before = hooks_and_swaps(model)
    with pytest.raises(GradcamError, match=r"layer 'layer3' has 256 channels.*gradcam"):
        run(model, x[:1], torch.tensor([[1]]), "cam", layer="layer3")
    with pytest.raises(GradcamError, match=r"layer4.1.bn2' does not feed global average pooling.*:input"):
        run(model, x[:1], torch.tensor([[1]]), "cam", layer="layer4.1.bn2")
    assert hooks_and_swaps(model) == before
    # a module's input: TinyNet's map passes a ReLU module before GAP; `pool:input` is that map, so CAM works
    tiny = TinyNet().eval()
    xs = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(GradcamError, match="does not feed"), CamEngine(tiny, {"target": tiny.target}, "cam") as e:
        e.run(xs, fixed(torch.tensor([[1], [2]])))
    with CamEngine(tiny, {"pool:input": tiny.pool}, "cam") as engine:
        got = engine.run(xs, fixed(torch.tensor([[1], [2]]))).cams["pool:input"][:, 0]
    a = torch.relu(tiny.target(tiny.stem(xs))).detach()
    want = torch.relu(torch.einsum("nk,nkhw->nhw", tiny.fc.weight[[1, 2]], a))
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------ token layouts


class TokenNet(nn.Module):
    """A patch-embedding conv whose output is read twice: as a (B, C, h, w) map (`grid`) and, flattened with a
    class token in front, as a ViT-style token sequence (`tokens`, (B, 1 + h*w, C)); the head averages the
    patch tokens. Both hook points carry the same activations, so every method must give the same maps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.patch_size = 8  # read by layouts.token_hint, as torchvision's ViT
        self.embed = nn.Conv2d(3, 6, 8, stride=8)
        self.grid = nn.Identity()
        self.class_token = nn.Parameter(torch.randn(1, 1, 6))
        self.tokens = nn.Identity()
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        g = self.grid(torch.relu(self.embed(x)))
        t = torch.cat([self.class_token.expand(x.shape[0], -1, -1), g.flatten(2).transpose(1, 2)], dim=1)
        t = self.tokens(t)
        return self.fc(t[:, 1:].mean(dim=1) + 0.1 * t[:, 0])


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "layercam", "eigencam", "ablationcam", "scorecam"])
def test_token_layers_give_the_maps_of_the_grid(method: str) -> None:
    """The token view (patch tokens in row-major order, class token dropped) feeds every method, including
    Ablation-CAM's channel zeroing, which happens in the token layout itself (patch tokens only)."""
    model = TokenNet().eval()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(5))  # 4 x 6 patches
    table = torch.tensor([[1, 3], [0, 4]])
    maps = {}
    for name in ("grid", "tokens"):
        with CamEngine(model, {name: model.get_submodule(name)}, method) as engine:
            maps[name] = engine.run(x, fixed(table)).cams[name]
            assert engine.layouts[name].kind == ("nchw" if name == "grid" else "tokens")
    assert maps["grid"].shape == (2, 2, 4, 6) and float(maps["grid"].max()) > 0
    torch.testing.assert_close(maps["tokens"], maps["grid"], rtol=1e-5, atol=1e-6 * float(maps["grid"].max()))
