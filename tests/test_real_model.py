"""The offline ImageNet-trained EfficientNet-Lite0 names the object and looks at it.

These are the tests that need a real trained model: random weights cannot tell a cat from a cup.
Boxes were drawn by hand around the object in scikit-image's photos (x0, y0, x1, y1 in pixels).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("efficientnet_lite_pytorch", reason="the demo extra is part of `make test`'s install")
skdata = pytest.importorskip("skimage.data")

from gradcam_cli import explain, load_settings  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "efficientnet_lite0.yaml"
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
CAT_BOX = (40, 0, 380, 300)  # chelsea.png is 451x300; the cat's head and chest, not the background at right
CUP_BOX = (130, 0, 480, 280)  # coffee.png is 600x400; cup and the saucer rim, not the table


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _inside(x: int, y: int, box: tuple[int, int, int, int]) -> bool:
    return box[0] <= x < box[2] and box[1] <= y < box[3]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skdata.chelsea()).save(folder / "chelsea.png")
    Image.fromarray(skdata.coffee()).save(folder / "coffee.png")
    side = np.concatenate(
        [
            np.asarray(Image.fromarray(skdata.chelsea()).resize((300, 300))),
            np.asarray(Image.fromarray(skdata.coffee()).resize((300, 300))),
        ],
        axis=1,
    )
    Image.fromarray(side).save(folder / "side_by_side.png")
    return folder


def test_predicts_cat_and_espresso_and_points_at_them(photos: Path, tmp_path: Path) -> None:
    settings = load_settings(CONFIG, workers=0, quiet=True)
    summary = explain([photos / "chelsea.png", photos / "coffee.png"], tmp_path, settings)
    assert summary.exit_code == 0
    rows = {r["path"]: r for r in _rows(tmp_path)}
    cat, cup = rows["chelsea.png"], rows["coffee.png"]
    assert int(cat["pred_index"]) in CAT_CLASSES, cat
    assert cat["pred_label"] == "Egyptian cat"
    assert int(cup["pred_index"]) == ESPRESSO and cup["pred_label"] == "espresso"
    assert _inside(int(cat["peak_x"]), int(cat["peak_y"]), CAT_BOX), cat
    assert _inside(int(cup["peak_x"]), int(cup["peak_y"]), CUP_BOX), cup
    # the saved heatmap agrees with the CSV: its brightest pixel is the peak
    heat = np.asarray(Image.open(tmp_path / cat["heatmap"]))
    assert heat.shape == (300, 451) and heat[int(cat["peak_y"]), int(cat["peak_x"])] == 255
    # and most of the map's mass sits on the object
    inside = heat[CAT_BOX[1] : CAT_BOX[3], CAT_BOX[0] : CAT_BOX[2]].astype(float).sum()
    assert inside / heat.astype(float).sum() > 0.8


def test_class_discrimination_side_by_side(photos: Path, tmp_path: Path) -> None:
    """Cat left, cup right: the map for 'Egyptian cat' peaks left, the map for 'espresso' peaks right."""
    settings = load_settings(CONFIG, workers=0, quiet=True, targets=["Egyptian cat", "espresso"])
    explain([photos / "side_by_side.png"], tmp_path, settings)
    rows = {r["target_label"]: r for r in _rows(tmp_path)}
    assert int(rows["Egyptian cat"]["peak_x"]) < 300
    assert int(rows["espresso"]["peak_x"]) >= 300
    for label, row in rows.items():
        heat = np.asarray(Image.open(tmp_path / row["heatmap"])).astype(float)
        left, right = heat[:, :300].sum(), heat[:, 300:].sum()
        assert (left > right) == (label == "Egyptian cat"), (label, left, right)
