"""`gradcam explain` with every method, several layers (fused or not), guided/ outputs and ground-truth labels.

Through Click's CliRunner with torchvision's resnet18 and random weights (`--weights none`), at a 64 px model
input (layer4 2x2, layer3 4x4, layer1 16x16) so each run takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_usage_error, explain, rows_of
from PIL import Image
from torchvision.models import ResNet18_Weights

from gradcam_cli.cli import main
from gradcam_cli.config import METHOD_NAMES

CATEGORIES = ResNet18_Weights.DEFAULT.meta["categories"]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cfg = tmp_path_factory.mktemp("cfg") / "small.yaml"
    cfg.write_text("input_size: 64\n", encoding="utf-8")
    return ["-c", str(cfg)]


@pytest.fixture(scope="module")
def two_images(tmp_path_factory: pytest.TempPathFactory, make_image: Any) -> Path:
    root = tmp_path_factory.mktemp("two") / "imgs"
    make_image(root / "a.png", seed=1, size=(80, 60))
    make_image(root / "sub" / "b.jpg", seed=2, size=(50, 70))
    return root


# ------------------------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_end_to_end(method: str, two_images: Path, tmp_path: Path, small: list[str]) -> None:
    out = tmp_path / "out"
    layer = "layer1" if method == "scorecam" else "layer4"  # Score-CAM: one forward per channel, keep it small
    args = ["--method", method, "--layer", layer, "--save", "heatmap,overlay,npy", "--chunk-size", "256"]
    result = explain(two_images, out, *small, *args)
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert [r["path"] for r in rows] == ["a.png", "sub/b.jpg"]
    sizes = {"a.png": (60, 80), "sub/b.jpg": (70, 50)}
    guided = method.startswith("guided")
    for row in rows:
        assert row["status"] == "ok" and row["method"] == method
        assert row["layer"] == ("input" if method == "guided-backprop" else layer)
        heat = np.asarray(Image.open(out / row["heatmap"]))
        assert heat.shape == sizes[row["path"]]
        assert (out / row["overlay"]).is_file()
        raw = np.load(out / f"npy/{row['path']}.npy")
        expected_npy = {"layer4": (2, 2), "layer1": (16, 16)}.get(layer)
        assert raw.shape == ((64, 64) if method == "guided-backprop" else expected_npy)
        assert float(row["cam_max"]) == pytest.approx(float(raw.max()), rel=1e-4, abs=1e-12)
        assert row["true_index"] == row["true_label"] == row["correct"] == ""
        if guided:
            assert row["guided"] == f"guided/{row['path']}.png"
            picture = Image.open(out / row["guided"])
            assert picture.mode == "RGB" and picture.size == sizes[row["path"]][::-1]
            assert np.load(out / f"guided/{row['path']}.npy").shape == (3, 64, 64)
        else:
            assert row["guided"] == ""
    assert (out / "guided").is_dir() == guided
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["method"] == method and info["method_options"]["fuse"] == "none"


def test_class_agnostic_eigencam_gives_one_map_for_every_class(
    two_images: Path, tmp_path: Path, small: list[str]
) -> None:
    result = explain(
        two_images, tmp_path / "out", *small, "--method", "eigencam", "--target", "topk:3", "--save", "npy"
    )
    assert result.exit_code == 0, result.output
    maps = [np.load(tmp_path / "out" / f"npy/a.png__{r['target_index']}.npy") for r in rows_of(tmp_path / "out")[:3]]
    assert np.array_equal(maps[0], maps[1]) and np.array_equal(maps[0], maps[2])


# ------------------------------------------------------------------------------------------ layers, fusion


def test_two_layers_one_map_each(two_images: Path, tmp_path: Path, small: list[str]) -> None:
    out = tmp_path / "out"
    result = explain(two_images, out, *small, "--layer", "layer3", "--layer", "layer4", "--save", "heatmap,npy")
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert [(r["path"], r["layer"]) for r in rows] == [
        ("a.png", "layer3"),
        ("a.png", "layer4"),
        ("sub/b.jpg", "layer3"),
        ("sub/b.jpg", "layer4"),
    ]
    assert rows[0]["heatmap"] == "heatmaps/a.png__layer3.png"
    assert np.load(out / "npy/a.png__layer3.npy").shape == (4, 4)
    assert np.load(out / "npy/a.png__layer4.npy").shape == (2, 2)


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_fused_layers_give_one_row_named_after_both(
    mode: str, two_images: Path, tmp_path: Path, small: list[str]
) -> None:
    out = tmp_path / "out"
    args = ["--layer", "layer3", "--layer", "layer4", "--fuse", mode, "--save", "heatmap,npy", "--target", "topk:2"]
    result = explain(two_images, out, *small, *args)
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert len(rows) == 4 and {r["layer"] for r in rows} == {"fused(layer3+layer4)"}
    target = rows[0]["target_index"]
    assert rows[0]["heatmap"] == f"heatmaps/a.png__{target}.png"  # no layer suffix: one map per target
    fused = np.load(out / f"npy/a.png__{target}.npy")
    assert fused.shape == (4, 4)  # the larger layer's resolution
    assert fused.min() >= 0.0 and fused.max() <= 1.0  # fusion works on per-layer normalised maps
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["method_options"]["fuse"] == mode


def test_module_input_as_layer(two_images: Path, tmp_path: Path, small: list[str]) -> None:
    """`--layer avgpool:input`: the map the pooling receives (equal to layer4's: see test_methods.py)."""
    out = tmp_path / "out"
    result = explain(two_images, out, *small, "--layer", "avgpool:input", "--method", "cam", "--save", "npy")
    assert result.exit_code == 0, result.output
    assert {r["layer"] for r in rows_of(out)} == {"avgpool:input"}
    assert np.load(out / "npy/a.png.npy").shape == (2, 2)


# ------------------------------------------------------------------------------------------- ground truth


@pytest.fixture
def labelled(tmp_path: Path, make_image: Any) -> Path:
    """ImageFolder layout: class-name folders (two spellings), an index folder, a non-class folder, a root file."""
    root = tmp_path / "labelled"
    make_image(root / "tabby" / "t1.png", seed=3)
    make_image(root / "Egyptian_cat" / "e1.png", seed=4)
    make_image(root / "7" / "c1.png", seed=5)  # class index 7
    make_image(root / "holiday" / "h1.png", seed=6)  # not a class name
    make_image(root / "loose.png", seed=7)  # no class folder
    return root


def test_target_label_from_folder_names(labelled: Path, tmp_path: Path, small: list[str]) -> None:
    """No labels.csv: `--target label` reads the parent folder names (names in any spelling, or an index)."""
    out = tmp_path / "out"
    result = explain(labelled, out, *small, "--target", "label")
    assert result.exit_code == 1, result.output  # two images have no ground truth: error rows
    rows = {r["path"]: r for r in rows_of(out)}
    expected = {"tabby/t1.png": 281, "Egyptian_cat/e1.png": 285, "7/c1.png": 7}
    for path, index in expected.items():
        row = rows[path]
        assert row["status"] == "ok", row
        assert int(row["target_index"]) == int(row["true_index"]) == index
        assert row["true_label"] == CATEGORIES[index]
        assert row["correct"] == ("true" if int(row["pred_index"]) == index else "false")
    for path in ("holiday/h1.png", "loose.png"):
        assert rows[path]["status"] == "error" and "--target label" in rows[path]["error"], rows[path]
    assert "'holiday' is not one of the model's classes" in rows["holiday/h1.png"]["error"]
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["ground_truth"] == "folders"


def test_target_label_from_labels_csv_in_the_folder(labelled: Path, tmp_path: Path, small: list[str]) -> None:
    """A labels.csv at the top of the input folder wins over folder names (`truth: auto`, as `gradcam audit`)."""
    (labelled / "labels.csv").write_text(
        "path,label\n7/c1.png,7\nEgyptian_cat/e1.png,tiger_cat\nholiday/h1.png,goldfish\nloose.png,3\n"
        "tabby/t1.png,tiger shark\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = explain(labelled, out, *small, "--target", "label", "--target", "pred")
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    truth = {r["path"]: int(r["true_index"]) for r in rows}
    assert truth == {"7/c1.png": 7, "Egyptian_cat/e1.png": 282, "holiday/h1.png": 1, "loose.png": 3, "tabby/t1.png": 3}
    for path in truth:
        mine = [r for r in rows if r["path"] == path]
        targets = {int(r["target_index"]) for r in mine}
        assert truth[path] in targets and int(mine[0]["pred_index"]) in targets  # label + pred slots
        assert {r["correct"] for r in mine} == {"true" if int(mine[0]["pred_index"]) == truth[path] else "false"}
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["ground_truth"] == str(labelled.resolve() / "labels.csv")


def test_truth_file_fills_the_truth_columns_for_any_target(two_images: Path, tmp_path: Path, small: list[str]) -> None:
    labels = tmp_path / "truth.csv"
    labels.write_text("path,label\na.png,Egyptian cat\n", encoding="utf-8")  # sub/b.jpg not listed
    out = tmp_path / "out"
    result = explain(two_images, out, *small, "--truth", labels)
    assert result.exit_code == 0, result.output
    rows = {r["path"]: r for r in rows_of(out)}
    assert rows["a.png"]["true_index"] == "285" and rows["a.png"]["true_label"] == "Egyptian cat"
    assert rows["a.png"]["target_index"] == rows["a.png"]["pred_index"]  # the target is still pred
    assert rows["a.png"]["correct"] in ("true", "false")
    assert rows["sub/b.jpg"]["true_index"] == rows["sub/b.jpg"]["correct"] == ""  # unknown: empty


def test_a_broken_labels_csv_does_not_stop_a_plain_run(two_images: Path, tmp_path: Path, small: list[str]) -> None:
    """`truth: auto` finds a labels.csv it cannot read: without --target label the run goes on, columns empty."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes((two_images / "a.png").read_bytes())
    (folder / "labels.csv").write_text("file;class\na.png;cat\n", encoding="utf-8")
    result = explain(folder, tmp_path / "out", *small)
    assert result.exit_code == 0, result.output
    assert rows_of(tmp_path / "out")[0]["true_index"] == ""
    assert_usage_error(explain(folder, tmp_path / "o2", *small, "--target", "label"), "path,label")


def test_ground_truth_errors_are_one_line(two_images: Path, tmp_path: Path, small: list[str]) -> None:
    assert_usage_error(explain(two_images, tmp_path / "o1", *small, "--target", "label"), "--target label")
    assert_usage_error(
        explain(two_images, tmp_path / "o2", *small, "--target", "label", "--truth", "none"), "--truth is none"
    )
    missing = tmp_path / "missing.csv"
    assert_usage_error(explain(two_images, tmp_path / "o3", *small, "--truth", missing), "missing.csv")
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


# ------------------------------------------------------------------------------------------ option errors


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--method", "eigencam", "--counterfactual"], ("--counterfactual", "class-agnostic")),
        (["--method", "eigencam", "--eigen-smooth"], ("--eigen-smooth",)),
        (["--fuse", "mean", "--layer", "layer4"], ("--fuse mean", "two or more")),
        (["--method", "cam", "--layer", "layer3"], ("cam", "layer3")),
        (["--chunk-size", "0"], ("--chunk-size",)),
        (["--layer", "nolayer:input"], ("nolayer",)),
    ],
)
def test_meaningless_combinations_exit_2_before_writing(
    args: list[str], needles: tuple[str, ...], two_images: Path, tmp_path: Path, small: list[str]
) -> None:
    assert_usage_error(explain(two_images, tmp_path / "out", *small, *args), *needles)
    assert not (tmp_path / "out").exists()


def test_flags_are_listed_in_help() -> None:
    output = CliRunner().invoke(main, ["explain", "--help"]).output
    for flag in ("--fuse", "--counterfactual", "--aug-smooth", "--eigen-smooth", "--chunk-size", "--truth"):
        assert flag in output, flag
    for name in ("gradcampp", "guided-gradcam", "ablationcam"):
        assert name in output


def test_flags_override_config(two_images: Path, tmp_path: Path, small: list[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("input_size: 64\nmethod: hirescam\ncounterfactual: true\neigen_smooth: true\n", encoding="utf-8")
    out = tmp_path / "out"
    result = explain(two_images, out, "-c", cfg, "--no-counterfactual", "--method", "layercam")
    assert result.exit_code == 0, result.output
    info: dict[str, Any] = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["method"] == "layercam"
    assert info["method_options"]["counterfactual"] is False and info["method_options"]["eigen_smooth"] is True


# ------------------------------------------------------------------------------------------------- resume


def test_resume_knows_fused_and_guided_outputs(two_images: Path, tmp_path: Path, small: list[str]) -> None:
    """--resume recognises complete rows of fused guided-gradcam maps (guided/ files included) and skips them;
    other method options are refused, as other settings are."""
    out = tmp_path / "out"
    args = [*small, "--method", "guided-gradcam", "--layer", "layer3", "--layer", "layer4", "--fuse", "max"]
    args += ["--target", "topk:2", "--save", "heatmap,npy"]
    assert explain(two_images, out, *args).exit_code == 0
    before = {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert any(name.startswith("guided/") for name in before)
    again = explain(two_images, out, *args, "--resume")
    assert again.exit_code == 0, again.output
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["resume"] == {"skipped": 2}
    assert {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    assert len(rows_of(out)) == 4
    # a missing guided/ picture makes its image be explained again
    for p in (out / "guided").glob("a.png__*.png"):
        p.unlink()
    assert explain(two_images, out, *args, "--resume").exit_code == 0
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["resume"] == {"skipped": 1}
    assert len(list((out / "guided").glob("a.png__*.png"))) == 2
    # --chunk-size only bounds memory: resuming with another one keeps everything; --counterfactual does not
    assert explain(two_images, out, *args, "--resume", "--chunk-size", "8").exit_code == 0
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["resume"] == {"skipped": 2}
    assert_usage_error(explain(two_images, out, *args, "--resume", "--counterfactual"), "method_options")


def test_resume_keeps_each_image_s_own_ground_truth(tmp_path: Path, make_image: Any, small: list[str]) -> None:
    """Images explained again after an interruption get their own true class (looked up by path, not by
    position in the shorter list of what is left): the result equals an uninterrupted run's."""
    root = tmp_path / "val"
    for i in range(2):
        make_image(root / "espresso" / f"e{i}.png", seed=20 + i)
        make_image(root / "tabby" / f"t{i}.png", seed=30 + i)
    args = [*small, "--target", "label", "--target", "pred", "--batch-size", "2"]
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert explain(root, whole, *args).exit_code == 0
    assert explain(root, out, *args).exit_code == 0
    for p in (out / "heatmaps" / "tabby").iterdir():  # the tabby images, last in input order, are done again
        p.unlink()
    assert explain(root, out, *args, "--resume").exit_code == 0
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["resume"] == {"skipped": 2}
    rows = rows_of(out)
    assert rows == rows_of(whole)
    assert {r["true_label"] for r in rows if r["path"].startswith("tabby/")} == {"tabby"}
    assert {r["target_label"] for r in rows if r["path"].startswith("tabby/")} >= {"tabby"}


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_under_bf16_autocast(method: str, two_images: Path, tmp_path: Path, small: list[str]) -> None:
    """`--amp bf16` on the CPU, every method: the run completes (methods' own passes included) and its maps
    are those of the float32 run up to bf16 rounding (bench/amp_fidelity.py measures how close on a real model)."""
    layer = {"scorecam": "layer1", "cam": "layer4"}.get(method, "layer3")
    maps = {}
    for amp in ("none", "bf16"):
        out = tmp_path / amp
        args = ["--method", method, "--layer", layer, "--save", "npy", "--chunk-size", "256", "--amp", amp]
        result = explain(two_images, out, *small, *args)
        assert result.exit_code == 0, result.output
        rows = rows_of(out)
        assert [r["status"] for r in rows] == ["ok", "ok"], rows
        assert json.loads((out / "run.json").read_text(encoding="utf-8"))["amp"] == amp
        maps[amp] = [np.load(out / f"npy/{r['path']}.npy") for r in rows]
    for full, half in zip(maps["none"], maps["bf16"], strict=True):
        assert half.dtype == np.float32 and half.shape == full.shape and np.isfinite(half).all()
        assert np.corrcoef(full.ravel(), half.ravel())[0, 1] > 0.97
        assert np.abs(full - half).max() < 0.25 * (full.max() - full.min())
