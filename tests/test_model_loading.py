"""Models beyond a plain torchvision name: factories, fine-tuned heads, fixed-size transformers, refusals.

Factories are written into a temporary module (no network, no timm needed): a small CNN, a ViT that carries
timm's attributes (`patch_embed.patch_size`, `num_prefix_tokens`, `pretrained_cfg`), a channels-last
network, and a model that returns (logits, aux) like Inception in training mode. A real timm model is tried
too when timm is installed.
"""

from __future__ import annotations

import csv
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

from gradcam_cli import load_settings
from gradcam_cli.cli import main
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.loading import _input_spec, load_model
from gradcam_cli.run.explain import explain

pytestmark = pytest.mark.usefixtures("one_thread")

FACTORIES = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        def __init__(self, num_classes=10, width=8):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, stride=4, padding=1), nn.ReLU()
            )
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))


    def build(num_classes=10, width=8):
        torch.manual_seed(0)
        return TinyNet(num_classes, width)


    class PatchEmbed(nn.Module):
        def __init__(self, patch, dim):
            super().__init__()
            self.patch_size = (patch, patch)
            self.proj = nn.Conv2d(3, dim, patch, stride=patch)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)


    class TimmLikeViT(nn.Module):
        """timm's attribute names; patches are tokens 1.. in row-major order after the prefix tokens."""

        def __init__(self, img_size=48, patch=8, dim=32, depth=2, num_classes=5, registers=0):
            super().__init__()
            torch.manual_seed(0)
            self.patch_embed = PatchEmbed(patch, dim)
            self.num_prefix_tokens = 1 + registers
            self.prefix = nn.Parameter(torch.randn(1, 1 + registers, dim) * 0.02)
            self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2, dim) * 0.02)
            self.blocks = nn.Sequential(
                *[
                    nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
                    for _ in range(depth)
                ]
            )
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, num_classes)
            self.pretrained_cfg = {
                "input_size": (3, img_size, img_size), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9
            }

        def forward(self, x):
            tokens = self.patch_embed(x) + self.pos_embed
            tokens = torch.cat([self.prefix.expand(x.shape[0], -1, -1), tokens], dim=1)
            return self.head(self.norm(self.blocks(tokens))[:, 0])


    def vit(**kwargs):
        return TimmLikeViT(**kwargs)


    class ChannelsLast(nn.Module):
        """A stem to (B, h, w, C) and a channels-last stage, as Swin and ConvNeXt blocks compute."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Conv2d(3, 24, 8, stride=8)
            self.stage = nn.Sequential(nn.LayerNorm(24), nn.Linear(24, 24), nn.GELU())
            self.head = nn.Linear(24, 4)

        def forward(self, x):
            x = self.stage(self.stem(x).permute(0, 2, 3, 1))
            return self.head(x.mean((1, 2)))


    def channels_last():
        return ChannelsLast()


    class WithAux(TinyNet):
        def forward(self, x):
            logits = super().forward(x)
            return logits, logits.detach() * 0.5


    def with_aux():
        torch.manual_seed(0)
        return WithAux(6)


    def not_a_module():
        return 42


    NOT_CALLABLE = 3
    '''
)


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of an importable module holding the factories above."""
    folder = tmp_path / "factory_pkg"
    folder.mkdir()
    (folder / "gradcam_test_factories.py").write_text(FACTORIES, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    return "gradcam_test_factories"


def run(photos: Path, out: Path, **settings: Any) -> tuple[list[dict[str, str]], list[str]]:
    messages: list[str] = []
    summary = explain(
        [photos], out, load_settings(None, workers=0, save="heatmap,npy", **settings), log=messages.append
    )
    assert summary.errors == 0
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh)), messages


def npy_maps(out: Path) -> list[np.ndarray]:
    return [np.load(p) for p in sorted((out / "npy").rglob("*.npy"))]


# --- factories ----------------------------------------------------------------------------------------------------


def test_factory_with_model_kwargs_num_classes_and_labels(factories: str, photos: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.json"
    labels.write_text('["cat", "dog", "cup"]', encoding="utf-8")
    rows, _ = run(
        photos,
        tmp_path / "out",
        model=f"{factories}:build",
        model_kwargs={"width": 6},
        num_classes=3,
        labels=str(labels),
    )
    loaded = load_model(load_settings(None, model=f"{factories}:build", model_kwargs={"width": 6}, num_classes=3))
    assert loaded.model.head.out_features == 3 and loaded.model.head.in_features == 6
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert {r["pred_label"] for r in rows} <= {"cat", "dog", "cup"}
    assert all(r["layer"] == "features" for r in rows)


def test_timm_like_vit_factory_reshapes_tokens_automatically(factories: str, photos: Path, tmp_path: Path) -> None:
    rows, messages = run(photos, tmp_path / "out", model=f"{factories}:vit")
    # the head reads token 0 after the last block: the last block's norm1 is where patches still reach it
    assert {r["layer"] for r in rows} == {"blocks.1.norm1"}
    assert any("tokens as a 6x6 grid, first 1 token (class/prefix) dropped" in m for m in messages), messages
    maps = npy_maps(tmp_path / "out")
    assert [m.shape for m in maps] == [(6, 6), (6, 6)]  # 48 px (from pretrained_cfg) / 8 px patches
    assert all(np.isfinite(m).all() and m.max() > m.min() for m in maps)


def test_register_tokens_are_dropped_too(factories: str, photos: Path, tmp_path: Path) -> None:
    _, messages = run(photos, tmp_path / "out", model=f"{factories}:vit", model_kwargs={"registers": 4, "img_size": 64})
    assert any("8x8 grid, first 5 tokens" in m for m in messages), messages
    assert [m.shape for m in npy_maps(tmp_path / "out")] == [(8, 8), (8, 8)]


def test_factory_preprocessing_comes_from_pretrained_cfg(factories: str) -> None:
    spec = load_model(load_settings(None, model=f"{factories}:vit")).spec
    assert spec.size == (48, 48) and spec.resize_size == 53  # crop_pct 0.9
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    spec = load_model(load_settings(None, model=f"{factories}:vit", input_size=96, mean=[0, 0, 0])).spec
    assert spec.size == (96, 96) and spec.mean == (0.0, 0.0, 0.0) and spec.std == (0.5, 0.5, 0.5)
    assert load_model(load_settings(None, model=f"{factories}:build")).spec.size == (224, 224)


def test_channels_last_factory(factories: str, photos: Path, tmp_path: Path) -> None:
    rows, messages = run(photos, tmp_path / "out", model=f"{factories}:channels_last", input_size=64)
    assert {r["layer"] for r in rows} == {"stage"}
    assert any("channels-last 8x8 map" in m for m in messages), messages
    assert [m.shape for m in npy_maps(tmp_path / "out")] == [(8, 8), (8, 8)]


def test_model_returning_aux_outputs(factories: str, photos: Path, tmp_path: Path) -> None:
    rows, _ = run(photos, tmp_path / "out", model=f"{factories}:with_aux", input_size=32)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(0 <= int(r["pred_index"]) < 6 for r in rows)


@pytest.mark.parametrize(
    ("model", "extra", "expected"),
    [
        ("{m}:not_a_module", {}, "the factory returned int, not a torch nn.Module"),
        ("{m}:NOT_CALLABLE", {}, "'NOT_CALLABLE' is not callable"),
        ("{m}:missing", {}, "has no attribute 'missing'"),
        ("no_such_module_xyz:build", {}, "cannot import module 'no_such_module_xyz'"),
        ("{m}:build", {"model_kwargs": {"depth": 3}}, "unexpected keyword argument 'depth'"),
        ("{m}:channels_last", {"num_classes": 3}, "unexpected keyword argument 'num_classes'"),
        ("{m}:build", {"num_classes": 3, "model_kwargs": {"num_classes": 4}}, "keep one"),
    ],
)
def test_factory_errors_are_one_line(factories: str, model: str, extra: dict[str, Any], expected: str) -> None:
    with pytest.raises(GradcamError) as exc:
        load_model(load_settings(None, model=model.format(m=factories), **extra))
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_timm_model_when_installed(photos: Path, tmp_path: Path) -> None:
    pytest.importorskip("timm", reason="timm is optional; the factory mechanism is tested above without it")
    rows, _ = run(
        photos,
        tmp_path / "out",
        model="timm:create_model",
        model_kwargs={"model_name": "vit_tiny_patch16_224", "pretrained": False, "img_size": 64},
    )
    assert {r["status"] for r in rows} == {"ok"}
    assert [m.shape for m in npy_maps(tmp_path / "out")] == [(4, 4), (4, 4)]


# --- torchvision specifics ------------------------------------------------------------------------------------


def test_num_classes_for_a_torchvision_model(tmp_path: Path) -> None:
    loaded = load_model(load_settings(None, model="resnet18", weights="none", num_classes=7))
    assert loaded.model.fc.out_features == 7
    assert loaded.labels == []  # not ImageNet any more: classes are shown by index


def test_num_classes_against_pretrained_weights_fails_before_any_download() -> None:
    with pytest.raises(GradcamError, match=r"IMAGENET1K_V1 has 1000 classes, not 7; for a fine-tuned model"):
        load_model(load_settings(None, model="resnet18", weights="IMAGENET1K_V1", num_classes=7))


def test_labels_that_do_not_fit_num_classes(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(GradcamError, match=r"has 2 names but the model has 7 classes"):
        load_model(load_settings(None, model="resnet18", weights="none", num_classes=7, labels=str(labels)))
    loaded = load_model(load_settings(None, model="resnet18", weights="none", labels=str(labels)))
    assert loaded.labels == ["a", "b"]
    assert any("has 2 names but the model has 1000 classes" in n for n in loaded.notes)


def test_vit_with_random_weights_is_built_for_the_input_size() -> None:
    loaded = load_model(load_settings(None, model="vit_b_32", weights="none", input_size=96))
    assert loaded.model.image_size == 96 and loaded.spec.size == (96, 96)
    assert any("heads.head" in n and "zero" in n for n in loaded.notes)  # the zero head got a random init
    assert loaded.model.heads.head.weight.abs().sum() > 0


def test_vit_input_size_errors() -> None:
    with pytest.raises(GradcamError, match="takes square inputs, got 64x96"):
        load_model(load_settings(None, model="vit_b_32", weights="none", input_size=[64, 96]))
    with pytest.raises(GradcamError, match="takes exactly 224x224 inputs"):
        load_model(load_settings(None, model="vit_b_32", weights="IMAGENET1K_V1", input_size=96))


def test_random_weights_use_the_architectures_size_not_the_default_weights() -> None:
    # vit_h_14's DEFAULT weights are 518 px, but with random weights the architecture is built for 224
    class Fixed224(nn.Module):
        image_size = 224

    default = torchvision.models.ViT_H_14_Weights.DEFAULT
    assert default.transforms().crop_size[0] == 518
    spec = _input_spec(load_settings(None, model="vit_h_14", weights="none"), None, default, Fixed224())
    assert spec.size == (224, 224)
    spec = _input_spec(load_settings(None, model="vit_h_14"), default, default, nn.Identity())
    assert spec.size == (518, 518)


def test_maxvit_input_size_builds_the_partitions_or_says_why_not() -> None:
    assert load_model(load_settings(None, model="maxvit_t", weights="none", input_size=448)).spec.size == (448, 448)
    with pytest.raises(GradcamError, match="not divisible by partition size 7"):
        load_model(load_settings(None, model="maxvit_t", weights="none", input_size=256))


def test_googlenet_and_inception_build_quietly_with_their_sizes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        googlenet = load_model(load_settings(None, model="googlenet", weights="none"))
        inception = load_model(load_settings(None, model="inception_v3", weights="none"))
    assert googlenet.spec.size == (224, 224) and inception.spec.size == (299, 299)
    # aux classifiers exist but run only in training mode: eval-mode output is the logits tensor
    assert inception.model.AuxLogits is not None and not inception.model.training
    out = inception.model(torch.zeros(1, 3, 96, 96))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 1000)


@pytest.mark.parametrize("name", ["quantized_resnet18", "quantized_mobilenet_v3_large", "quantized_googlenet"])
def test_quantized_models_are_refused_with_the_float_alternative(name: str) -> None:
    with pytest.raises(GradcamError) as exc:
        load_model(load_settings(None, model=name, weights="none"))
    message = str(exc.value)
    assert "quantized (int8)" in message and "no gradients" in message
    assert f"'{name.removeprefix('quantized_')}'" in message


@pytest.mark.parametrize(
    ("name", "kind"), [("fasterrcnn_resnet50_fpn", "detection"), ("fcn_resnet50", "segmentation"), ("r3d_18", "video")]
)
def test_other_torchvision_tasks_are_named(name: str, kind: str) -> None:
    with pytest.raises(GradcamError, match=f"is a torchvision {kind} model; gradcam explains image classifiers"):
        load_model(load_settings(None, model=name, weights="none"))


def test_quantized_model_through_the_cli_exits_2(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    make_image(tmp_path / "in" / "a.png")
    result = CliRunner().invoke(
        main, ["explain", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "quantized_resnet50"]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: model 'quantized_resnet50' is a quantized (int8) model")
    assert not (tmp_path / "out").exists()


def test_vit_through_the_cli_says_how_it_read_the_tokens(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    make_image(tmp_path / "in" / "a.png")
    config = tmp_path / "vit.yaml"
    config.write_text("model: vit_b_16\nweights: none\ninput_size: 64\nworkers: 0\nsave: [heatmap, npy]\n")
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-c", str(config)])
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert "target layer: encoder.layers.encoder_layer_11.ln_1 (auto-detected" in err
    assert (
        "layer encoder.layers.encoder_layer_11.ln_1: tokens as a 4x4 grid, first 1 token (class/prefix) dropped" in err
    )
    assert "initialises heads.head of vit_b_16 to zero" in err
    (cam,) = npy_maps(tmp_path / "out")
    assert cam.shape == (4, 4)
