"""Build the benchmark's image folders, deterministically, from real photos shipped in installed packages.

    python bench/make_photos.py                      # bench/_data/photos: 48 real-size photos (JPEG + PNG)
    python bench/make_photos.py --small 2000         # bench/_data/small_2000: 2000 small JPEGs (~160 px)

Sources: sample_images/ at the repo root when it exists (every image in it), else the colour photos of
scikit-image's data folder and matplotlib's grace_hopper.jpg. Each source is re-encoded at widths 400, 640,
800, 1024, 1280 and 1600 px (aspect kept, Lanczos), alternating JPEG (quality 90) and PNG, so each photo
appears in both formats. Small images are crops of the sources at several scales, resized to ~160 px.
The same inputs always give byte-identical folders; an existing folder with the expected file count is kept.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "bench" / "_data"
WIDTHS = (400, 640, 800, 1024, 1280, 1600)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)


def source_photos() -> list[Path]:
    """The real photos the folders are made from, in a fixed order."""
    sample = REPO / "sample_images"
    if sample.is_dir():
        found = sorted(p for p in sample.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if found:
            return found
    import matplotlib
    import skimage

    skdata = Path(skimage.__file__).parent / "data"
    paths = [skdata / name for name in SKIMAGE_PHOTOS]
    paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"make_photos: source photos not found: {', '.join(missing)}")
    return paths


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def save(img: Image.Image, path: Path) -> None:
    if path.suffix == ".jpg":
        img.save(path, format="JPEG", quality=90)
    else:
        img.save(path, format="PNG")


def _stamp(sources: list[Path], params: str) -> str:
    """What a folder was built from; a folder whose stamp differs is rebuilt."""
    lines = [params] + [f"{p} {p.stat().st_size}" for p in sources]
    return "\n".join(lines) + "\n"


def _ready(folder: Path, count: int, stamp: str) -> bool:
    if not folder.is_dir() or sum(1 for p in folder.iterdir() if p.suffix in (".jpg", ".png")) != count:
        return False
    try:
        return (folder / ".built-from").read_text() == stamp
    except OSError:
        return False


def build_photos(folder: Path = DATA / "photos", min_count: int = 48, force: bool = False) -> Path:
    """Every source at every width in WIDTHS, alternating JPEG and PNG; at least `min_count` files."""
    sources = source_photos()
    per_source = len(WIDTHS)
    rounds = max(1, -(-min_count // (len(sources) * per_source)))  # repeat widths only for tiny source sets
    count = len(sources) * per_source * rounds
    stamp = _stamp(sources, f"photos widths={WIDTHS} rounds={rounds}")
    if not force and _ready(folder, count, stamp):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for s, src in enumerate(sources):
        img = load_rgb(src)
        stem = f"{s:02d}_{src.stem}"
        for r in range(rounds):
            for w, width in enumerate(WIDTHS):
                height = max(1, round(img.height * width / img.width))
                resized = img.resize((width, height), Image.Resampling.LANCZOS)
                ext = "jpg" if (s + w + r) % 2 == 0 else "png"
                tag = f"_{r}" if rounds > 1 else ""
                save(resized, folder / f"{stem}_w{width}{tag}.{ext}")
    (folder / ".built-from").write_text(stamp)
    return folder


def build_small(count: int, folder: Path | None = None, size: int = 160, force: bool = False) -> Path:
    """`count` small JPEGs (longer side ~`size` px): random crops of the sources at several scales.

    The generator is seeded, so small_200 holds exactly the first 200 images of small_2000.
    """
    folder = folder or DATA / f"small_{count}"
    paths = source_photos()
    stamp = _stamp(paths, f"small count={count} size={size}")
    if not force and _ready(folder, count, stamp):
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    sources = [load_rgb(p) for p in paths]
    rng = random.Random(0)
    for i in range(count):
        img = sources[i % len(sources)]
        frac = rng.uniform(0.4, 1.0)
        cw, ch = max(8, int(img.width * frac)), max(8, int(img.height * frac))
        x0, y0 = rng.randint(0, img.width - cw), rng.randint(0, img.height - ch)
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        longer = rng.randint(size - 32, size + 32)
        scale = longer / max(cw, ch)
        small = crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BILINEAR)
        small.save(folder / f"small_{i:05d}.jpg", format="JPEG", quality=90)
    (folder / ".built-from").write_text(stamp)
    return folder


def describe(folder: Path) -> str:
    """One line: file count, formats and widths."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    jpg = sum(p.suffix == ".jpg" for p in files)
    widths = []
    for p in files:
        with Image.open(p) as im:
            widths.append(im.width)
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    return (
        f"{len(files)} files ({jpg} JPEG, {len(files) - jpg} PNG), widths {min(widths)}-{max(widths)} px, "
        f"{size_mb:.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="target folder (default: bench/_data/photos or small_N)")
    parser.add_argument("--min-count", type=int, default=48, help="at least this many real-size photos")
    parser.add_argument("--small", type=int, metavar="N", help="make N small images instead")
    parser.add_argument("--size", type=int, default=160, help="longer side of the small images (+-32 px)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder looks complete")
    args = parser.parse_args()
    if args.small:
        folder = build_small(args.small, args.out, args.size, args.force)
    else:
        folder = build_photos(args.out or DATA / "photos", args.min_count, args.force)
    print(f"{os.path.relpath(folder)}: {describe(folder)}")


if __name__ == "__main__":
    main()
