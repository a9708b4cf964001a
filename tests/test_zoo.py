"""The whole torchvision classification zoo through `explain`, at the auto-detected layer and the family config's.

For every name in `torchvision.models.list_models(module=torchvision.models)`: random weights (`--weights none`),
one real photo (scikit-image's chelsea), the Python API end to end (discover, decode, model, engine, render,
files, CSV). Auto-detection must pick the layer `gradcam models` lists; then one `explain` per model, with the
model's family config (configs/<family>.yaml, `--model` choosing the member) and the auto-detected layer added
to the config's, must give an `ok` row per layer with a finite, non-constant map.

Cost: one construction per model (random initialisation of the big ones is most of the time: about half of
the matrix), shared by detection and the run through a memo on `torchvision.models.get_model`; a small input
size wherever the architecture allows, chosen so every explained map is still at least 2x2.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from gradcam_cli import explain, load_settings
from gradcam_cli.model.catalog import MODELS, family_config
from gradcam_cli.model.layers import auto_detect_layer, resolve_layer
from gradcam_cli.model.loading import load_model

skdata = pytest.importorskip("skimage.data")
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ZOO = sorted(torchvision.models.list_models(module=torchvision.models))

DEFAULT_SIZE = 64  # input / 32 = 2x2 maps for the stride-32 families
SIZES = {
    "alexnet": 128,  # valid convolutions and three max-pools: 64 px would leave 1x1, 128 px gives 3x3
    "inception_v3": 160,  # valid convolutions: Mixed_7c is 1x1 below 107 px, 3x3 at 160
    "maxvit_t": 224,  # each stage's map must divide into 7x7 partitions: multiples of 224 only
    # ViTs are built for the size (image_size) with random weights: 4x4 patch grids
    "vit_b_16": 64,
    "vit_l_16": 64,
    "vit_b_32": 128,
    "vit_l_32": 128,
    "vit_h_14": 56,
}
# Random weights can give an all-negative map, empty after Grad-CAM's ReLU: CNNs whose head is a linear
# read-out of the pooled map cannot (the top class's map sums to its positive score minus the bias), but a
# ViT's head reads the class token several non-linear steps after the explained layer. Measured on this photo,
# vit_b_16 at 64 px with seeds 0-11: 2 of 12 maps empty (seeds 0 and 7), the others 2 to 16 of 16 cells
# positive. So vit_b_16 runs with seed 1; the reshape itself is checked numerically in test_layouts.py.
SEEDS = {"vit_b_16": 1}
# the biggest constructions (random init of 300M+ parameters dominates); they run in CI all the same
SLOW = {"vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32"}


def _param(name: str) -> Any:
    return pytest.param(name, marks=pytest.mark.slow, id=name) if name in SLOW else pytest.param(name, id=name)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """chelsea.png (the cat, 451x300) scaled to 160x106: a real photo, small enough to write quickly."""
    folder = tmp_path_factory.mktemp("zoo_photo")
    Image.fromarray(skdata.chelsea()).resize((160, 106), Image.BILINEAR).save(folder / "chelsea.png")
    return folder


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[str, str], torch.nn.Module]:
    """Memoise torchvision model construction within one test (detection and the run share one model)."""
    cache: dict[tuple[str, str], torch.nn.Module] = {}
    real = torchvision.models.get_model

    def get_model(name: str, **kwargs: Any) -> torch.nn.Module:
        key = (name, repr(sorted(kwargs.items())))
        if key not in cache:  # load_model seeds torch (config key `seed`) before it asks for the model
            cache[key] = real(name, **kwargs)
        return cache[key]

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    return cache


def _explain(photo: Path, out: Path, name: str, layers: list[str]) -> dict[str, tuple[dict[str, str], np.ndarray]]:
    """One run of the family config (+ extra layers) on the photo: layer -> (CSV row, saved CAM)."""
    config = CONFIGS / str(family_config(name))
    size = SIZES.get(name, DEFAULT_SIZE)
    settings = load_settings(
        config, model=name, weights="none", input_size=size, workers=0, save="heatmap,npy", quiet=True
    ).replace(target_layers=layers, seed=SEEDS.get(name, 0))
    summary = explain([photo], out, settings)
    assert (summary.ok, summary.errors) == (1, 0), f"{name}: {summary}"
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    result = {}
    for row in rows:
        assert row["status"] == "ok", row
        heat = np.asarray(Image.open(out / row["heatmap"]))
        assert heat.shape == (106, 160), f"{name}: heatmap {heat.shape} is not the photo's size"
        assert int(heat.max()) == 255 and int(heat.min()) < 255, f"{name}: constant heatmap at {row['layer']}"
        npy = out / row["heatmap"].replace("heatmaps/", "npy/", 1).removesuffix(".png")
        result[row["layer"]] = (row, np.load(npy.with_name(npy.name + ".npy")))
    return result


def test_the_zoo_is_the_catalog() -> None:
    assert sorted(MODELS) == ZOO
    assert len(ZOO) >= 80


@pytest.mark.parametrize("name", [_param(n) for n in ZOO])
def test_zoo_model_explains_at_auto_and_family_layer(
    name: str, photo: Path, tmp_path: Path, built: dict[tuple[str, str], torch.nn.Module]
) -> None:
    size = SIZES.get(name, DEFAULT_SIZE)
    loaded = load_model(load_settings(None, model=name, weights="none", input_size=size, seed=SEEDS.get(name, 0)))
    auto = auto_detect_layer(loaded.model, loaded.spec.size)
    assert auto == MODELS[name][1], f"{name}: auto-detected {auto}, `gradcam models` says {MODELS[name][1]}"

    config_name = family_config(name)
    assert config_name is not None, f"{name} has no family config"
    (spec,) = load_settings(CONFIGS / config_name).target_layers
    family_layer = resolve_layer(loaded.model, spec)[0]
    layers = list(dict.fromkeys([auto, family_layer]))
    maps = _explain(photo, tmp_path / "out", name, layers)
    assert sorted(maps) == sorted(layers)
    for layer, (row, cam) in maps.items():
        assert np.isfinite(cam).all(), f"{name}: non-finite CAM at {layer}"
        assert cam.ndim == 2 and cam.size > 1, f"{name}: CAM {cam.shape} at {layer} has no positions"
        assert float(cam.max()) > float(cam.min()), f"{name}: constant CAM at {layer} ({cam.shape})"
        assert float(row["cam_max"]) > 0
    assert len(built) == 1, "detection and the run should share one construction"
