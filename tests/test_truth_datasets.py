"""Ground truth as datasets really come: WordNet-id folders (the ILSVRC layout), lemma lists, stray folders.

End to end with the offline ImageNet-trained EfficientNet-Lite0 on real photos (sample_images/chelsea.png is
an Egyptian cat, coffee.png an espresso; the demo model gets both right), plus LabelResolver unit checks.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from helpers import invoke

from gradcam_cli.audit.truth import resolve_truth
from gradcam_cli.model.labels import LabelResolver, imagenet_labels, imagenet_wordnet, is_imagenet

pytest.importorskip("efficientnet_lite_pytorch", reason="the demo extra is part of `make test`'s install")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "efficientnet_lite0.yaml"
PHOTOS = ROOT / "sample_images"
CAT_WNID, ESPRESSO_WNID = "n02124075", "n07920052"


def tree(root: Path, layout: dict[str, list[str]]) -> Path:
    for folder, photos in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for photo in photos:
            shutil.copy(PHOTOS / photo, root / folder / photo)
    return root


def run(inputs: Path, out: Path, *extra: str) -> tuple[int, list[dict[str, str]], dict]:
    result = invoke("explain", inputs, "-o", out, "-c", CONFIG, "--workers", "0", "-q", "--summary", *extra)
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return result.exit_code, rows, json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_the_wordnet_table_is_imagenet_in_class_order() -> None:
    names = imagenet_labels()
    table = imagenet_wordnet()
    assert len(table) == 1000 and len({wnid for wnid, _ in table}) == 1000
    assert table[285] == (CAT_WNID, ("Egyptian cat",)) and names[285] == "Egyptian cat"
    assert table[967][0] == ESPRESSO_WNID and names[967] == "espresso"
    assert is_imagenet(names) and not is_imagenet(names[1:] + names[:1]) and not is_imagenet(["cat", "dog"])


def test_label_resolver_takes_the_spellings_datasets_use() -> None:
    resolve = LabelResolver(imagenet_labels()).find
    assert resolve("n02123045") == resolve("tabby") == 281  # WordNet id, torchvision's name
    assert resolve("tabby, tabby cat") == 281  # the WordNet lemma list (Hugging Face's id2label spelling)
    assert resolve("Egyptian_Cat") == resolve("EGYPTIAN CAT") == 285
    assert resolve("sub") is None  # a later lemma of 'submarine': not matched, folder names like it are common
    assert resolve("n99999999") is None
    # a model whose names are the lemma lists (Hugging Face) matches torchvision's short names and WordNet ids
    lemma_lists = [", ".join(lemmas) for _, lemmas in imagenet_wordnet()]
    hf = LabelResolver(lemma_lists)
    assert hf.find("tabby") == hf.find("n02123045") == hf.find("tabby, tabby cat") == 281
    # a 3-class model knows no WordNet ids, but still the first lemma of a lemma list
    small = LabelResolver(["cat", "dog", "bird"])
    assert small.find("n02123045") is None and small.find("Dog, domestic dog") == 1 and not small.knows_wordnet


def test_wordnet_id_folders_give_ground_truth_and_accuracy(tmp_path: Path) -> None:
    val = tree(tmp_path / "val", {CAT_WNID: ["chelsea.png"], ESPRESSO_WNID: ["coffee.png"]})
    code, rows, summary = run(val, tmp_path / "out")
    assert code == 0
    assert {(r["path"], r["pred_label"], r["true_label"], r["correct"]) for r in rows} == {
        (f"{CAT_WNID}/chelsea.png", "Egyptian cat", "Egyptian cat", "true"),
        (f"{ESPRESSO_WNID}/coffee.png", "espresso", "espresso", "true"),
    }
    truth = summary["ground_truth"]
    assert (truth["source"], truth["images"], truth["correct"], truth["accuracy"]) == ("folders", 2, 2, 1.0)


def test_a_folder_that_is_no_class_affects_only_its_own_images(tmp_path: Path) -> None:
    val = tree(
        tmp_path / "val",
        {"Egyptian_cat": ["chelsea.png"], "espresso, expresso": ["coffee.png"], "misc": ["rocket.jpg"]},
    )
    code, rows, summary = run(val, tmp_path / "out")
    assert code == 0
    by_path = {r["path"]: r for r in rows}
    assert by_path["Egyptian_cat/chelsea.png"]["correct"] == "true"
    assert by_path["espresso, expresso/coffee.png"]["true_label"] == "espresso"
    assert by_path["misc/rocket.jpg"]["status"] == "ok" and by_path["misc/rocket.jpg"]["true_label"] == ""
    truth = summary["ground_truth"]
    assert (truth["source"], truth["images"], truth["accuracy"]) == ("folders", 2, 1.0)
    assert truth["unmatched"] == {"images": 1, "labels": ["misc"]}

    # --target label: the image without a class is an error row (it has no target), the others are explained
    code, rows, summary = run(val, tmp_path / "label", "--target", "label")
    assert code == 1
    by_path = {r["path"]: r for r in rows}
    assert by_path["misc/rocket.jpg"]["status"] == "error" and "'misc'" in by_path["misc/rocket.jpg"]["error"]
    assert by_path["Egyptian_cat/chelsea.png"]["target_label"] == "Egyptian cat"
    assert summary["ground_truth"]["accuracy"] == 1.0


def test_no_ground_truth_says_why(tmp_path: Path) -> None:
    photos = tree(tmp_path / "photos", {"holiday": ["chelsea.png"], "work": ["coffee.png"]})
    code, rows, summary = run(photos, tmp_path / "out")
    assert code == 0 and all(r["true_label"] == "" for r in rows)
    truth = summary["ground_truth"]
    assert truth["source"] is None and truth["images"] == 0
    assert "2 folder(s) ('holiday', 'work'), none is a class name or WordNet id of this model" in truth["reason"]

    flat = resolve_truth("auto", [str(PHOTOS)], imagenet_labels(), ["a.png", "b.png"])
    assert not flat.known and "not in class-named folders" in flat.reason
    assert "no class names" in resolve_truth("auto", [], [], ["x/a.png"]).reason
