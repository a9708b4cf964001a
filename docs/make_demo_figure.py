"""Build docs/demo_overlays.jpg, the README picture, from a `make demo` output folder.

Usage: python docs/make_demo_figure.py demo_out docs/demo_overlays.jpg
Tiles every overlay (sorted by path) at a fixed height, captioned with the predicted label from
predictions.csv, so the picture in the README is exactly what the tool wrote.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from PIL import Image, ImageDraw

TILE_HEIGHT = 220
PER_ROW = 4


def main(out_dir: str, target: str) -> None:
    out = Path(out_dir)
    with open(out / "predictions.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok" and r["overlay"]]
    tiles = []
    for row in sorted(rows, key=lambda r: r["path"]):
        img = Image.open(out / row["overlay"]).convert("RGB")
        img = img.resize((max(1, round(img.width * TILE_HEIGHT / img.height)), TILE_HEIGHT))
        draw = ImageDraw.Draw(img)
        caption = f"{row['path']}: {row['pred_label']} {float(row['pred_prob']):.2f}"
        draw.rectangle((0, TILE_HEIGHT - 18, img.width, TILE_HEIGHT), fill=(0, 0, 0))
        draw.text((4, TILE_HEIGHT - 16), caption, fill=(255, 255, 255))
        tiles.append(img)
    rows_of_tiles = [tiles[i : i + PER_ROW] for i in range(0, len(tiles), PER_ROW)]
    width = max(sum(t.width for t in r) for r in rows_of_tiles)
    sheet = Image.new("RGB", (width, TILE_HEIGHT * len(rows_of_tiles)), (255, 255, 255))
    for y, r in enumerate(rows_of_tiles):
        x = 0
        for t in r:
            sheet.paste(t, (x, y * TILE_HEIGHT))
            x += t.width
    sheet.save(target, quality=85)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
