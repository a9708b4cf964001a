"""Annotations for the pointing game and energy-in-box: where the evidence for a class should be.

Three box formats, all in original-image pixels, and a folder of masks:

- CSV with a header `path,x0,y0,x1,y1,label`: `path` as in predictions.csv (relative to the INPUT root), a
  box covers x0 <= x < x1, y0 <= y < y1 (pixel centres), `label` a class index, a class name, or `*` (any
  class: "the object the model should look at, whatever it predicts"). Several rows per image are fine.
- COCO JSON (`images`, `annotations` with `bbox` [x, y, w, h], `categories`): an image is its `file_name`,
  a label its category's name (or id, when the name is not one of the model's classes).
- a folder of Pascal VOC XML files (`<filename>`, `<object><name>` and `<bndbox>` with 1-based inclusive
  xmin..xmax, which become x0 = xmin - 1, x1 = xmax); the image is the XML's folder + `<filename>`.
- masks: binary PNGs mirroring the input tree, `DIR/<rel without extension>.png` or `DIR/<rel>.png`; any
  non-zero pixel is "the object", for every target class.

An image is looked up by its relative path, then by that path without its extension, so `cats/tom.jpg`
matches an annotation written for `cats/tom.png` or `cats/tom`. Reading happens once, before the run; labels
are resolved against the model's class names then, so a typo stops the run with one line (exit 2).
No torch here: masks come back as numpy arrays.
"""

from __future__ import annotations

import csv
import json
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradcam_cli.errors import GradcamError
from gradcam_cli.model.labels import ANY_CLASS, LabelResolver


@dataclass(frozen=True)
class Box:
    """One annotated box: original-image pixels and a class index (ANY_CLASS for `*`)."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: int


@dataclass
class Annotations:
    """Boxes per image key and an optional masks folder; `lookup` answers for one image."""

    boxes: dict[str, list[Box]] = field(default_factory=dict)
    masks: Path | None = None
    source: str = ""

    def __post_init__(self) -> None:
        # annotation paths without their extension, for the fallback lookup
        self._by_stem: dict[str, list[Box]] = {}
        for key, items in self.boxes.items():
            self._by_stem.setdefault(_stem(key), []).extend(items)

    def _lookup(self, rel: str) -> list[Box] | None:
        found = self.boxes.get(rel)
        return found if found is not None else self._by_stem.get(_stem(rel))

    def boxes_for(self, rel: str, target: int) -> list[Box]:
        """The boxes of `rel` whose label is `target` or `*` (exact path first, then the same path without its
        extension on either side)."""
        return [b for b in (self._lookup(rel) or []) if b.label in (target, ANY_CLASS)]

    def mask_path(self, rel: str) -> Path | None:
        """The mask file of `rel`, if the masks folder has one."""
        if self.masks is None:
            return None
        for candidate in (f"{_stem(rel)}.png", f"{rel}.png"):
            path = self.masks / candidate
            if path.is_file():
                return path
        return None

    def matched(self, rels: Iterable[str]) -> tuple[int, int]:
        """(images among `rels` with boxes, annotated images in total): to warn about paths that match nothing."""
        hit = {rel for rel in rels if self._lookup(rel) is not None}
        return len(hit), len(self.boxes)


def _stem(rel: str) -> str:
    root, _ext = posixpath.splitext(rel)
    return root


def _key(path: str) -> str:
    """Annotation paths are compared as forward-slash relative paths without a leading ./"""
    text = path.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return posixpath.normpath(text) if text else text


def _number(value: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GradcamError(f"{where}: '{value}' is not a number") from None
    if not np.isfinite(number):
        raise GradcamError(f"{where}: '{value}' is not a finite number")
    return number


def _add(table: dict[str, list[Box]], rel: str, box: Box, where: str) -> None:
    if not (box.x1 > box.x0 and box.y1 > box.y0):
        raise GradcamError(f"{where}: empty box (x1 must exceed x0 and y1 must exceed y0)")
    table.setdefault(_key(rel), []).append(box)


def read_boxes_csv(path: Path, resolve: LabelResolver) -> dict[str, list[Box]]:
    """CSV `path,x0,y0,x1,y1,label` with a header row."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise GradcamError(f"--boxes {path}: cannot read ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    needed = ["path", "x0", "y0", "x1", "y1", "label"]
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if not all(col in header for col in needed):
        raise GradcamError(f"--boxes {path}: expected a header row with columns {','.join(needed)}")
    reader.fieldnames = header
    table: dict[str, list[Box]] = {}
    for line, row in enumerate(reader, start=2):
        where = f"--boxes {path} line {line}"
        if not row.get("path"):
            raise GradcamError(f"{where}: empty path")
        x0, y0, x1, y1 = (_number(row.get(c) or "", where) for c in ("x0", "y0", "x1", "y1"))
        _add(table, row["path"], Box(x0, y0, x1, y1, resolve(row.get("label") or "", where)), where)
    return table


def read_coco(path: Path, resolve: LabelResolver) -> dict[str, list[Box]]:
    """COCO detection JSON: bbox [x, y, width, height]; labels are category names (ids as a fallback)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GradcamError(f"--boxes {path}: not readable COCO JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise GradcamError(f"--boxes {path}: expected COCO JSON with 'images', 'annotations' and 'categories'")
    images = {img.get("id"): str(img.get("file_name", "")) for img in data["images"] if isinstance(img, dict)}
    categories: dict[object, int] = {}
    for cat in data.get("categories") or []:
        if not isinstance(cat, dict):
            continue
        index = resolve.resolve_optional(str(cat.get("name", "")))
        if index is None:
            index = resolve.resolve_optional(str(cat.get("id", "")))
        if index is not None:
            categories[cat.get("id")] = index
    table: dict[str, list[Box]] = {}
    for n, ann in enumerate(data.get("annotations") or []):
        where = f"--boxes {path} annotation {n}"
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            raise GradcamError(f"{where}: no image with id {ann.get('image_id') if isinstance(ann, dict) else '?'}")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise GradcamError(f"{where}: bbox must be [x, y, width, height]")
        x, y, w, h = (_number(str(v), where) for v in bbox)
        if ann.get("category_id") not in categories:
            names = {c.get("id"): c.get("name") for c in data.get("categories") or [] if isinstance(c, dict)}
            name = names.get(ann.get("category_id"), ann.get("category_id"))
            raise GradcamError(f"{where}: category '{name}' is not one of the model's classes")
        _add(table, images[ann["image_id"]], Box(x, y, x + w, y + h, categories[ann["category_id"]]), where)
    return table


def read_voc(folder: Path, resolve: LabelResolver) -> dict[str, list[Box]]:
    """Every *.xml under `folder` (Pascal VOC): 1-based inclusive pixel boxes -> half-open 0-based."""
    table: dict[str, list[Box]] = {}
    files = sorted(folder.rglob("*.xml"))
    if not files:
        raise GradcamError(f"--boxes {folder}: a folder without Pascal VOC .xml files")
    for xml in files:
        where = f"--boxes {xml}"
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as exc:
            raise GradcamError(f"{where}: not readable XML ({exc})") from None
        rel_dir = xml.parent.relative_to(folder).as_posix()
        filename = (root.findtext("filename") or "").strip() or xml.stem
        rel = posixpath.join(rel_dir, filename) if rel_dir != "." else filename
        for obj in root.iter("object"):
            box = obj.find("bndbox")
            name = (obj.findtext("name") or "").strip()
            if box is None:
                raise GradcamError(f"{where}: <object> '{name}' without <bndbox>")
            xmin, ymin, xmax, ymax = (
                _number(box.findtext(tag) or "", where) for tag in ("xmin", "ymin", "xmax", "ymax")
            )
            _add(table, rel, Box(xmin - 1, ymin - 1, xmax, ymax, resolve(name, where)), where)
        if not any(True for _ in root.iter("object")):
            table.setdefault(_key(rel), [])
    return table


def load_annotations(boxes: str | None, masks: str | None, labels: Sequence[str]) -> Annotations:
    """Read `--boxes` (CSV, COCO JSON or a VOC folder, by what it is) and check `--masks`; labels resolve now."""
    resolve = LabelResolver(labels)
    table: dict[str, list[Box]] = {}
    source = []
    if boxes:
        path = Path(boxes)
        if path.is_dir():
            table = read_voc(path, resolve)
        elif not path.is_file():
            raise GradcamError(f"--boxes {path}: no such file or folder")
        elif path.suffix.lower() == ".json":
            table = read_coco(path, resolve)
        else:
            table = read_boxes_csv(path, resolve)
        source.append(str(path))
    mask_dir = None
    if masks:
        mask_dir = Path(masks)
        if not mask_dir.is_dir():
            raise GradcamError(f"--masks {mask_dir}: not a folder")
        source.append(str(mask_dir))
    return Annotations(boxes=table, masks=mask_dir, source=", ".join(source))


def read_mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A mask PNG as an (H, W) bool array at the image's size (nearest-neighbour resize when it differs)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        gray = im.convert("L")
        height, width = size
        if gray.size != (width, height):
            gray = gray.resize((width, height), Image.Resampling.NEAREST)
        return np.asarray(gray) > 0
