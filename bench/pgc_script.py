"""Process C of the benchmark: the script a user would write with pytorch-grad-cam (`pip install grad-cam`).

    python bench/pgc_script.py FOLDER OUT --model resnet50 --batch-size 16

For each batch of images: PIL load, resize to 224x224, ImageNet normalisation; pytorch-grad-cam's GradCAM on
model.layer4 for the predicted class; then per image the CAM resized to the original size with cv2.resize,
saved as an 8-bit grayscale PNG (OUT/heatmaps/<rel>.png), and `show_cam_on_image` on the original image
saved as a JPEG of quality 90 (OUT/overlays/<rel>.jpg); top-1 predictions in OUT/predictions.csv.
Written straightforwardly, following the pytorch-grad-cam README.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from torchvision import transforms

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu_bench.py)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval().to(args.device)
    labels = torchvision.models.get_model_weights(args.model).DEFAULT.meta["categories"]
    preprocess = transforms.Compose(
        [transforms.Resize((224, 224)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    )
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)

    args.out.mkdir(parents=True, exist_ok=True)
    with (
        GradCAM(model=model, target_layers=[model.layer4]) as cam,
        open(args.out / "predictions.csv", "w", newline="") as fh,
    ):
        writer = csv.writer(fh)
        writer.writerow(["path", "pred_index", "pred_label", "pred_prob", "heatmap", "overlay"])
        for start in range(0, len(files), args.batch_size):
            paths = files[start : start + args.batch_size]
            images = [Image.open(p).convert("RGB") for p in paths]
            input_tensor = torch.stack([preprocess(img) for img in images]).to(args.device)

            grayscale_cams = cam(input_tensor=input_tensor, targets=None)  # targets=None: the predicted class
            probs = cam.outputs.softmax(dim=1)
            prob, index = probs.max(dim=1)

            for path, img, grayscale_cam, i, p in zip(
                paths, images, grayscale_cams, index.tolist(), prob.tolist(), strict=True
            ):
                rel = path.relative_to(args.folder).as_posix()
                rgb_img = np.float32(img) / 255
                cam_resized = cv2.resize(grayscale_cam, (img.width, img.height))
                heatmap = args.out / "heatmaps" / f"{rel}.png"
                overlay = args.out / "overlays" / f"{rel}.jpg"
                heatmap.parent.mkdir(parents=True, exist_ok=True)
                overlay.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.uint8(255 * cam_resized)).save(heatmap)
                visualization = show_cam_on_image(rgb_img, cam_resized, use_rgb=True)
                Image.fromarray(visualization).save(overlay, quality=90)
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
