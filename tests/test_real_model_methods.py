"""Class discrimination of every method on the offline ImageNet-trained EfficientNet-Lite0.

scikit-image's chelsea (a cat) and coffee (an espresso cup) side by side, each 300x300: for each method the map of
'Egyptian cat' must peak on the left half and hold most of its mass there, the map of 'espresso' likewise on the
right half. Exceptions, by design and asserted as such: eigencam is class-agnostic (one map for every class) and
guided backprop is not class-discriminative (its two maps are nearly the same picture, the known weakness
that Guided Grad-CAM fixes by multiplying with Grad-CAM).

Layer: the demo config's, `_avg_pooling:input`, the map global average pooling receives (after the head's
ReLU6), i.e. the post-activation map that CAM needs and that methods assuming non-negative activations (xgradcam
normalises by sum(A)) are defined on. At `_bn1`, the batch norm before that ReLU6, XGrad-CAM's normalisation by
a near-zero or negative sum(A) flips the cat's map onto the cup (asserted below, as the reason for the layer).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("efficientnet_lite_pytorch", reason="the demo extra is part of `make test`'s install")
skdata = pytest.importorskip("skimage.data")

import torch  # noqa: E402

from gradcam_cli import explain, load_settings  # noqa: E402
from gradcam_cli.cam.engine import CamEngine  # noqa: E402
from gradcam_cli.cam.methods import BUILT_IN_METHODS, get_spec  # noqa: E402
from gradcam_cli.data.decode import model_input  # noqa: E402
from gradcam_cli.model.loading import LoadedModel, load_model  # noqa: E402
from gradcam_cli.render.heatmap import upsample_normalize  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "efficientnet_lite0.yaml"
POOLED = load_settings(CONFIG).target_layers[0]  # the layer the demo explains
# every method that weighs the layer's channels by gradients, i.e. what the choice of layer is about
GRADIENT_METHODS = [m for m in BUILT_IN_METHODS if get_spec(m).layer_grads and get_spec(m).class_specific]
HALF = 300  # the cat fills x < 300, the cup x >= 300
CAT, ESPRESSO = 285, 967  # 'Egyptian cat', 'espresso'


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("side")
    side = np.concatenate(
        [
            np.asarray(Image.fromarray(skdata.chelsea()).resize((HALF, HALF))),
            np.asarray(Image.fromarray(skdata.coffee()).resize((HALF, HALF))),
        ],
        axis=1,
    )
    Image.fromarray(side).save(folder / "side_by_side.png")
    return folder / "side_by_side.png"


@pytest.fixture(scope="module")
def lite(side_by_side: Path) -> tuple[LoadedModel, torch.Tensor]:
    """The model, loaded once, and the image preprocessed exactly as the pipeline does (data.model_input)."""
    loaded = load_model(load_settings(CONFIG))
    arr, _ = model_input(Image.open(side_by_side).convert("RGB"), loaded.spec)
    mean = torch.tensor(loaded.spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(loaded.spec.std).view(1, 3, 1, 1) * 255
    return loaded, (torch.from_numpy(arr)[None].float() - mean) / std


def maps_for(lite: tuple[LoadedModel, torch.Tensor], method: str, layer: str, **options: object) -> torch.Tensor:
    """(2, 300, 600) heatmaps in [0, 1] of 'Egyptian cat' and 'espresso', rendered as the pipeline renders them."""
    loaded, x = lite
    module = loaded.model.get_submodule(layer.removesuffix(":input"))
    with CamEngine(loaded.model, {layer: module}, method, **options) as engine:  # type: ignore[arg-type]
        result = engine.run(x, lambda logits: torch.tensor([[CAT, ESPRESSO]]))
    (cams,) = result.cams.values()
    return torch.stack([upsample_normalize(cams[0, t], (HALF, 2 * HALF), (0, 0, 2 * HALF, HALF)) for t in range(2)])


def assert_discriminates(maps: torch.Tensor, method: str) -> None:
    cat, cup = maps
    peaks = [int(m.flatten().argmax()) % (2 * HALF) for m in maps]
    cat_l, cat_r = float(cat[:, :HALF].sum()), float(cat[:, HALF:].sum())
    cup_l, cup_r = float(cup[:, :HALF].sum()), float(cup[:, HALF:].sum())
    print(
        f"[{method}] cat peak_x {peaks[0]}, mass left/right {cat_l / max(cat_r, 1e-9):.2f}; "
        f"espresso peak_x {peaks[1]}, mass left/right {cup_l / max(cup_r, 1e-9):.2f}"
    )
    assert peaks[0] < HALF <= peaks[1], (method, peaks)
    assert cat_l > cat_r and cup_r > cup_l, (method, cat_l, cat_r, cup_l, cup_r)


def test_the_demo_config_explains_the_post_activation_map() -> None:
    assert POOLED == "_avg_pooling:input"
    assert {"gradcam", "gradcampp", "xgradcam", "hirescam", "layercam", "eigengradcam"} <= set(GRADIENT_METHODS)


@pytest.mark.parametrize("method", [*GRADIENT_METHODS, "cam"])
def test_method_discriminates_cat_and_cup(method: str, lite: tuple[LoadedModel, torch.Tensor]) -> None:
    assert_discriminates(maps_for(lite, method, POOLED), method)


def test_xgradcam_before_the_activation_puts_the_cat_on_the_cup(lite: tuple[LoadedModel, torch.Tensor]) -> None:
    """Why the config does not target `_bn1`: its activations are signed, and XGrad-CAM divides by their sum."""
    cat, _ = maps_for(lite, "xgradcam", "_bn1")
    assert int(cat.flatten().argmax()) % (2 * HALF) >= HALF


def test_guided_gradcam_discriminates_through_the_pipeline(side_by_side: Path, tmp_path: Path) -> None:
    """End to end (CSV peaks, heatmaps/, guided/): the heatmaps are Grad-CAM's, guided/ is guided backprop x it."""
    settings = load_settings(
        CONFIG,
        workers=0,
        quiet=True,
        method="guided-gradcam",
        target_layers=[POOLED],
        targets=["Egyptian cat", "espresso"],
        save=["heatmap", "npy"],
    )
    assert explain([side_by_side], tmp_path, settings).exit_code == 0
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = {r["target_label"]: r for r in csv.DictReader(fh)}
    assert int(rows["Egyptian cat"]["peak_x"]) < HALF <= int(rows["espresso"]["peak_x"])
    for label, row in rows.items():
        heat = np.asarray(Image.open(tmp_path / row["heatmap"])).astype(float)
        assert (heat[:, :HALF].sum() > heat[:, HALF:].sum()) == (label == "Egyptian cat")
        guided = np.abs(np.load(tmp_path / (row["guided"][: -len(".png")] + ".npy"))).max(axis=0)  # (224, 224)
        left, right = guided[:, :112].sum(), guided[:, 112:].sum()
        print(f"[guided-gradcam guided/] {label}: mass left/right {left / right:.2f}")
        assert (left > right) == (label == "Egyptian cat"), (label, left, right)
        assert Image.open(tmp_path / row["guided"]).size == (2 * HALF, HALF)


def test_counterfactual_cat_map_avoids_the_cat(lite: tuple[LoadedModel, torch.Tensor]) -> None:
    """--counterfactual: the evidence AGAINST 'Egyptian cat' lies in the cup half."""
    cat = maps_for(lite, "gradcam", POOLED, counterfactual=True)[0]
    assert int(cat.flatten().argmax()) % (2 * HALF) >= HALF
    assert float(cat[:, HALF:].sum()) > float(cat[:, :HALF].sum())


def test_ablationcam_discriminates_cat_and_cup(lite: tuple[LoadedModel, torch.Tensor]) -> None:
    """1,280 channels at the pooled map: one head forward per channel (the part before it on a small image)."""
    assert_discriminates(maps_for(lite, "ablationcam", POOLED, chunk_size=256), "ablationcam")


@pytest.mark.slow
def test_scorecam_discriminates_cat_and_cup(lite: tuple[LoadedModel, torch.Tensor]) -> None:
    """Score-CAM runs one full forward per channel: at `_blocks.15` (the last block, 320 x 7 x 7) rather than the
    1,280-channel pooled map, so 320 forwards."""
    assert_discriminates(maps_for(lite, "scorecam", "_blocks.15", chunk_size=64), "scorecam")


def test_eigencam_is_class_agnostic(lite: tuple[LoadedModel, torch.Tensor]) -> None:
    """Eigen-CAM uses no class information: both targets get the very same map (documented, not a bug)."""
    cat, cup = maps_for(lite, "eigencam", POOLED)
    assert torch.equal(cat, cup) and float(cat.max()) > 0


def test_guided_backprop_is_not_class_discriminative(lite: tuple[LoadedModel, torch.Tensor]) -> None:
    """Guided backprop reconstructs image structure more than class evidence (Adebayo et al. 2018, Nie et al.
    2018): the 'Egyptian cat' and 'espresso' maps are nearly the same picture. Documented in the README; the
    class-discriminative version is guided-gradcam (tested above)."""
    cat, cup = maps_for(lite, "guided-backprop", "_bn1")  # the layer is not used
    correlation = float(torch.corrcoef(torch.stack([cat.flatten(), cup.flatten()]))[0, 1])
    print(f"[guided-backprop] correlation of the cat and espresso maps: {correlation:.3f}")
    assert correlation > 0.8
