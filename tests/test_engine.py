"""Engine hygiene: hooks removed, gradients and requires_grad flags untouched, inplace ops, frozen models,
no autograd before the target layer, and degenerate (all-zero / constant) maps normalising to zeros.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn

from gradcam_cli.cam.engine import CamEngine
from gradcam_cli.cam.methods.gradient import gradcam
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.layers import auto_detect_layer, resolve_layer
from gradcam_cli.render.heatmap import to_uint8, upsample_normalize

GRADCAM = gradcam


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def x() -> Tensor:
    # 160x160 keeps the file fast on CPU; layer4 is then 5x5 and layer3 10x10
    return torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(3))


def pred(logits: Tensor) -> Tensor:
    return logits.argmax(dim=1, keepdim=True)


def fixed(*classes: int):
    def select(logits: Tensor) -> Tensor:
        return torch.tensor(classes, device=logits.device).expand(logits.shape[0], len(classes)).contiguous()

    return select


def hook_counts(model: nn.Module) -> list[tuple[int, int, int, int]]:
    """Per module: forward hooks, forward pre-hooks, backward hooks, full backward pre-hooks."""
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
        for m in model.modules()
    ]


def grad_flags(model: nn.Module) -> list[bool]:
    return [p.requires_grad for p in model.parameters()]


# ----------------------------------------------------------------------------------------------- hooks


def test_hooks_removed_after_normal_exit(x: Tensor) -> None:
    model = resnet18()
    before = hook_counts(model)
    name, layer = resolve_layer(model, "layer4")
    assert name == "layer4"
    with CamEngine(model, {name: layer}, GRADCAM) as engine:
        # while active, exactly the hooked layer has one extra forward hook, and nothing else changed
        during = hook_counts(model)
        assert sum(d[0] - b[0] for d, b in zip(during, before, strict=True)) == 1
        assert len(model.layer4._forward_hooks) == 1
        result = engine.run(x, pred)
        result2 = engine.run(x, pred)  # several batches through one engine add no hooks either
        assert hook_counts(model) == during
    assert hook_counts(model) == before
    assert sum(c[0] for c in hook_counts(model)) == 0
    assert result.cams["layer4"].shape == (2, 1, 5, 5)
    torch.testing.assert_close(result2.cams["layer4"], result.cams["layer4"])
    # the model still runs without the hook machinery afterwards
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.logits)


def test_hooks_removed_when_body_raises(x: Tensor) -> None:
    model = resnet18()
    before_hooks, before_flags = hook_counts(model), grad_flags(model)
    with pytest.raises(RuntimeError, match="boom"), CamEngine(model, {"layer4": model.layer4}, GRADCAM) as engine:
        engine.run(x[:1], pred)
        assert not any(grad_flags(model))
        raise RuntimeError("boom")
    assert hook_counts(model) == before_hooks
    assert grad_flags(model) == before_flags


def test_hooks_removed_when_select_targets_raises(x: Tensor) -> None:
    model = resnet18()
    before_hooks, before_flags = hook_counts(model), grad_flags(model)

    def bad_select(logits: Tensor) -> Tensor:
        raise ValueError("no targets")

    with pytest.raises(ValueError, match="no targets"), CamEngine(model, {"layer4": model.layer4}, GRADCAM) as engine:
        engine.run(x[:1], bad_select)
    assert hook_counts(model) == before_hooks
    assert grad_flags(model) == before_flags
    assert engine._acts == {}


def test_non_spatial_layer_raises_gradcam_error_and_cleans_up(x: Tensor) -> None:
    model = resnet18()
    before_hooks, before_flags = hook_counts(model), grad_flags(model)
    with (
        pytest.raises(GradcamError, match=r"layer 'fc' outputs \(1, 1000\)"),
        CamEngine(model, {"fc": model.fc}, GRADCAM) as engine,
    ):
        engine.run(x[:1], pred)
    assert hook_counts(model) == before_hooks
    assert grad_flags(model) == before_flags
    assert all(p.grad is None for p in model.parameters())
    # the engine is reusable on the same model afterwards, on a valid layer
    with CamEngine(model, {"layer4": model.layer4}, GRADCAM) as engine:
        assert engine.run(x[:1], pred).cams["layer4"].shape == (1, 1, 5, 5)
    assert hook_counts(model) == before_hooks


def test_hooks_removed_with_two_layers(x: Tensor) -> None:
    """Two hooked layers: two hooks while active, none after (the maps themselves: test_two_layers_in_one_run)."""
    model = resnet18()
    before = hook_counts(model)
    with CamEngine(model, {"layer3": model.layer3, "layer4": model.layer4}, GRADCAM):
        during = hook_counts(model)
        assert sum(d[0] - b[0] for d, b in zip(during, before, strict=True)) == 2
        assert len(model.layer3._forward_hooks) == 1 and len(model.layer4._forward_hooks) == 1
    assert hook_counts(model) == before


@pytest.mark.parametrize(
    ("first", "second"),
    [("layer3", "layer4"), ("layer4.1", "layer4"), ("layer2", "layer4.0.conv1")],
    ids=["sequential", "nested", "sequential-deep"],
)
def test_two_layers_in_one_run(x: Tensor, first: str, second: str) -> None:
    """`--layer` is repeatable: explaining two layers in one run gives each layer's single-layer CAM.

    sequential / nested: the later layer lies wholly downstream of the earlier one. sequential-deep: layer2 reaches
    the logits both through layer4.0.conv1 and around it (layer4.0's downsample shortcut), so a graph cut at
    layer4.0.conv1 would not raise but silently drop part of layer2's gradient.
    """
    model = resnet18()
    layers = {first: model.get_submodule(first), second: model.get_submodule(second)}
    with CamEngine(model, layers, GRADCAM) as engine:
        both = engine.run(x, fixed(189, 7)).cams
    for name in (first, second):
        with CamEngine(model, {name: layers[name]}, GRADCAM) as engine:
            alone = engine.run(x, fixed(189, 7)).cams[name]
        assert float(alone.max()) > 0
        torch.testing.assert_close(both[name], alone, rtol=1e-5, atol=1e-6 * float(alone.max()))
    assert all(p.grad is None for p in model.parameters())
    assert all(grad_flags(model))


def test_close_is_idempotent(x: Tensor) -> None:
    model = resnet18()
    before = hook_counts(model)
    engine = CamEngine(model, {"layer4": model.layer4}, GRADCAM)
    engine.__enter__()
    assert hook_counts(model) != before
    engine.close()
    engine.close()
    engine.__exit__(None, None, None)
    assert hook_counts(model) == before
    assert all(grad_flags(model))


# ------------------------------------------------------------------------------------- grads and flags


def test_no_param_grad_and_flags_restored_with_partially_frozen_model(x: Tensor) -> None:
    model = resnet18()
    for p in [*model.conv1.parameters(), *model.bn1.parameters(), *model.layer1.parameters()]:
        p.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    flags = grad_flags(model)
    assert any(flags) and not all(flags)
    with CamEngine(model, {"layer4": model.layer4}, GRADCAM) as engine:
        result = engine.run(x, fixed(1, 2))
        assert not any(grad_flags(model)), "parameters must not require grad during the run"
    assert grad_flags(model) == flags
    assert not model.conv1.weight.requires_grad and not model.fc.bias.requires_grad
    assert model.layer4[1].conv2.weight.requires_grad and model.fc.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert result.cams["layer4"].shape == (2, 2, 5, 5)
    assert bool(torch.isfinite(result.cams["layer4"]).all())


def test_no_param_grad_on_trainable_model(x: Tensor) -> None:
    model = resnet18()
    assert all(grad_flags(model))
    with CamEngine(model, {"layer4": model.layer4}, GRADCAM) as engine:
        engine.run(x, fixed(3, 4, 5))
    assert all(p.grad is None for p in model.parameters())
    assert all(grad_flags(model))


def test_fully_frozen_model_works_and_matches_trainable(x: Tensor) -> None:
    trainable = resnet18()
    frozen = resnet18().requires_grad_(False)
    with CamEngine(frozen, {"layer4": frozen.layer4}, GRADCAM) as engine:
        got = engine.run(x, fixed(7, 9)).cams["layer4"]
    assert not any(grad_flags(frozen))
    assert all(p.grad is None for p in frozen.parameters())
    with CamEngine(trainable, {"layer4": trainable.layer4}, GRADCAM) as engine:
        want = engine.run(x, fixed(7, 9)).cams["layer4"]
    assert float(want.max()) > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.max()))


def test_works_under_no_grad_and_inference_callers(x: Tensor) -> None:
    """Callers often wrap inference in no_grad; the engine enables grad itself."""
    model = resnet18()
    with CamEngine(model, {"layer4": model.layer4}, GRADCAM) as engine:
        want = engine.run(x[:1], fixed(11)).cams["layer4"]
        with torch.no_grad():
            got = engine.run(x[:1], fixed(11)).cams["layer4"]
    torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------- inplace ops


class InplaceNet(nn.Module):
    """conv -> ReLU -> target conv -> inplace ReLU -> conv -> pool -> fc."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.target = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.post = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)
        self.functional = functional

    def head(self, a: Tensor, inplace: bool) -> Tensor:
        if not inplace:
            a = torch.relu(a)
        elif self.functional:
            a = torch.relu_(a)
        else:
            a = self.act(a)
        a = torch.relu(self.post(a))
        return self.fc(a.mean(dim=(2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.target(torch.relu(self.stem(x))), inplace=True)


@pytest.mark.parametrize("functional", [True, False], ids=["torch.relu_", "nn.ReLU(inplace=True)"])
def test_inplace_relu_after_target_layer(functional: bool) -> None:
    torch.manual_seed(5)
    model = InplaceNet(functional).eval()
    x = torch.randn(3, 3, 32, 32)
    classes = torch.tensor([[0, 3], [1, 4], [2, 0]])
    with CamEngine(model, {"target": model.target}, GRADCAM) as engine:
        cams = engine.run(x, lambda logits: classes).cams["target"]
    assert cams.shape == (3, 2, 8, 8)
    assert bool(torch.isfinite(cams).all())

    # independent reference: same weights, non-inplace head, autograd w.r.t. the target conv's (pre-ReLU) output
    a = model.target(torch.relu(model.stem(x))).detach().requires_grad_(True)
    logits = model.head(a, inplace=False)
    assert float(a.detach().min()) < 0, "the activations must have negatives, or the inplace ReLU would be invisible"
    refs = []
    for t in range(2):
        (g,) = torch.autograd.grad(logits.gather(1, classes[:, t : t + 1]).sum(), a, retain_graph=True)
        refs.append(torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1)).detach())
    ref = torch.stack(refs, dim=1)
    assert float(ref.max()) > 0
    torch.testing.assert_close(cams, ref, rtol=1e-5, atol=1e-6 * float(ref.max()))

    # what a buggy engine that kept the ReLU'd (in-place modified) activations would give is clearly different
    wrong = []
    for t in range(2):
        (g,) = torch.autograd.grad(logits.gather(1, classes[:, t : t + 1]).sum(), a, retain_graph=True)
        wrong.append(torch.relu((g.mean(dim=(2, 3), keepdim=True) * a.clamp(min=0)).sum(1)).detach())
    assert float((torch.stack(wrong, dim=1) - cams).abs().max()) > 1e-3 * float(ref.max())
    assert all(p.grad is None for p in model.parameters())


def test_inplace_relu_inside_resnet_block(x: Tensor) -> None:
    """Hooking layer4.1.bn2 of resnet18: the block then adds the identity in place (`out += identity`) and ReLUs."""
    model = resnet18()
    name, layer = resolve_layer(model, "layer4[-1].bn2")
    assert name == "layer4.1.bn2"
    with CamEngine(model, {name: layer}, GRADCAM) as engine:
        cams = engine.run(x, fixed(189)).cams[name]
    # reference: autograd through the full model (params included), gradient wrt bn2's output, which we make a
    # leaf and pass on as a fresh tensor so the block's in-place `+=` cannot modify it
    captured: list[Tensor] = []

    def swap(_m: nn.Module, _i: object, out: Tensor) -> Tensor:
        leaf = out.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf * 1.0

    handle = layer.register_forward_hook(swap)
    try:
        logits = model(x)
    finally:
        handle.remove()
    acts = captured[-1]
    (g,) = torch.autograd.grad(logits[:, 189].sum(), acts)
    ref = torch.relu((g.mean(dim=(2, 3), keepdim=True) * acts).sum(1)).detach()[:, None]
    model.zero_grad(set_to_none=True)
    assert float(acts.detach().min()) < 0 and float(ref.max()) > 0
    torch.testing.assert_close(cams, ref, rtol=1e-5, atol=1e-6 * float(ref.max()))


# ------------------------------------------------------------------------- no autograd before the layer


def test_autograd_records_nothing_before_target_layer(x: Tensor) -> None:
    model = resnet18()
    seen: dict[str, tuple[bool, bool]] = {}

    def record(name: str):
        def hook(_m: nn.Module, _inputs: object, out: Tensor) -> None:
            seen[name] = (out.grad_fn is not None, out.requires_grad)

        return hook

    def record_input(name: str):
        def hook(_m: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            seen[name] = (inputs[0].grad_fn is not None, inputs[0].requires_grad)

        return hook

    handles = [
        model.conv1.register_forward_hook(record("conv1")),
        model.layer1.register_forward_hook(record("layer1")),
        model.layer3.register_forward_hook(record("layer3")),
        model.layer4.register_forward_pre_hook(record_input("layer4 input")),
        model.layer4[1].conv2.register_forward_hook(record("layer4.1.conv2")),
        model.fc.register_forward_pre_hook(record_input("fc input")),
    ]
    try:
        with CamEngine(model, {"layer4": model.layer4}, GRADCAM) as engine:
            engine.run(x, pred)
    finally:
        for h in handles:
            h.remove()
    for name in ("conv1", "layer1", "layer3", "layer4 input", "layer4.1.conv2"):
        assert seen[name] == (False, False), f"{name} was recorded by autograd: {seen[name]}"
    # positive control: after the hooked layer, the head is differentiated
    assert seen["fc input"] == (True, True)


def test_backward_runs_through_the_head_only(x: Tensor) -> None:
    """Only modules after the target layer see gradients: count full backward hooks that fire."""
    model = resnet18()
    fired: list[str] = []
    handles = [
        m.register_full_backward_hook(lambda _m, _gi, _go, n=n: fired.append(n) or None)
        for n, m in model.named_modules()
        if n in ("conv1", "layer1", "layer3", "layer4.0.conv1", "avgpool", "fc")
    ]
    try:
        with CamEngine(model, {"layer4": model.layer4}, GRADCAM) as engine:
            engine.run(x[:1], fixed(1, 2))
    finally:
        for h in handles:
            h.remove()
    assert sorted(set(fired)) == ["avgpool", "fc"]
    # both target slots in ONE (vmapped) backward: the head's backward hooks fire once, not once per slot
    assert fired.count("fc") == 1
    assert engine.backward_passes == 1 and engine.batched_backward


# --------------------------------------------------------------------------- degenerate maps -> zeros

SIZES_AND_BOXES = [
    ((224, 224), (0, 0, 224, 224)),
    ((225, 300), (0, 0, 300, 225)),
    ((480, 640), (0, 0, 640, 480)),
    ((100, 37), (0, 0, 37, 100)),
    ((224, 224), (10, 20, 200, 210)),
    ((300, 400), (-3.4, 5.6, 410.2, 290.7)),
]


@pytest.mark.parametrize("hw", [(7, 7), (14, 14), (5, 9)])
@pytest.mark.parametrize(("size", "box"), SIZES_AND_BOXES)
def test_all_zero_map_normalises_to_zeros(hw: tuple[int, int], size: tuple[int, int], box: tuple) -> None:
    out = upsample_normalize(torch.zeros(hw), size, box)
    assert out.shape == size
    assert bool(torch.isfinite(out).all())
    assert float(out.abs().max()) == 0.0
    assert int(to_uint8(out).max()) == 0


@pytest.mark.parametrize("value", [1e-3, 0.1, 1 / 3, 7.7, 123.456])
@pytest.mark.parametrize("hw", [(7, 7), (14, 14), (5, 9)])
@pytest.mark.parametrize(("size", "box"), SIZES_AND_BOXES)
def test_constant_map_normalises_to_zeros(value: float, hw: tuple[int, int], size: tuple[int, int], box: tuple) -> None:
    out = upsample_normalize(torch.full(hw, value), size, box)
    assert out.shape == size
    assert bool(torch.isfinite(out).all())
    assert float(out.abs().max()) == 0.0, (
        f"constant {value} map {hw} -> {size} box {box}: {float((out > 0).float().mean()):.1%} of pixels non-zero"
    )


def test_nonconstant_map_still_spans_zero_to_one() -> None:
    """Control for the two tests above: a map with real range normalises to exactly [0, 1]."""
    cam = torch.zeros(7, 7)
    cam[3, 4] = 2.5
    cam[0, 0] = 1.0
    for size, box in SIZES_AND_BOXES:
        out = upsample_normalize(cam, size, box)
        assert float(out.min()) == 0.0 and float(out.max()) == 1.0, (size, box)


def test_zeroed_class_row_gives_zero_cam_and_zero_heatmap(x: Tensor) -> None:
    """A class whose fc weights are all zero has zero gradients: the CAM is all zero, never NaN, and renders to 0."""
    model = resnet18()
    with torch.no_grad():
        model.fc.weight[42].zero_()
        model.fc.bias[42] = 5.0
    with CamEngine(model, {"layer4": model.layer4}, GRADCAM) as engine:
        result = engine.run(x, fixed(42, 7))
    cams = result.cams["layer4"]
    assert bool(torch.isfinite(cams).all())
    assert float(cams[:, 0].abs().max()) == 0.0
    assert float(cams[:, 1].max()) > 0  # control: another class has signal
    for b in range(x.shape[0]):
        norm = upsample_normalize(cams[b, 0], (160, 160), (0, 0, 160, 160))
        assert bool(torch.isfinite(norm).all())
        assert float(norm.abs().max()) == 0.0
        assert int(to_uint8(norm).max()) == 0


def test_negative_only_cam_relus_to_zero_and_normalises_to_zeros() -> None:
    """If every position has a negative weighted sum, ReLU leaves zeros and the heatmap is zeros, not NaN."""
    acts = torch.rand(2, 4, 7, 7) + 0.1
    grads = -torch.rand(2, 4, 7, 7) - 0.1
    cam = GRADCAM(acts, grads)
    assert float(cam.abs().max()) == 0.0
    out = upsample_normalize(cam[0], (480, 640), (0, 0, 640, 480))
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) == 0.0


# ------------------------------------------------------------------------------------- layer helpers


def test_auto_detected_layer_is_layer4_and_runs(x: Tensor) -> None:
    model = resnet18()
    before = hook_counts(model)
    name = auto_detect_layer(model, (224, 224))
    assert name == "layer4"
    assert hook_counts(model) == before
    _, layer = resolve_layer(model, name)
    assert layer is model.layer4
