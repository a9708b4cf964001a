"""A hand-built colour classifier for the audit tests, importable as `tests.audit_models:colour_net`.

Red things are cats, green things dogs, blue things birds (CIFAR-10 names, so folders named `cat/`, `dog/`
are ground truth that `--truth auto` recognises). With inputs in [0, 1] (config mean 0, std 1):

    features = AvgPool2d(2)(ReLU(identity 1x1 conv(x)))      -> (3, h/2, w/2), the image's colours
    logits   = W @ mean(features) + b, W[cat] = (a, -a/2, -a/2), W[dog] = (-a/2, a, -a/2), W[bird] = (-a/2, -a/2, a)

Grad-CAM of class c at `features` is then ReLU(W[c] . colour): exactly the pixels of that colour, zero on a
grey background. So a test knows the prediction of every image and where its heatmap peaks.

`synthetic_out` makes an explain-shaped folder without any model (for the report at scale).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STRENGTH = 24.0


class ColourNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 3, 1)
        self.features = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, len(CLASSES))
        self.class_names = list(CLASSES)
        a = STRENGTH
        with torch.no_grad():
            conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            conv.bias.zero_()
            self.fc.weight.zero_()
            self.fc.bias.fill_(-2.0)
            for cls, channel in ((3, 0), (5, 1), (2, 2)):
                row = torch.full((3,), -a / 2)
                row[channel] = a
                self.fc.weight[cls] = row
                self.fc.bias[cls] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def colour_net() -> nn.Module:
    return ColourNet().eval()


# the test images: coloured squares on grey, in folders named after their true class
SIZE = (120, 90)
SQUARES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int, int]]] = {
    "cat/a.png": ((230, 20, 20), (10, 10, 40, 40)),
    "cat/b.png": ((20, 230, 20), (70, 40, 110, 80)),
    "dog/c.png": ((20, 230, 20), (20, 50, 50, 80)),
    "dog/d.png": ((20, 20, 230), (80, 10, 110, 40)),
}
PREDICTED = {"cat/a.png": "cat", "cat/b.png": "dog", "dog/c.png": "dog", "dog/d.png": "bird"}
CONFIG = "model: tests.audit_models:colour_net\nweights: none\ninput_size: 32\nmean: [0, 0, 0]\nstd: [1, 1, 1]\n"
BOXES = (
    "path,x0,y0,x1,y1,label\n"
    "cat/a.png,10,10,40,40,cat\n"
    "cat/b.png,0,0,20,20,dog\n"
    "dog/c.png,0,0,120,90,airplane\n"  # another class: ignored for the dog map, the mask decides
)


def draw_square(path: Path, colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> None:
    """A SIZE image, grey with a `colour` square on the half-open `box`."""
    img = Image.new("RGB", SIZE, (128, 128, 128))
    ImageDraw.Draw(img).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_world(root: Path) -> dict[str, Path]:
    """images/ (SQUARES), boxes.csv (BOXES), masks/dog/c.png (c's square) and colour.yaml under `root`."""
    images = root / "images"
    for rel, (colour, box) in SQUARES.items():
        draw_square(images / rel, colour, box)
    boxes = root / "boxes.csv"
    boxes.write_text(BOXES, encoding="utf-8")
    masks = root / "masks"
    (masks / "dog").mkdir(parents=True)
    mask = Image.new("L", SIZE, 0)
    ImageDraw.Draw(mask).rectangle([20, 50, 49, 79], fill=255)
    mask.save(masks / "dog" / "c.png")
    cfg = root / "colour.yaml"
    cfg.write_text(CONFIG + "workers: 0\nquiet: true\n", encoding="utf-8")
    return {"root": root, "images": images, "boxes": boxes, "masks": masks, "cfg": cfg}


def synthetic_out(root: Path, n: int, metrics: bool = True) -> Path:
    """An explain-shaped folder without running a model: n rows, tiny originals and overlays, a run.json."""
    out, src = root / "out", root / "src"
    (out / "overlays").mkdir(parents=True)
    src.mkdir()
    rng = np.random.default_rng(0)
    overlay = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(overlay, format="JPEG")
    original = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(original, format="PNG")
    header = ["path", "status", "error", "pred_index", "pred_label", "pred_prob", "target_index", "target_label"]
    header += ["target_prob", "method", "layer", "cam_max", "peak_x", "peak_y", "heatmap", "overlay"]
    if metrics:
        header += ["deletion_auc", "insertion_auc", "pointing_hit", "energy_in_box"]
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i in range(n):
            rel = f"c{i % 50:02d}/img{i:05d}.png"
            (src / rel).parent.mkdir(exist_ok=True)
            (src / rel).write_bytes(original.getvalue())
            (out / "overlays" / rel).parent.mkdir(exist_ok=True)
            (out / "overlays" / f"{rel}.jpg").write_bytes(overlay.getvalue())
            p = float(rng.uniform(0.05, 1.0))
            row = [rel, "ok", "", i % 7, f"class {i % 7}", f"{p:.6f}", i % 7, f"class {i % 7}", f"{p:.6f}"]
            row += ["gradcam", "layer4", "1.0", 3, 4, "", f"overlays/{rel}.jpg"]
            if metrics:
                deletion, insertion, hit, energy = rng.uniform(), rng.uniform(), rng.uniform() < 0.7, rng.uniform()
                row += [f"{deletion:.6f}", f"{insertion:.6f}", int(hit), f"{energy:.6f}"]
            writer.writerow(row)
    run = {"model": "synthetic", "input_roots": [str(src)], "labels": [f"class {k}" for k in range(7)]}
    (out / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return out


class HalfNet(nn.Module):
    """Evidence on one half of the image only, for `gradcam diff`'s opposite-halves test.

    features = the image's mean colour on an 8 x 8 grid, times a mask of the left (or right) half;
    logits = (mean(features), 0): class 0 always wins, and Grad-CAM of it is the image on that half only.
    """

    def __init__(self, side: str) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, 8, 8)
        if side == "left":
            mask[..., :4] = 1.0
        else:
            mask[..., 4:] = 1.0
        self.register_buffer("mask", mask)
        self.grid = nn.AdaptiveAvgPool2d(8)
        self.features = nn.Identity()
        self.class_names = ["thing", "nothing"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(self.grid(x).mean(1, keepdim=True) * self.mask)
        score = a.mean(dim=(1, 2, 3))
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def half_net(side: str = "left") -> nn.Module:
    return HalfNet(side).eval()


class MarkerNet(nn.Module):
    """Evidence is whatever is bright red, for the bias-audit test: an object, and in one group a corner marker.

    features = ReLU(red - 0.6) at full resolution (a 1x1 conv, no pooling), so on a grey (100) background with
    pure red (255) shapes the feature map is exactly 0.4 on the shapes and 0 elsewhere; logits = (WEIGHT *
    mean(features), 0). Grad-CAM of class 0 at `features` is then WEIGHT / (h * w) times the feature map: after
    min-max normalisation 1 on every red pixel and 0 elsewhere, with no upsampling blur (the map is at the input
    size). Class 0 ("object") always wins, with probability sigmoid(WEIGHT * 0.4 * red area / (h * w)).
    """

    WEIGHT = 40.0

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1))
            conv.bias.fill_(-0.6)
        self.features = nn.Sequential(conv, nn.ReLU())
        self.class_names = ["object", "other"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.WEIGHT * self.features(x).mean(dim=(1, 2, 3))
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def marker_net() -> nn.Module:
    return MarkerNet().eval()
