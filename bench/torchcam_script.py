"""Process D of the benchmark (optional): the same job written with torchcam (`pip install torchcam`).

    python bench/torchcam_script.py FOLDER OUT --model resnet50 --batch-size 16

For each batch: PIL load, resize to 224x224, ImageNet normalisation, one forward, torchcam's GradCAM on
layer4 for the predicted classes; then per image the CAM resized to the original size (PIL, bicubic, as
torchcam's `overlay_mask` does) saved as an 8-bit grayscale PNG, `overlay_mask(..., alpha=0.5)` saved as a
JPEG of quality 90, and top-1 predictions in OUT/predictions.csv. Written straightforwardly, following the
torchcam README.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchcam.methods import GradCAM
from torchcam.utils import overlay_mask
from torchvision import transforms
from torchvision.transforms.functional import to_pil_image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    labels = torchvision.models.get_model_weights(args.model).DEFAULT.meta["categories"]
    preprocess = transforms.Compose(
        [transforms.Resize((224, 224)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)

    args.out.mkdir(parents=True, exist_ok=True)
    with (
        GradCAM(model, target_layer="layer4") as cam_extractor,
        open(args.out / "predictions.csv", "w", newline="") as fh,
    ):
        writer = csv.writer(fh)
        writer.writerow(["path", "pred_index", "pred_label", "pred_prob", "heatmap", "overlay"])
        for start in range(0, len(files), args.batch_size):
            paths = files[start : start + args.batch_size]
            images = [Image.open(p).convert("RGB") for p in paths]
            input_tensor = torch.stack([preprocess(img) for img in images])

            out = model(input_tensor)
            pred = out.argmax(dim=1).tolist()
            activation_map = cam_extractor(pred, out)[0]  # (B, h, w), normalised to [0, 1]
            prob = out.softmax(dim=1).max(dim=1).values.tolist()

            for path, img, cam, i, p in zip(paths, images, activation_map, pred, prob, strict=True):
                rel = path.relative_to(args.folder).as_posix()
                mask = to_pil_image(cam, mode="F")
                cam_resized = np.asarray(mask.resize(img.size, resample=Image.Resampling.BICUBIC))
                heatmap = args.out / "heatmaps" / f"{rel}.png"
                overlay = args.out / "overlays" / f"{rel}.jpg"
                heatmap.parent.mkdir(parents=True, exist_ok=True)
                overlay.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.uint8(255 * cam_resized.clip(0, 1))).save(heatmap)
                overlay_mask(img, mask, alpha=0.5).save(overlay, quality=90)
                writer.writerow(
                    [
                        rel,
                        i,
                        labels[i],
                        f"{p:.6f}",
                        heatmap.relative_to(args.out).as_posix(),
                        overlay.relative_to(args.out).as_posix(),
                    ]
                )


if __name__ == "__main__":
    main()
