"""The static zoo table behind `gradcam models`, the family configs, and the `models`/`layers` commands.

The table is generated from torchvision (`python -m gradcam_cli.catalog`); here it is checked against the
installed torchvision: the same names, quantized names, input sizes and weights. Its auto-detected layers are
checked against real detection for every model in test_zoo.py.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torchvision
from helpers import invoke

from gradcam_cli import load_settings
from gradcam_cli.model.catalog import FAMILY_CONFIGS, MODELS, QUANTIZED, TORCHVISION_VERSION, family_config, zoo

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = {"googlenet": {"init_weights": True}, "inception_v3": {"init_weights": True}}


# --- the table against torchvision ------------------------------------------------------------------------------


def test_table_lists_exactly_torchvisions_classifiers() -> None:
    assert sorted(MODELS) == sorted(torchvision.models.list_models(module=torchvision.models))
    assert sorted(QUANTIZED) == sorted(torchvision.models.list_models(module=torchvision.models.quantization))
    assert torchvision.__version__.split("+")[0] == TORCHVISION_VERSION


@pytest.mark.parametrize("name", sorted(MODELS))
def test_table_sizes_and_weights_match_torchvision(name: str) -> None:
    size, layer, weights = MODELS[name]
    enum = torchvision.models.get_model_weights(name)
    assert size == enum.DEFAULT.transforms().crop_size[0]
    assert weights == tuple((m.name, m.transforms().crop_size[0]) for m in enum)
    assert layer and not layer.startswith(".")


def test_zoo_rows_carry_their_family_config() -> None:
    rows = zoo()
    assert [m.name for m in rows] == sorted(MODELS)
    by_name = {m.name: m for m in rows}
    assert by_name["resnet50"].config == "resnet.yaml"
    assert by_name["wide_resnet50_2"].config == "resnext.yaml"
    assert by_name["vit_h_14"].input_size == 518 and by_name["vit_h_14"].layer.endswith("encoder_layer_31.ln_1")
    assert by_name["inception_v3"].input_size == 299 and by_name["inception_v3"].layer == "Mixed_7c"
    assert by_name["swin_v2_t"].config == "swin.yaml"
    assert family_config("not_a_model") is None


# --- family configs ---------------------------------------------------------------------------------------------


def test_every_model_has_a_family_config_and_every_config_a_family() -> None:
    missing = [name for name in MODELS if family_config(name) is None]
    assert missing == []
    shipped = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {config for _, config in FAMILY_CONFIGS} | {"efficientnet_lite0.yaml"} == shipped


@pytest.mark.parametrize("config", sorted({c for _, c in FAMILY_CONFIGS}))
def test_family_config_is_valid_and_explains_its_layer(config: str) -> None:
    path = CONFIGS / config
    settings = load_settings(path)
    assert settings.model is not None and family_config(settings.model) == config, "the default is a family member"
    assert settings.weights == "DEFAULT"
    assert len(settings.target_layers) == 1
    lines = path.read_text(encoding="utf-8").splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("target_layers:"))
    assert lines[at - 1].startswith("#"), f"{config}: say why this layer in a comment right above it"
    assert len([ln for ln in lines[:at] if ln.startswith("#")]) >= 2


# families whose last map comes out of an activation module (ReLU, ReLU6, Hardswish, SiLU, or a pool or concat of
# them): their configs must target a map after it. Transformers (vit, swin, maxvit) and ConvNeXt have no
# activation after their last block; DenseNet applies its final ReLU as a function (its config says so).
POST_ACTIVATION = [
    "alexnet.yaml",
    "efficientnet.yaml",
    "googlenet.yaml",
    "inception_v3.yaml",
    "mnasnet.yaml",
    "mobilenet.yaml",
    "regnet.yaml",
    "resnet.yaml",
    "resnext.yaml",
    "shufflenet_v2.yaml",
    "squeezenet.yaml",
    "vgg.yaml",
]


@pytest.mark.parametrize("config", POST_ACTIVATION)
def test_family_config_targets_a_post_activation_map(config: str) -> None:
    """A careful user's layer: the rectified map the head reads, not a batch norm before its activation."""
    import torch

    from gradcam_cli.model.layers import resolve_target

    settings = load_settings(CONFIGS / config)
    assert settings.model is not None
    torch.manual_seed(0)
    model = torchvision.models.get_model(settings.model, weights=None, **QUIET.get(settings.model, {})).eval()
    _, module = resolve_target(model, settings.target_layers[0])
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        model(torch.randn(2, 3, 160, 160) * 2)
    handle.remove()
    # ReLU-family maps are >= 0; SiLU's minimum is -0.278 and Hardswish's -0.375 (EfficientNet, MobileNetV3). A batch
    # norm before the activation goes far below that on the same input.
    assert seen and float(seen[0].min()) >= -0.375, (config, settings.target_layers, float(seen[0].min()))


def test_densenet_config_says_why_its_map_is_before_the_relu() -> None:
    text = (CONFIGS / "densenet.yaml").read_text(encoding="utf-8")
    assert "ReLU" in text and "function" in text


def test_flag_model_wins_over_the_family_config(tmp_path: Path, make_image: Callable[..., Path]) -> None:
    make_image(tmp_path / "in" / "a.png")
    config = CONFIGS / "resnet.yaml"  # model: resnet50, weights: DEFAULT, target_layers: [layer4]
    result = invoke(
        *("explain", tmp_path / "in", "-o", tmp_path / "out", "-c", config),
        *("--model", "resnet18", "--weights", "none", "--workers", "0", "-q"),
    )
    assert result.exit_code == 0, result.output
    info: dict[str, Any] = json.loads((tmp_path / "out" / "run.json").read_text())
    assert (info["model"], info["weights"], info["layers"]) == ("resnet18", "none", ["layer4"])


# --- gradcam models ---------------------------------------------------------------------------------------------


def test_models_lists_every_model_with_size_layer_config_and_weights() -> None:
    result = invoke("models")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "input", "auto-detected", "layer"]
    rows = {ln.split()[0]: ln.split() for ln in lines[1:] if ln.strip() and ln.split()[0] in MODELS}
    assert sorted(rows) == sorted(MODELS)
    for name, (size, layer, _) in MODELS.items():
        assert rows[name][1:4] == [str(size), layer, f"configs/{family_config(name)}"], rows[name]
    assert "IMAGENET1K_SWAG_LINEAR_V1 (224)" in " ".join(rows["vit_h_14"])  # a weight with another size
    assert "quantized" in result.stdout and "package.module:callable" in result.stdout


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("vit_*", ["vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32"]),
        ("resnet1*", ["resnet101", "resnet152", "resnet18"]),
        ("resnet?8", ["resnet18"]),
        ("v2_s", ["efficientnet_v2_s", "swin_v2_s"]),
        ("inception", ["inception_v3"]),
    ],
)
def test_models_pattern(pattern: str, expected: list[str]) -> None:
    result = invoke("models", pattern)
    assert result.exit_code == 0, result.output
    assert [ln.split()[0] for ln in result.stdout.splitlines()[1:] if ln.strip()] == expected


def test_models_unknown_pattern_exits_2() -> None:
    result = invoke("models", "transformer9000")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: no torchvision classification model matches 'transformer9000'")


def test_models_answers_without_importing_torch(run_process: Callable[..., Any]) -> None:
    proc = run_process([sys.executable, "-m", "gradcam_cli", "models"], env_extra={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr
    imported = [ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    assert imported, "import profiling produced nothing"
    heavy = [m for m in imported if m.split(".")[0] in ("torch", "torchvision", "numpy", "PIL")]
    assert heavy == [], heavy
    assert len([ln for ln in proc.stdout.splitlines() if ln.split()[:1] and ln.split()[0] in MODELS]) == len(MODELS)


# --- gradcam layers ---------------------------------------------------------------------------------------------


def marked(output: str, mark: str) -> list[list[str]]:
    return [ln.split() for ln in output.splitlines() if ln.startswith(mark + " ")]


def test_layers_shows_vit_tokens_as_a_grid() -> None:
    result = invoke("layers", "vit_b_16", "--input-size", "64")
    assert result.exit_code == 0, result.output
    head = result.stdout.splitlines()[0]
    assert "input 3x64x64" in head and "auto-detected layer: encoder.layers.encoder_layer_11.ln_1" in head
    assert "family config: configs/vit.yaml" in head
    (picked,) = marked(result.stdout, ">")
    assert picked[1] == "encoder.layers.encoder_layer_11.ln_1" and "17x768" in picked
    line = next(ln for ln in result.stdout.splitlines() if ln.split()[1:2] == ["encoder.layers.encoder_layer_11.ln_1"])
    assert "[tokens as a 4x4 grid, first 1 token (class/prefix) dropped]" in line
    assert any(r[1] == "conv_proj" and "768x4x4" in r for r in marked(result.stdout, "*"))


def test_layers_shows_swin_channels_last_maps() -> None:
    result = invoke("layers", "swin_t", "--input-size", "64")
    assert result.exit_code == 0, result.output
    (picked,) = marked(result.stdout, ">")
    assert picked[1] == "permute" and "768x2x2" in picked
    norm = next(ln for ln in result.stdout.splitlines() if ln.split()[1:2] == ["norm"])
    assert norm.startswith("*") and "2x2x768" in norm and "[channels-last 2x2 map" in norm


def test_layers_does_not_offer_maxvit_window_partitions() -> None:
    # window attention turns a (B, C, H, W) map into (B, windows, 49 pixels, C): no grid of the input, not a
    # candidate. (Grid attention's stage-0 partitions are (B, 49, 64, 64), which no shape rule can tell from a
    # 64 x 64 map with 49 channels, so those are listed: a known limit of inferring layouts from shapes.)
    result = invoke("layers", "maxvit_t", "--all")
    assert result.exit_code == 0, result.output
    partitions = [ln for ln in result.stdout.splitlines() if "window_attention.partition_op" in ln]
    assert len(partitions) == 11  # one per MaxViT layer: stages of 2, 2, 5 and 2
    assert not [ln for ln in partitions if ln.startswith(("*", ">"))]
    (picked,) = marked(result.stdout, ">")
    assert picked[1] == "blocks.3" and "512x7x7" in picked


def test_layers_of_a_quantized_model_exits_2() -> None:
    result = invoke("layers", "quantized_resnet18")
    assert result.exit_code == 2
    assert re.match(r"Error: model 'quantized_resnet18' is a quantized \(int8\) model", result.stderr)


def test_models_warns_when_the_installed_torchvision_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradcam_cli.model.catalog as catalog

    monkeypatch.setattr(catalog, "installed_torchvision", lambda: "9.9.9")
    result = invoke("models", "resnet18")
    assert result.exit_code == 0
    assert f"generated from torchvision {TORCHVISION_VERSION}; 9.9.9 is installed" in result.stderr
    assert invoke("models", "resnet18").stdout.splitlines()[1].split()[0] == "resnet18"
