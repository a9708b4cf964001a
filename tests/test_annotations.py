"""Annotation readers: boxes CSV, COCO JSON, Pascal VOC folders and masks; labels resolved against class names.

Every reader returns half-open boxes in original pixels; a bad file is one GradcamError line naming the file,
the line or annotation, and what was wrong.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_cli.audit.annotations import Box, load_annotations, read_mask
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.labels import ANY_CLASS, LabelResolver

LABELS = ["tench", "goldfish", "great white shark", "tiger cat", "Egyptian cat"]


def test_label_resolver() -> None:
    resolve = LabelResolver(LABELS)
    assert resolve("3", "") == 3
    assert resolve("Tiger Cat", "") == 3  # case-insensitive
    assert resolve("great_white_shark", "") == 2  # _ is a space
    assert resolve("*", "") == ANY_CLASS
    with pytest.raises(GradcamError, match=r"here: label 'tiger kat' is not one of the model's classes; did you mean"):
        resolve("tiger kat", "here")
    with pytest.raises(GradcamError, match="class index 7 is out of range"):
        resolve("7", "here")


def test_boxes_csv(tmp_path: Path) -> None:
    path = tmp_path / "b.csv"
    path.write_text(
        "\ufeffPath,X0,y0,x1,y1,label\n"  # a BOM and capitals, as spreadsheets write them
        "cats/tom.jpg,1,2,30,40,tiger cat\n"
        "cats/tom.jpg,0.5,0.5,10.5,10.5,4\n"
        "./dogs/rex.png,0,0,5,5,*\n",
        encoding="utf-8",
    )
    ann = load_annotations(str(path), None, LABELS)
    assert ann.boxes_for("cats/tom.jpg", 3) == [Box(1, 2, 30, 40, 3)]
    assert ann.boxes_for("cats/tom.jpg", 4) == [Box(0.5, 0.5, 10.5, 10.5, 4)]
    assert ann.boxes_for("cats/tom.jpg", 0) == []
    assert ann.boxes_for("dogs/rex.png", 0) == [Box(0, 0, 5, 5, ANY_CLASS)]  # `*` is every class
    # looked up by path, then by the path without its extension: tom.png finds the boxes written for tom.jpg
    assert ann.boxes_for("cats/tom.png", 3) == [Box(1, 2, 30, 40, 3)]
    assert ann.boxes_for("dogs/rex.jpg", 3) == [Box(0, 0, 5, 5, ANY_CLASS)]
    assert ann.boxes_for("cats/tom.jpg/x.png", 3) == []
    assert ann.matched(["cats/tom.jpg"])[0] == 1 and ann.matched(["cats/jerry.jpg"])[0] == 0
    assert ann.matched(["cats/tom.jpg", "x.png"]) == (1, 2)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("path,x0,y0,x1\na.png,1,2,3\n", "header row with columns path,x0,y0,x1,y1,label"),
        ("path,x0,y0,x1,y1,label\na.png,1,2,zero,4,0\n", "line 2: 'zero' is not a number"),
        ("path,x0,y0,x1,y1,label\na.png,5,5,5,9,0\n", "line 2: empty box"),
        ("path,x0,y0,x1,y1,label\n,5,5,6,9,0\n", "line 2: empty path"),
        ("path,x0,y0,x1,y1,label\na.png,0,0,1,1,0\nb.png,0,0,1,1,dog\n", "line 3: label 'dog'"),
        ("path,x0,y0,x1,y1,label\na.png,0,0,inf,1,0\n", "not a finite number"),
    ],
)
def test_boxes_csv_errors_name_the_line(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "b.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(GradcamError) as exc:
        load_annotations(str(path), None, LABELS)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_coco_json(tmp_path: Path) -> None:
    path = tmp_path / "coco.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 7, "file_name": "a/x.jpg"}, {"id": 8, "file_name": "y.jpg"}],
                "categories": [
                    {"id": 1, "name": "Egyptian cat"},
                    {"id": 90, "name": "toothbrush"},
                    {"id": 2, "name": "x"},
                ],
                "annotations": [
                    {"image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 40]},
                    {"image_id": 8, "category_id": 2, "bbox": [0, 0, 1.5, 2.5]},
                ],
            }
        ),
        encoding="utf-8",
    )
    ann = load_annotations(str(path), None, LABELS)
    assert ann.boxes_for("a/x.jpg", 4) == [Box(10, 20, 40, 60, 4)]  # [x, y, w, h] -> x0, y0, x1, y1
    assert ann.boxes_for("y.jpg", 2) == [Box(0, 0, 1.5, 2.5, 2)]  # category id 2 names no class: used as index
    bad = json.loads(path.read_text())
    bad["annotations"].append({"image_id": 7, "category_id": 90, "bbox": [0, 0, 1, 1]})
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(GradcamError, match="annotation 2: category 'toothbrush' is not one of the model's classes"):
        load_annotations(str(path), None, LABELS)
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(GradcamError, match="expected COCO JSON"):
        load_annotations(str(path), None, LABELS)


def test_pascal_voc_folder(tmp_path: Path) -> None:
    voc = tmp_path / "voc"
    (voc / "sub").mkdir(parents=True)
    (voc / "sub" / "tom.xml").write_text(
        "<annotation><filename>tom.jpg</filename>"
        "<object><name>tiger cat</name>"
        "<bndbox><xmin>11</xmin><ymin>21</ymin><xmax>50</xmax><ymax>60</ymax></bndbox></object>"
        "<object><name>goldfish</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>1</xmax><ymax>1</ymax></bndbox></object>"
        "</annotation>",
        encoding="utf-8",
    )
    ann = load_annotations(str(voc), None, LABELS)
    # 1-based inclusive pixels 11..50 are 0-based 10..49, i.e. the half-open box [10, 50)
    assert ann.boxes_for("sub/tom.jpg", 3) == [Box(10, 20, 50, 60, 3)]
    assert ann.boxes_for("sub/tom.jpg", 1) == [Box(0, 0, 1, 1, 1)]  # a one-pixel box
    (voc / "sub" / "bad.xml").write_text("<annotation><object><name>tench</name></object>", encoding="utf-8")
    with pytest.raises(GradcamError, match=r"bad\.xml: not readable XML"):
        load_annotations(str(voc), None, LABELS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GradcamError, match=r"without Pascal VOC \.xml files"):
        load_annotations(str(empty), None, LABELS)


def test_masks_mirror_the_input_tree(tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    (masks / "cats").mkdir(parents=True)
    arr = np.zeros((10, 20), dtype=np.uint8)
    arr[2:5, 3:9] = 255
    Image.fromarray(arr).save(masks / "cats" / "tom.png")  # for cats/tom.jpg: extension replaced
    Image.fromarray(arr).save(masks / "cats" / "rex.webp.png")  # or extension kept, .png added
    ann = load_annotations(None, str(masks), LABELS)
    assert ann.mask_path("cats/tom.jpg") == masks / "cats" / "tom.png"
    assert ann.mask_path("cats/rex.webp") == masks / "cats" / "rex.webp.png"
    assert ann.mask_path("cats/none.jpg") is None
    mask = read_mask(masks / "cats" / "tom.png", (10, 20))
    assert mask.dtype == bool and mask.sum() == 18 and mask[2, 3] and not mask[5, 3]
    # a mask at another size is resized (nearest) to the image
    assert read_mask(masks / "cats" / "tom.png", (20, 40)).sum() == 72
    with pytest.raises(GradcamError, match="not a folder"):
        load_annotations(None, str(tmp_path / "nope"), LABELS)
