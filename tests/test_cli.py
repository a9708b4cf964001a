"""The `gradcam` command end to end: outputs, CSV, run.json, exit codes, error lines, and start-up cost.

Most runs go through Click's CliRunner (one torch import for the whole file); a few are real subprocesses
of the installed console script and of `python -m gradcam_cli`. Models are torchvision's resnet18 with
random weights (`--weights none`): nothing is downloaded.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import Result
from helpers import assert_click_usage_error, assert_usage_error, explain, invoke, rows_of
from PIL import Image
from torchvision.models import ResNet18_Weights

from gradcam_cli import __version__

CSV_HEADER = (
    "path,status,error,pred_index,pred_label,pred_prob,target_index,target_label,target_prob,"
    "method,layer,cam_max,peak_x,peak_y,heatmap,overlay,"
    # appended later (the contract allows new columns at the end only); the metric columns are empty without
    # --metrics
    "true_index,true_label,correct,guided,"
    "deletion_auc,insertion_auc,avg_drop,increase,pointing_hit,energy_in_box,"
    "randomization,random_logit,max_sensitivity,sparseness,complexity,road_morf,road_lerf,road_combined"
)
# resnet18 downsamples by 32; its weights' transforms feed it 224 px, so layer4 is 7x7 for any image size
RESNET_STRIDE = 32
DEFAULT_INPUT = ResNet18_Weights.DEFAULT.transforms().crop_size[0]
LAYER4_SIZE = DEFAULT_INPUT // RESNET_STRIDE
FAST_INPUT = 64  # see the `fast` fixture


# --- helpers ------------------------------------------------------------------------------------------------


def run_json(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def heatmap_of(out: Path, row: dict[str, str]) -> np.ndarray:
    img = Image.open(out / row["heatmap"])
    assert img.mode == "L", f"{row['heatmap']} is {img.mode}, not 8-bit grayscale"
    return np.asarray(img)


def assert_peak_is_heatmap_argmax(out: Path, row: dict[str, str]) -> bool:
    """peak_x/peak_y inside the image and on a 255 pixel of the saved heatmap; returns whether it is non-zero."""
    heat = heatmap_of(out, row)
    x, y = int(row["peak_x"]), int(row["peak_y"])
    assert 0 <= x < heat.shape[1] and 0 <= y < heat.shape[0], (row, heat.shape)
    if heat.max() == 0:
        return False
    assert heat.max() == 255, f"{row['heatmap']}: a non-zero map must be normalised to 255"
    assert heat[y, x] == 255, f"{row['path']}: peak ({x}, {y}) holds {heat[y, x]}, not the maximum 255"
    return True


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`-c small.yaml`: a 64 px model input (layer4 2x2), ~12x less compute than the default 224 px.

    Used by the tests about naming, targets, exit codes; the shared full run and the crop test keep 224 px.
    """
    cfg = tmp_path_factory.mktemp("cfg") / "small.yaml"
    cfg.write_text(f"input_size: {FAST_INPUT}\n", encoding="utf-8")
    return ["-c", str(cfg)]


# --- one full run shared by several tests -------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(image_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("full") / "out"
    result = explain(image_dir, out, "--save", "heatmap,overlay,npy", "--batch-size", "3")
    return result, out


def test_full_run_exits_0_and_writes_everything(full_run: tuple[Result, Path], image_rels: list[str]) -> None:
    result, out = full_run
    assert result.exit_code == 0, result.output
    assert files_under(out / "heatmaps") == {f"{rel}.png" for rel in image_rels}
    assert files_under(out / "overlays") == {f"{rel}.jpg" for rel in image_rels}
    assert files_under(out / "npy") == {f"{rel}.npy" for rel in image_rels}
    assert (out / "predictions.csv").is_file() and (out / "run.json").is_file()
    # the a.jpg / a.png pair keeps both extensions and never collides
    for kind, ext in (("heatmaps", "png"), ("overlays", "jpg"), ("npy", "npy")):
        assert (out / kind / "sub" / f"a.jpg.{ext}").is_file()
        assert (out / kind / "sub" / f"a.png.{ext}").is_file()
    # two different images, two different overlays: neither output overwrote the other
    assert (out / "overlays/sub/a.jpg.jpg").read_bytes() != (out / "overlays/sub/a.png.jpg").read_bytes()


def test_csv_header_and_rows(full_run: tuple[Result, Path], image_rels: list[str]) -> None:
    _, out = full_run
    first_line = (out / "predictions.csv").read_text(encoding="utf-8").splitlines()[0]
    assert first_line == CSV_HEADER
    rows = rows_of(out)
    # one row per image, relative to the INPUT root, in sorted order; non-image files ignored
    assert [r["path"] for r in rows] == image_rels
    labels = ResNet18_Weights.DEFAULT.meta["categories"]
    for row in rows:
        assert row["status"] == "ok" and row["error"] == ""
        assert row["method"] == "gradcam"
        assert row["layer"] == "layer4"
        pred = int(row["pred_index"])
        assert 0 <= pred < 1000
        assert row["pred_label"] == labels[pred]
        # default target is the prediction
        assert row["target_index"] == row["pred_index"] and row["target_label"] == row["pred_label"]
        assert row["target_prob"] == row["pred_prob"]
        assert 0.0 < float(row["pred_prob"]) <= 1.0
        assert float(row["cam_max"]) >= 0.0
        assert row["heatmap"] == f"heatmaps/{row['path']}.png"
        assert row["overlay"] == f"overlays/{row['path']}.jpg"
        assert not Path(row["heatmap"]).is_absolute() and (out / row["heatmap"]).is_file()
        assert (out / row["overlay"]).is_file()


def test_heatmaps_and_overlays_have_the_original_size(
    full_run: tuple[Result, Path], image_size: tuple[int, int]
) -> None:
    WIDTH, HEIGHT = image_size
    _, out = full_run
    for row in rows_of(out):
        heat = Image.open(out / row["heatmap"])
        assert heat.format == "PNG" and heat.mode == "L" and heat.size == (WIDTH, HEIGHT)
        overlay = Image.open(out / row["overlay"])
        # grayscale and RGBA inputs too: the overlay is always RGB
        assert overlay.format == "JPEG" and overlay.mode == "RGB" and overlay.size == (WIDTH, HEIGHT)


def test_peaks_are_the_heatmap_argmax(full_run: tuple[Result, Path]) -> None:
    _, out = full_run
    nonzero = [assert_peak_is_heatmap_argmax(out, row) for row in rows_of(out)]
    assert any(nonzero), "every heatmap is empty: the peak check tested nothing"


def test_npy_is_float32_at_layer_resolution_and_matches_heatmap(
    full_run: tuple[Result, Path], image_size: tuple[int, int]
) -> None:
    WIDTH, HEIGHT = image_size
    _, out = full_run
    for row in rows_of(out):
        cam = np.load(out / "npy" / f"{row['path']}.npy")
        assert cam.dtype == np.float32
        assert cam.shape == (LAYER4_SIZE, LAYER4_SIZE)  # 7x7: 224 px input / stride 32
        assert np.isfinite(cam).all() and (cam >= 0).all()  # Grad-CAM is ReLU'd
        assert float(row["cam_max"]) == pytest.approx(float(cam.max()), rel=1e-4, abs=1e-7)
        # the heatmap is the CAM, upsampled bilinearly to the original size, min-max scaled to 0..255
        up = F.interpolate(
            torch.from_numpy(cam)[None, None], size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        span = up.max() - up.min()
        expected = np.round((up - up.min()) / span * 255) if span > 0 else np.zeros_like(up)
        diff = np.abs(expected.astype(np.int16) - heatmap_of(out, row).astype(np.int16))
        assert diff.max() <= 1, f"{row['path']}: heatmap differs from its CAM by up to {diff.max()}"


def test_run_json_records_the_run(full_run: tuple[Result, Path], image_rels: list[str]) -> None:
    _, out = full_run
    info = run_json(out)
    assert info["model"] == "resnet18"
    assert info["weights"] == "none"
    assert info["layers"] == ["layer4"]
    assert info["method"] == "gradcam"
    pre = info["preprocessing"]
    assert pre["size"] == [DEFAULT_INPUT, DEFAULT_INPUT]
    assert pre["mode"] == "full"
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert info["device"] == "cpu"
    versions = info["versions"]
    assert versions["gradcam_cli"] == __version__
    assert versions["torch"] == torch.__version__
    assert versions["torchvision"] and versions["python"]
    assert info["counts"]["ok"] == len(image_rels)
    assert info["counts"]["error"] == 0
    assert info["wall_seconds"] > 0
    assert info["images_per_second"] > 0
    assert info["images_per_second"] == pytest.approx(len(image_rels) / info["wall_seconds"], rel=0.05)


# --- exit 1: a corrupt file among good ones -----------------------------------------------------------------


def test_corrupt_files_become_error_rows_with_workers(mixed_dir: Path, tmp_path: Path, fast: list[str]) -> None:
    out = tmp_path / "out"
    result = invoke(
        "explain",
        mixed_dir,
        "-o",
        out,
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--workers",
        "2",
        "--batch-size",
        "2",
        "-q",
        *fast,
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    rows = rows_of(out)
    assert [r["path"] for r in rows] == sorted(
        ["good1.png", "good2.jpg", "sub/good3.png", "broken.jpg", "sub/trunc.jpg"]
    )
    by_path = {r["path"]: r for r in rows}
    for bad in ("broken.jpg", "sub/trunc.jpg"):
        row = by_path[bad]
        assert row["status"] == "error"
        assert row["error"].strip() and "\n" not in row["error"] and "\r" not in row["error"]
        assert row["heatmap"] == "" and row["overlay"] == "" and row["pred_index"] == ""
    for good in ("good1.png", "good2.jpg", "sub/good3.png"):
        row = by_path[good]
        assert row["status"] == "ok" and row["error"] == ""
        assert (out / row["heatmap"]).is_file() and (out / row["overlay"]).is_file()
        assert_peak_is_heatmap_argmax(out, row)
    assert not (out / "heatmaps" / "broken.jpg.png").exists()
    counts = run_json(out)["counts"]
    assert (counts["ok"], counts["error"]) == (3, 2)


def test_single_corrupt_file_exits_1(corrupt_file: Path, tmp_path: Path, fast: list[str]) -> None:
    result = explain(corrupt_file, tmp_path / "out", *fast)
    assert result.exit_code == 1, result.output
    (row,) = rows_of(tmp_path / "out")
    assert row["path"] == "broken.jpg" and row["status"] == "error" and row["error"]


# --- options ------------------------------------------------------------------------------------------------


def test_limit_takes_the_first_images_in_sorted_order(
    image_dir: Path, image_rels: list[str], tmp_path: Path, fast: list[str]
) -> None:
    out = tmp_path / "out"
    result = explain(image_dir, out, *fast, "--limit", "2", "--save", "heatmap")
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert [r["path"] for r in rows] == image_rels[:2]
    assert all(r["overlay"] == "" for r in rows)
    assert not (out / "overlays").exists()
    assert run_json(out)["counts"] == {"images": 2, "ok": 2, "error": 0}


def test_topk_targets_get_a_class_suffix(image_dir: Path, tmp_path: Path, fast: list[str]) -> None:
    out = tmp_path / "out"
    result = explain(image_dir / "sub", out, *fast, "--target", "topk:3", "--save", "heatmap,overlay,npy")
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    paths = [r["path"] for r in rows]
    assert paths[:6] == ["a.jpg"] * 3 + ["a.png"] * 3
    for rel in ("a.jpg", "a.png"):
        image_rows = [r for r in rows if r["path"] == rel]
        assert len(image_rows) == 3
        targets = [int(r["target_index"]) for r in image_rows]
        assert len(set(targets)) == 3
        assert targets[0] == int(image_rows[0]["pred_index"])  # top-1 is the prediction
        probs = [float(r["target_prob"]) for r in image_rows]
        assert probs == sorted(probs, reverse=True)
        for r, k in zip(image_rows, targets, strict=True):
            assert r["heatmap"] == f"heatmaps/{rel}__{k}.png"
            assert r["overlay"] == f"overlays/{rel}__{k}.jpg"
            assert (out / r["heatmap"]).is_file() and (out / r["overlay"]).is_file()
            assert (out / "npy" / f"{rel}__{k}.npy").is_file()
            assert_peak_is_heatmap_argmax(out, r)
    assert not (out / "heatmaps" / "a.jpg.png").exists()


def test_fixed_class_index_target(image_dir: Path, tmp_path: Path, fast: list[str]) -> None:
    out = tmp_path / "out"
    result = explain(image_dir, out, *fast, "--target", "5", "--limit", "2", "--save", "heatmap")
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert len(rows) == 2
    for row in rows:
        assert row["target_index"] == "5"
        assert row["target_label"] == ResNet18_Weights.DEFAULT.meta["categories"][5]
        assert row["heatmap"] == f"heatmaps/{row['path']}.png"  # a single target: no suffix
        assert_peak_is_heatmap_argmax(out, row)


def test_pred_target_matches_prediction(image_dir: Path, tmp_path: Path, fast: list[str]) -> None:
    out = tmp_path / "out"
    result = explain(image_dir, out, *fast, "--target", "pred", "--limit", "2", "--save", "heatmap")
    assert result.exit_code == 0, result.output
    for row in rows_of(out):
        assert row["target_index"] == row["pred_index"] and row["target_prob"] == row["pred_prob"]


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [("layer4", "layer4"), ("layer4.-1", "layer4.1"), ("layer4[-1]", "layer4.1"), ("layer3", "layer3")],
)
def test_layer_spellings(image_dir: Path, tmp_path: Path, spec: str, canonical: str, fast: list[str]) -> None:
    out = tmp_path / "out"
    result = explain(image_dir, out, *fast, "--layer", spec, "--limit", "1", "--save", "heatmap,npy")
    assert result.exit_code == 0, result.output
    (row,) = rows_of(out)
    assert row["layer"] == canonical
    assert run_json(out)["layers"] == [canonical]
    side = FAST_INPUT // RESNET_STRIDE * (2 if canonical == "layer3" else 1)  # layer3 has stride 16
    assert np.load(out / "npy" / f"{row['path']}.npy").shape == (side, side)


def test_config_input_size_sets_the_layer_resolution(
    image_dir: Path, tmp_path: Path, image_size: tuple[int, int]
) -> None:
    WIDTH, HEIGHT = image_size
    cfg = tmp_path / "small.yaml"
    cfg.write_text("input_size: 64\nsave: [heatmap, npy]\n", encoding="utf-8")
    out = tmp_path / "out"
    result = explain(image_dir, out, "-c", str(cfg), "--limit", "2")
    assert result.exit_code == 0, result.output
    for row in rows_of(out):
        cam = np.load(out / "npy" / f"{row['path']}.npy")
        assert cam.dtype == np.float32 and cam.shape == (64 // RESNET_STRIDE, 64 // RESNET_STRIDE)  # 2x2
        assert np.asarray(Image.open(out / row["heatmap"])).shape == (HEIGHT, WIDTH)


def test_preprocess_crop_leaves_heatmap_zero_outside_the_crop(
    image_dir: Path, tmp_path: Path, image_size: tuple[int, int]
) -> None:
    WIDTH, HEIGHT = image_size
    out = tmp_path / "out"
    result = explain(image_dir, out, "--preprocess", "crop", "--save", "heatmap,overlay")
    assert result.exit_code == 0, result.output
    tf = ResNet18_Weights.DEFAULT.transforms()
    side = min(WIDTH, HEIGHT) * tf.crop_size[0] / tf.resize_size[0]  # 48 * 224/256 = 42 original pixels
    x0, y0 = (WIDTH - side) / 2, (HEIGHT - side) / 2  # centred: x 11..53, y 3..45
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    outside = (xx < x0 - 1) | (xx >= x0 + side + 1) | (yy < y0 - 1) | (yy >= y0 + side + 1)
    assert outside.any() and (~outside).any()
    nonzero_maps = 0
    for row in rows_of(out):
        heat = heatmap_of(out, row)
        assert heat.shape == (HEIGHT, WIDTH)
        assert (heat[outside] == 0).all(), f"{row['path']}: heatmap non-zero outside the center crop"
        if heat.max() > 0:
            nonzero_maps += 1
            assert not outside[int(row["peak_y"]), int(row["peak_x"])]
        assert_peak_is_heatmap_argmax(out, row)
        assert Image.open(out / row["overlay"]).size == (WIDTH, HEIGHT)
    assert nonzero_maps > 0
    assert run_json(out)["preprocessing"]["mode"] == "crop"


def test_paths_are_relative_to_each_input_root(image_dir: Path, tmp_path: Path, fast: list[str]) -> None:
    out = tmp_path / "out"
    result = explain([image_dir / "sub", image_dir / "b.png"], out, *fast, "--save", "heatmap")
    assert result.exit_code == 0, result.output
    paths = [r["path"] for r in rows_of(out)]
    assert paths == ["a.jpg", "a.png", "deeper/g.bmp", "deeper/r.WEBP", "deeper/t.TiFF", "b.png"]
    assert (out / "heatmaps" / "deeper" / "g.bmp.png").is_file()
    assert (out / "heatmaps" / "b.png.png").is_file()


def test_python_api_takes_one_folder_as_str_or_path(image_dir: Path, tmp_path: Path) -> None:
    """`gradcam_cli.explain("photos", "out")` as a notebook writes it: one input, not a list of its letters."""
    import gradcam_cli

    rows = {}
    for name, inputs in (("list", [image_dir / "sub"]), ("path", image_dir / "sub"), ("str", str(image_dir / "sub"))):
        summary = gradcam_cli.explain(
            inputs, tmp_path / name, model="resnet18", weights="none", input_size=64, workers=0, quiet=True
        )
        assert summary.errors == 0 and summary.ok == 5, summary
        rows[name] = [r["path"] for r in rows_of(tmp_path / name)]
    assert (
        rows["path"]
        == rows["str"]
        == rows["list"]
        == ["a.jpg", "a.png", "deeper/g.bmp", "deeper/r.WEBP", "deeper/t.TiFF"]
    )


def test_extensions_in_any_case(tmp_path: Path, make_image: Callable[..., Path], fast: list[str]) -> None:
    src = tmp_path / "src"
    names = ["a.JPEG", "b.Png", "c.BMP", "d.webp", "e.TIF", "f.tiff", "g.jpg"]
    for i, name in enumerate(names):
        make_image(src / name, seed=30 + i)
    (src / "h.svg").write_bytes(b"<svg/>")  # not a listed extension: ignored
    out = tmp_path / "out"
    result = explain(src, out, *fast, "--save", "heatmap")
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in rows_of(out)] == sorted(names)


def test_config_precedence_through_the_cli(image_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: resnet50\nweights: none\nworkers: 0\nquiet: true\ntargets: topk:2\n"
        "save: [heatmap]\nlimit: 1\ninput_size: 64\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = invoke("explain", image_dir, "-o", out, "-c", cfg, "--model", "resnet18", "--target", "pred")
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert len(rows) == 1  # limit from the config
    assert rows[0]["target_index"] == rows[0]["pred_index"]  # --target beats the config's topk:2
    assert rows[0]["heatmap"] and rows[0]["overlay"] == ""  # save from the config
    assert run_json(out)["model"] == "resnet18"  # --model beats the config
    assert result.stderr == ""  # quiet from the config


# --- exit 2: usage, config, model, layer errors -------------------------------------------------------------


def test_unknown_layer_lists_nearest_names(image_dir: Path, tmp_path: Path) -> None:
    line = assert_usage_error(explain(image_dir, tmp_path / "out", "--layer", "layer5"), "layer5")
    assert "layer4" in line


def test_unknown_nested_layer(image_dir: Path, tmp_path: Path) -> None:
    assert_usage_error(explain(image_dir, tmp_path / "out", "--layer", "layer4.conv9"), "layer4.conv9", "layer4.")


def test_unknown_model_suggests_the_near_name(image_dir: Path, tmp_path: Path) -> None:
    # without -q too: an error must still be the only line on stderr
    result = invoke("explain", image_dir, "-o", tmp_path / "out", "--model", "resnet81", "--weights", "none")
    assert_usage_error(result, "resnet81", "resnet18")


def test_unavailable_cuda_device(image_dir: Path, tmp_path: Path) -> None:
    # on a CPU machine `cuda` is absent; on a GPU machine an index past the last device is
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    assert_usage_error(explain(image_dir, tmp_path / "out", "--device", device), device)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--batch-size", "0"], "batch"),
        (["--batch-size", "-4"], "batch"),
        (["--workers", "-1"], "workers"),
        (["--limit", "0"], "limit"),
        (["--alpha", "1.5"], "alpha"),
        (["--save", "heatmap,pdf"], "save"),
        (["--target", "topk:0"], "topk"),
        (["--target", "no-such-class-name"], "no-such-class-name"),
        (["--target", "5000"], "5000"),
        (["--device", "tpu"], "device"),
    ],
)
def test_bad_option_values_exit_2(
    image_dir: Path, tmp_path: Path, args: list[str], needle: str, fast: list[str]
) -> None:
    assert_usage_error(explain(image_dir, tmp_path / "out", *fast, *args), needle)


def test_config_errors_exit_2(image_dir: Path, tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("colour_map: jet\n", encoding="utf-8")
    assert_usage_error(explain(image_dir, tmp_path / "o1", "-c", str(unknown)), "colour_map", "colormap")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("alpha: lots\n", encoding="utf-8")
    assert_usage_error(explain(image_dir, tmp_path / "o2", "-c", str(wrong)), "config key 'alpha'")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_missing_inputs_exit_2(tmp_path: Path) -> None:
    assert_usage_error(explain(tmp_path / "nothing-here", tmp_path / "out"), "nothing-here")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images", encoding="utf-8")
    assert_usage_error(explain(empty, tmp_path / "out2"), "no images")


def test_click_usage_errors_exit_2(image_dir: Path, tmp_path: Path) -> None:
    assert_click_usage_error(invoke("explain", image_dir))  # no -o
    assert_click_usage_error(invoke("explain", "-o", tmp_path / "out"))  # no INPUT
    assert_click_usage_error(explain(image_dir, tmp_path / "out", "--preprocess", "stretch"))
    assert_click_usage_error(explain(image_dir, tmp_path / "out", "--batch-size", "many"))
    assert_click_usage_error(explain(image_dir, tmp_path / "out", "-c", tmp_path / "missing.yaml"))
    assert_click_usage_error(invoke("explain", image_dir, "-o", tmp_path / "out", "--no-such-flag"))


# --- other commands -----------------------------------------------------------------------------------------


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert __version__ in result.output and "gradcam" in result.output


def test_help_lists_commands_and_options() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("explain", "layers", "models"):
        assert re.search(rf"^\s+{command}\b", result.output, re.M), command
    explain_help = invoke("explain", "--help")
    assert explain_help.exit_code == 0
    for flag in (
        "--out",
        "--config",
        "--model",
        "--weights",
        "--layer",
        "--target",
        "--batch-size",
        "--device",
        "--workers",
        "--save",
        "--preprocess",
        "--limit",
    ):
        assert flag in explain_help.output, flag


def test_layers_command_marks_layer4_as_auto_detected() -> None:
    result = invoke("layers", "resnet18")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "auto-detected layer: layer4" in lines[0]
    (picked,) = [ln for ln in lines if ln.startswith(">")]
    assert picked.split()[1] == "layer4" and "512x7x7" in picked
    layer3 = next(ln for ln in lines if ln.split()[1:2] == ["layer3"])
    assert layer3.startswith("*") and "256x14x14" in layer3
    assert any(ln.split()[1:2] == ["layer4.1.conv2"] and "512x7x7" in ln for ln in lines)


def test_layers_command_unknown_model_exits_2() -> None:
    assert_usage_error(invoke("layers", "resnet81"), "resnet18")


def test_models_command_lists_resnet18() -> None:
    result = invoke("models")
    assert result.exit_code == 0, result.output
    names = [ln.split()[0] for ln in result.stdout.splitlines()[1:] if ln.strip()]
    assert "resnet18" in names and "densenet121" in names and "mobilenet_v2" in names
    line = next(ln for ln in result.stdout.splitlines() if ln.split()[:1] == ["resnet18"])
    assert "224" in line and "IMAGENET1K_V1" in line


# --- real processes: console script, python -m, start-up cost ----------------------------------------------

RunProcess = Callable[..., Any]


def test_help_does_not_import_torch(gradcam_exe: Path, run_process: RunProcess) -> None:
    code = (
        "import sys\n"
        "from gradcam_cli.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exc:\n"
        "    sys.stderr.write(f'EXIT={exc.code} TORCH={\"torch\" in sys.modules}\\n')\n"
    )
    proc = run_process([sys.executable, "-c", code])
    assert "EXIT=0 TORCH=False" in proc.stderr, proc.stderr
    assert "explain" in proc.stdout
    proc = run_process([gradcam_exe, "--help"])  # the console script too (start-up time: bench/bench.py)
    assert proc.returncode == 0 and "explain" in proc.stdout


def test_config_error_does_not_import_torch(
    gradcam_exe: Path, run_process: RunProcess, image_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet18\nbatch_sise: 4\n", encoding="utf-8")
    cmd = [gradcam_exe, "explain", image_dir, "-o", tmp_path / "out", "-c", bad]

    proc = run_process(cmd, env_extra={"PYTHONPROFILEIMPORTTIME": "1"})
    imported = [ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")]
    assert imported, "import profiling produced nothing"
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")], "config error imported torch"
    other = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("import time:")]
    assert proc.returncode == 2
    assert len(other) == 1 and other[0].startswith("Error:") and "batch_sise" in other[0], other
    assert not (tmp_path / "out").exists()


def test_python_m_help_and_version(run_process: RunProcess) -> None:
    proc = run_process([sys.executable, "-m", "gradcam_cli", "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "explain" in proc.stdout and "layers" in proc.stdout and "models" in proc.stdout
    proc = run_process([sys.executable, "-m", "gradcam_cli", "--version"])
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_console_script_end_to_end_with_workers(
    gradcam_exe: Path,
    run_process: RunProcess,
    mixed_dir: Path,
    tmp_path: Path,
    image_size: tuple[int, int],
    fast: list[str],
) -> None:
    WIDTH, HEIGHT = image_size
    out = tmp_path / "out"
    proc = run_process(
        [
            gradcam_exe,
            "explain",
            mixed_dir,
            "-o",
            out,
            "--model",
            "resnet18",
            "--weights",
            "none",
            "--workers",
            "2",
            "--batch-size",
            "2",
            "--save",
            "heatmap,overlay,npy",
            *fast,
        ]
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = rows_of(out)
    assert {r["path"]: r["status"] for r in rows} == {
        "broken.jpg": "error",
        "good1.png": "ok",
        "good2.jpg": "ok",
        "sub/good3.png": "ok",
        "sub/trunc.jpg": "error",
    }
    for row in rows:
        if row["status"] == "ok":
            assert Image.open(out / row["heatmap"]).size == (WIDTH, HEIGHT)
            assert np.load(out / "npy" / f"{row['path']}.npy").shape == (FAST_INPUT // RESNET_STRIDE,) * 2
    info = run_json(out)
    assert info["counts"]["ok"] == 3 and info["counts"]["error"] == 2 and info["status"] == "complete"
