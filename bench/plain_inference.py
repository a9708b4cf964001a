"""Process A of the benchmark: plain batched inference, the floor that Grad-CAM cannot beat.

    python bench/plain_inference.py FOLDER OUT --model resnet50 --batch-size 16 [--workers 2]

Decode (PIL) + resize of the whole image to 224x224 + ImageNet normalisation in 2 DataLoader workers, a
batched forward under torch.inference_mode(), and a CSV of top-1 predictions (OUT/predictions.csv).
No gradients, no heatmaps, no image files written. `--channels-last` runs the model in that memory format
(process A2: what `gradcam explain` does on the CPU by default), for a like-for-like comparison.
`--device cuda` runs the forward on the GPU (bench/gpu_bench.py).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision import transforms

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Folder(torch.utils.data.Dataset):
    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.transform = transforms.Compose(
            [transforms.Resize((224, 224)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = Image.open(self.files[i]).convert("RGB")
        return self.transform(img)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true", help="model and batches in channels_last format")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (pinned batches, non-blocking copies)")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    labels = torchvision.models.get_model_weights(args.model).DEFAULT.meta["categories"]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)

    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    loader = torch.utils.data.DataLoader(
        Folder(files), batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == "cuda"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "pred_index", "pred_label", "pred_prob"])
        done = 0
        with torch.inference_mode():
            for x in loader:
                x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                probs = model(x).softmax(dim=1)
                prob, index = probs.max(dim=1)
                for path, i, p in zip(files[done : done + len(x)], index.tolist(), prob.tolist(), strict=True):
                    writer.writerow([path.relative_to(args.folder).as_posix(), i, labels[i], f"{p:.6f}"])
                done += len(x)


if __name__ == "__main__":
    main()
