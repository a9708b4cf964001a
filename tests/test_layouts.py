"""Token and channels-last activations -> (B, C, h, w): layout inference and the reshape itself.

The reshape is checked against hand-built activations whose features spell out their own position (token i
of the patch sequence carries (i // w, i % w)), at two input sizes, with and without a class token, with the
model's patch size given and inferred; then on real torchvision ViT and Swin models (random weights) against
a Grad-CAM computed here by placing each token at row i // w, column i % w one by one.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn

from gradcam_cli.cam.engine import CamEngine
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.layers import auto_detect_layer, inspect_layers
from gradcam_cli.model.layouts import Layout, TokenHint, infer_layout, plausible_grid, token_hint

PATCH = 16
pytestmark = pytest.mark.usefixtures("one_thread")


def random_vit(image_size: int) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=image_size).eval()
    nn.init.normal_(model.heads.head.weight, std=0.01)  # torchvision zero-initialises the head
    return model


@pytest.fixture(scope="module")
def vits() -> dict[int, nn.Module]:
    """vit_b_16 built for 64 px (4x4 patches) and 96 px (6x6), random weights."""
    return {size: random_vit(size) for size in (64, 96)}


@pytest.fixture(scope="module")
def swin() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.swin_t(weights=None).eval()


def token_sequence(batch: int, grid: tuple[int, int], prefix: int, channels: int = 5) -> Tensor:
    """(B, prefix + h*w, C): patch token i holds (i // w, i % w, b, 1, i); prefix tokens hold -1 everywhere."""
    h, w = grid
    tokens = torch.full((batch, prefix + h * w, channels), -1.0)
    for b in range(batch):
        for i in range(h * w):
            tokens[b, prefix + i] = torch.tensor([i // w, i % w, b, 1.0, i])
    return tokens


def assert_positions(view: Tensor, grid: tuple[int, int]) -> None:
    """view[b, :, r, c] must be (r, c, b, 1, r * w + c): every patch at its own place, no prefix token left."""
    h, w = grid
    assert view.shape[2:] == (h, w)
    for b in range(view.shape[0]):
        for r in range(h):
            for c in range(w):
                assert view[b, :, r, c].tolist() == [r, c, b, 1.0, r * w + c]
    assert not (view == -1).any()


@pytest.mark.parametrize("input_hw", [(224, 224), (96, 160)])
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("patch_known", [True, False])
def test_token_grid_matches_hand_built_positions(input_hw: tuple[int, int], prefix: int, patch_known: bool) -> None:
    grid = (input_hw[0] // PATCH, input_hw[1] // PATCH)  # 14x14 and 6x10: nothing hard-coded
    tokens = token_sequence(2, grid, prefix)
    hint = TokenHint(patch=(PATCH, PATCH), prefix=prefix) if patch_known else TokenHint()
    layout = infer_layout(tuple(tokens.shape), input_hw, hint)
    assert layout == Layout("tokens", grid, prefix)
    view = layout.to_nchw(tokens)
    assert view.shape == (2, 5, *grid)
    assert_positions(view, grid)


def test_token_grid_follows_the_patch_size_not_a_fixed_14x14() -> None:
    for size, patch in ((224, 32), (518, 14), (384, 16), (64, 16)):
        n = 1 + (size // patch) ** 2
        layout = infer_layout((1, n, 8), (size, size), TokenHint(patch=(patch, patch), prefix=1))
        assert layout == Layout("tokens", (size // patch, size // patch), 1)


def test_prefix_tokens_beyond_the_class_token() -> None:
    # DeiT's distillation token, timm's register tokens: the model's count decides, else it is inferred
    grid = (6, 10)
    tokens = token_sequence(1, grid, prefix=5)
    assert infer_layout(tuple(tokens.shape), (96, 160), TokenHint((16, 16), 5)) == Layout("tokens", grid, 5)
    assert infer_layout(tuple(tokens.shape), (96, 160), TokenHint((16, 16), None)) == Layout("tokens", grid, 5)
    assert_positions(Layout("tokens", grid, 5).to_nchw(tokens), grid)


@pytest.mark.parametrize("input_hw", [(224, 224), (64, 96)])
def test_channels_last_map_matches_hand_built_positions(input_hw: tuple[int, int]) -> None:
    h, w = input_hw[0] // 32, input_hw[1] // 32
    nhwc = torch.empty(2, h, w, 96)
    for r in range(h):
        for c in range(w):
            nhwc[:, r, c, :] = r * 100 + c
    layout = infer_layout(tuple(nhwc.shape), input_hw)
    assert layout == Layout("nhwc", (h, w))
    view = layout.to_nchw(nhwc)
    assert view.shape == (2, 96, h, w)
    for r in range(h):
        for c in range(w):
            assert (view[:, :, r, c] == r * 100 + c).all()


@pytest.mark.parametrize(
    ("shape", "input_hw", "expected"),
    [
        ((1, 512, 7, 7), (224, 224), Layout("nchw", (7, 7))),
        ((1, 2048, 8, 8), (299, 299), Layout("nchw", (8, 8))),
        ((1, 64, 147, 147), (299, 299), Layout("nchw", (147, 147))),
        ((1, 2048, 10, 7), (300, 200), Layout("nchw", (10, 7))),
        ((1, 7, 7, 768), (224, 224), Layout("nhwc", (7, 7))),
        ((1, 56, 56, 96), (224, 224), Layout("nhwc", (56, 56))),
        ((1, 197, 768), (224, 224), Layout("tokens", (14, 14), 1)),
        ((1, 196, 768), (224, 224), Layout("tokens", (14, 14), 0)),
        ((1, 50, 768), (224, 224), Layout("tokens", (7, 7), 1)),
        # MaxViT's window partitions (B, windows, pixels per window, C) are not a map of the image
        ((1, 64, 49, 64), (224, 224), None),
        ((1, 1000), (224, 224), None),
        ((1, 768, 1000), (224, 224), None),
    ],
)
def test_infer_layout(shape: tuple[int, ...], input_hw: tuple[int, int], expected: Layout | None) -> None:
    assert infer_layout(shape, input_hw) == expected


def test_lenient_inference_keeps_every_4d_map_the_engine_accepted() -> None:
    # an adaptive pool's 7x7 of a 64x32 input is no stride of it; an explicitly chosen layer still works
    assert infer_layout((1, 512, 7, 7), (64, 32)) is None
    assert infer_layout((1, 512, 7, 7), (64, 32), strict=False) == Layout("nchw", (7, 7))


def test_plausible_grid_tolerates_padding_and_rounding() -> None:
    assert plausible_grid(8, 8, (299, 299))
    assert plausible_grid(10, 7, (300, 200))  # 300/32 = 9.4, 200/32 = 6.25
    assert not plausible_grid(7, 768, (224, 224))
    assert not plausible_grid(49, 64, (224, 224))


def test_token_count_mismatch_is_a_clear_error() -> None:
    with pytest.raises(GradcamError, match="do not fit the 4x4 grid"):
        Layout("tokens", (4, 4), 1).to_nchw(torch.zeros(1, 26, 8))


def test_token_hint_reads_torchvision_and_timm_attributes(vits: dict[int, nn.Module]) -> None:
    assert token_hint(vits[64]) == TokenHint((16, 16), 1)

    class TimmLike(nn.Module):
        num_prefix_tokens = 5

        def __init__(self) -> None:
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.patch_size = (14, 14)  # type: ignore[assignment]

    assert token_hint(TimmLike()) == TokenHint((14, 14), 5)
    assert token_hint(torchvision.models.resnet18(weights=None)) == TokenHint(None, None)


# --- real transformers ----------------------------------------------------------------------------------------


def by_hand_gradcam(model: nn.Module, layer: nn.Module, x: Tensor, prefix: int, grid: tuple[int, int]) -> Tensor:
    """Grad-CAM of the top class with token i of the layer's output placed at (i // w, i % w), one token at a time."""
    kept: list[Tensor] = []

    def hook(module: nn.Module, inputs: object, output: Tensor) -> None:
        output.retain_grad()
        kept.append(output)

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    finally:
        handle.remove()
    (tokens,) = kept
    assert tokens.grad is not None
    h, w = grid
    acts = torch.zeros(x.shape[0], tokens.shape[2], h, w)
    grads = torch.zeros_like(acts)
    for i in range(h * w):
        acts[:, :, i // w, i % w] = tokens[:, prefix + i].detach()
        grads[:, :, i // w, i % w] = tokens.grad[:, prefix + i]
    return torch.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(1))


def engine_cam(model: nn.Module, name: str, x: Tensor) -> tuple[Tensor, Layout]:
    with CamEngine(model, {name: model.get_submodule(name)}, "gradcam") as engine:
        result = engine.run(x, lambda logits: logits.argmax(1, keepdim=True))
        return result.cams[name][:, 0], engine.layouts[name]


@pytest.mark.parametrize(("image_size", "grid"), [(64, (4, 4)), (96, (6, 6))])
def test_vit_engine_matches_token_by_token_gradcam(
    vits: dict[int, nn.Module], image_size: int, grid: tuple[int, int]
) -> None:
    model = vits[image_size]
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    name = "encoder.layers.encoder_layer_11.ln_1"
    ours, layout = engine_cam(model, name, x)
    assert layout == Layout("tokens", grid, 1)
    ref = by_hand_gradcam(model, model.get_submodule(name), x, prefix=1, grid=grid)
    print(f"vit_b_16 @ {image_size}: max |ours - by hand| = {float((ours - ref).abs().max()):.2e}")
    assert ours.shape == (2, *grid)
    assert float(ref.max()) > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("image_size", [64, 96])
def test_vit_auto_detection_picks_the_last_block_whose_patches_reach_the_class_token(
    vits: dict[int, nn.Module], image_size: int
) -> None:
    model = vits[image_size]
    infos = {i.name: i for i in inspect_layers(model, (image_size, image_size))[0]}
    last = "encoder.layers.encoder_layer_11"
    # the last block's output and everything after it are token grids, but only the class token reaches the head
    assert infos[last].spatial and infos["encoder"].spatial
    assert infos[last].layout == Layout("tokens", (image_size // 16, image_size // 16), 1)
    assert auto_detect_layer(model, (image_size, image_size)) == f"{last}.ln_1"


@pytest.mark.parametrize("size", [64, 96])
def test_swin_channels_last_norm_equals_its_channels_first_permute(swin: nn.Module, size: int) -> None:
    model = swin
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    at_norm, layout = engine_cam(model, "norm", x)  # (B, h, w, C)
    at_permute, plain = engine_cam(model, "permute", x)  # the model's own (B, C, h, w) transpose of it
    assert layout == Layout("nhwc", (size // 32, size // 32))
    assert plain.kind == "nchw"
    assert float(at_permute.max()) > 0
    torch.testing.assert_close(at_norm, at_permute, rtol=1e-5, atol=1e-7)


def test_swin_intermediate_stage_by_hand(swin: nn.Module) -> None:
    model = swin
    x = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    name = "features.5"  # stage 3, (B, 8, 8, 384) at 128 px
    ours, layout = engine_cam(model, name, x)
    assert layout == Layout("nhwc", (8, 8))
    kept: list[Tensor] = []

    def hook(module: nn.Module, inputs: object, output: Tensor) -> None:
        output.retain_grad()
        kept.append(output)

    handle = model.features[5].register_forward_hook(hook)
    logits = model(x)
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    handle.remove()
    a, g = kept[0].detach(), kept[0].grad
    assert g is not None
    ref = torch.zeros(1, 8, 8)
    weights = g.mean(dim=(1, 2))  # (B, C): mean over the positions of a channels-last map
    for r in range(8):
        for c in range(8):
            ref[:, r, c] = (weights * a[:, r, c, :]).sum(-1)
    torch.testing.assert_close(ours, torch.relu(ref), rtol=1e-4, atol=1e-6)
