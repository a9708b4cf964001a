"""Layer paths: parsing, resolution on real torchvision architectures (random weights), auto-detection."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from gradcam_cli.errors import GradcamError
from gradcam_cli.model.layers import auto_detect_layer, inspect_layers, parse_layer_path, resolve_layer


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def densenet121() -> nn.Module:
    return torchvision.models.densenet121(weights=None).eval()


@pytest.fixture(scope="module")
def mobilenet_v2() -> nn.Module:
    return torchvision.models.mobilenet_v2(weights=None).eval()


# --- parse_layer_path ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parts"),
    [
        ("layer4", ["layer4"]),
        ("layer4.-1", ["layer4", "-1"]),
        ("layer4[-1]", ["layer4", "-1"]),
        ("layer4[1].conv2", ["layer4", "1", "conv2"]),
        ("layer4[-1][0]", ["layer4", "-1", "0"]),
        ("features.denseblock4", ["features", "denseblock4"]),
        ("  layer4.0  ", ["layer4", "0"]),
    ],
)
def test_parse_layer_path(spec: str, parts: list[str]) -> None:
    assert parse_layer_path(spec) == parts


@pytest.mark.parametrize("spec", ["", "   ", ".", "layer4.", ".layer4", "layer4..conv1", "[0]"])
def test_parse_layer_path_rejects_malformed(spec: str) -> None:
    with pytest.raises(GradcamError) as exc:
        parse_layer_path(spec)
    message = str(exc.value)
    assert "\n" not in message
    assert "layer4" in message  # shows an example of a valid path


# --- resolve_layer ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("layer4", "layer4"),
        ("layer4.-1", "layer4.1"),
        ("layer4[-1]", "layer4.1"),
        ("layer4.1", "layer4.1"),
        ("layer4[0]", "layer4.0"),
        ("layer4.-2", "layer4.0"),
        ("layer4[-1].conv2", "layer4.1.conv2"),
        ("layer4.0.downsample[0]", "layer4.0.downsample.0"),
        ("fc", "fc"),
    ],
)
def test_resolve_layer_resnet18(resnet18: nn.Module, spec: str, canonical: str) -> None:
    name, module = resolve_layer(resnet18, spec)
    assert name == canonical
    assert module is resnet18.get_submodule(canonical)


def test_resolve_layer_spellings_agree(resnet18: nn.Module) -> None:
    modules = {id(resolve_layer(resnet18, s)[1]) for s in ("layer4.-1", "layer4[-1]", "layer4.1", "layer4[1]")}
    assert modules == {id(resnet18.layer4[-1])}


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("features.denseblock4", "features.denseblock4"),
        ("features", "features"),
        ("features.-1", "features.norm5"),
        ("features[-1]", "features.norm5"),
        ("features[4]", "features.denseblock1"),
        ("features.denseblock4.denselayer16.conv2", "features.denseblock4.denselayer16.conv2"),
        ("features.denseblock4[-1]", "features.denseblock4.denselayer16"),
    ],
)
def test_resolve_layer_densenet121(densenet121: nn.Module, spec: str, canonical: str) -> None:
    name, module = resolve_layer(densenet121, spec)
    assert name == canonical
    assert module is densenet121.get_submodule(canonical)


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [("features[-1]", "features.18"), ("features.18.0", "features.18.0"), ("features[18][-1]", "features.18.2")],
)
def test_resolve_layer_mobilenet_v2(mobilenet_v2: nn.Module, spec: str, canonical: str) -> None:
    assert resolve_layer(mobilenet_v2, spec)[0] == canonical


def test_unknown_layer_lists_nearest_names(resnet18: nn.Module) -> None:
    with pytest.raises(GradcamError) as exc:
        resolve_layer(resnet18, "layer5")
    message = str(exc.value)
    assert "\n" not in message
    assert "unknown layer 'layer5'" in message
    assert "layer4" in message  # the nearest valid name
    assert "gradcam layers" in message  # where to see them all


def test_unknown_child_names_where_it_stopped(resnet18: nn.Module) -> None:
    with pytest.raises(GradcamError) as exc:
        resolve_layer(resnet18, "layer4.conv9")
    message = str(exc.value)
    assert "'layer4.conv9'" in message
    assert "under 'layer4'" in message
    assert "layer4.1.conv2" in message or "layer4.0.conv2" in message


@pytest.mark.parametrize("spec", ["layer4.-3", "layer4[2]", "layer4.7"])
def test_index_out_of_range_is_unknown(resnet18: nn.Module, spec: str) -> None:
    with pytest.raises(GradcamError) as exc:
        resolve_layer(resnet18, spec)
    message = str(exc.value)
    assert f"unknown layer '{spec}'" in message
    assert "layer4.0" in message or "layer4.1" in message


def test_path_below_a_leaf_module_is_unknown(resnet18: nn.Module) -> None:
    with pytest.raises(GradcamError, match=r"unknown layer 'fc\.weight'"):
        resolve_layer(resnet18, "fc.weight")


def test_unknown_densenet_block(densenet121: nn.Module) -> None:
    with pytest.raises(GradcamError) as exc:
        resolve_layer(densenet121, "features.denseblock5")
    assert "features.denseblock4" in str(exc.value)


def test_malformed_path_is_an_error_not_the_whole_model(resnet18: nn.Module) -> None:
    with pytest.raises(GradcamError):
        resolve_layer(resnet18, "")


# --- inspect_layers and auto_detect_layer ---------------------------------------------------------------------


def test_inspect_layers_shapes_and_calls(resnet18: nn.Module) -> None:
    infos = {i.name: i for i in inspect_layers(resnet18, (224, 224))[0]}
    assert infos["layer4"].shape == (1, 512, 7, 7)
    assert infos["layer4"].spatial and infos["layer4"].calls == 1
    assert infos["layer3"].shape == (1, 256, 14, 14)
    assert infos["avgpool"].shape == (1, 512, 1, 1)
    assert not infos["avgpool"].spatial  # 1x1 has no "where"
    assert infos["fc"].shape == (1, 1000)
    assert not infos["fc"].spatial
    assert infos["layer4.1.relu"].calls == 2  # the block's ReLU module is used twice
    assert "" not in infos  # the root module is not a layer
    assert resnet18.training is False  # tracing restores the mode


def test_inspect_layers_restores_training_mode_and_removes_hooks() -> None:
    model = torchvision.models.resnet18(weights=None).train()
    inspect_layers(model, (64, 64))
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [("resnet18", "layer4"), ("densenet121", "features"), ("mobilenet_v2", "features")],
)
def test_auto_detect_layer(request: pytest.FixtureRequest, fixture: str, expected: str) -> None:
    model = request.getfixturevalue(fixture)
    assert auto_detect_layer(model, (224, 224)) == expected
    assert all(not m._forward_hooks for m in model.modules())


def test_auto_detect_skips_maps_without_spatial_extent(resnet18: nn.Module) -> None:
    # at 32 px layer4 is 1x1, so the last map that still has a "where" is layer3 (2x2)
    assert auto_detect_layer(resnet18, (32, 32)) == "layer3"
    assert auto_detect_layer(resnet18, (64, 64)) == "layer4"  # 2x2


def test_auto_detect_fails_clearly_without_spatial_layers() -> None:
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    with pytest.raises(GradcamError, match="--layer"):
        auto_detect_layer(model, (16, 16))


def test_auto_detected_name_resolves(resnet18: nn.Module) -> None:
    name = auto_detect_layer(resnet18, (224, 224))
    resolved, module = resolve_layer(resnet18, name)
    assert resolved == name
    with torch.no_grad():
        seen: list[torch.Size] = []
        handle = module.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        resnet18(torch.zeros(1, 3, 224, 224))
        handle.remove()
    assert seen == [torch.Size([1, 512, 7, 7])]


# --- the catalog shortcut of `explain` ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "input_size", "detects"),
    [("resnet18", None, False), ("mobilenet_v3_small", None, False), ("resnet18", 160, True)],
)
def test_explain_takes_the_layer_from_the_catalog_only_where_it_was_detected(
    monkeypatch: pytest.MonkeyPatch, model: str, input_size: int | None, detects: bool
) -> None:
    """At the model's own input size the table's answer is used (no probe); at another size detection runs.

    Either way the layer is the one detection gives (test_zoo.py checks the table for every model)."""
    from gradcam_cli.config import load_settings
    from gradcam_cli.model import layers
    from gradcam_cli.model.catalog import MODELS
    from gradcam_cli.model.loading import load_model

    settings = load_settings(None, model=model, weights="none", input_size=input_size)
    loaded = load_model(settings)
    calls: list[tuple[int, int]] = []

    def detect(net: nn.Module, size: tuple[int, int], device: object = "cpu") -> str:
        calls.append(size)
        return auto_detect_layer(net, size, device)  # type: ignore[arg-type]

    monkeypatch.setattr(layers, "auto_detect_layer", detect)
    chosen = layers.choose_layers(loaded.model, (), model, loaded.spec.size, "cpu", lambda message: None)
    assert list(chosen) == [MODELS[model][1]] == [auto_detect_layer(loaded.model, loaded.spec.size)]
    assert chosen[MODELS[model][1]] is resolve_layer(loaded.model, MODELS[model][1])[1]
    assert calls == ([loaded.spec.size] if detects else [])
