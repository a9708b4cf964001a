"""`gradcam diff OUT_A OUT_B`, `explain --compare-to` and `gradcam_cli.diff`: cases whose answer is known in
advance (tests/audit_models.py):

- the same run twice: every similarity exactly 1, no flip, exit 0;
- ColourNet and a checkpoint of it with the cat and dog rows of its head swapped: exactly the red and green
  images flip (and their maps, of each run's own prediction, are the same);
- HalfNet(left) vs HalfNet(right): the evidence on opposite halves, Spearman clearly negative, IoU 0, the peak
  shifted by about half the width, the gate fails with exit 3;
- mismatched folders: rows only in one run, error rows, no image in common, a folder that is not an output;
- the similarity maths against scikit-image and SciPy; the page in headless Chromium.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from audit_models import SIZE, SQUARES, colour_net, draw_square, make_world
from headless import Browser, find_chromium, open_page
from helpers import assert_usage_error, invoke
from PIL import Image

import gradcam_cli
from gradcam_cli.audit.diff.similarity import average_ranks, difference_picture, spearman, ssim, top_iou

CHROMIUM = find_chromium()
HALF = "model: tests.audit_models:half_net\nweights: none\ninput_size: 64\nmean: [0, 0, 0]\nstd: [1, 1, 1]\n"
HALF += "target_layers: [features]\nworkers: 0\nquiet: true\n"


def diff_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "diff.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def diff_json(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "diff.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("diffworld"))


@pytest.fixture(scope="module")
def run_a(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("a") / "out"
    result = invoke("explain", world["images"], "-o", out, "-c", world["cfg"], "--save", "heatmap,overlay,npy")
    assert result.exit_code == 0, result.output
    return out


# ----------------------------------------------------------------------------------------------- the maths


def test_spearman_and_ssim_equal_scipy_and_scikit_image() -> None:
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    for shape in [(7, 7), (14, 14), (48, 64)]:
        a = rng.random(shape)
        b = np.clip(a + rng.normal(0, 0.3, shape), 0, None)
        b[b < 0.3] = 0.0  # ties, as ReLU makes them
        assert spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)
        na, nb = (a - a.min()) / np.ptp(a), (b - b.min()) / np.ptp(b)
        assert ssim(a, b) == pytest.approx(structural_similarity(na, nb, data_range=1.0), abs=1e-9)
    ranks, _ = average_ranks(np.array([3.0, 1.0, 3.0, 2.0]))
    assert ranks.tolist() == [2.5, 0.0, 2.5, 1.0]


def test_identical_maps_are_similar_in_every_measure_and_opposite_halves_are_not() -> None:
    a = np.zeros((8, 8))
    a[:, :4] = np.arange(32).reshape(8, 4) + 1
    b = a[:, ::-1].copy()
    assert spearman(a, a) == ssim(a, a) == top_iou(a, a, 0.2) == 1.0
    assert spearman(a, b) < -0.5 and top_iou(a, b, 0.2) == 0.0 and ssim(a, b) < 0.2
    pic = difference_picture(a, b)
    assert pic.shape == (8, 8, 3) and pic.dtype == np.uint8
    assert tuple(pic[0, 0]) != tuple(pic[0, 7])  # red where A is higher, blue where B is


# ------------------------------------------------------------------------------------------ end to end


def test_the_same_run_twice_is_identical(run_a: Path, tmp_path: Path) -> None:
    result = invoke("diff", run_a, run_a, "-o", tmp_path / "d", "--fail-under", "p10:spearman=0.99")
    assert result.exit_code == 0, result.output
    rows = diff_rows(tmp_path / "d")
    assert [r["path"] for r in rows] == sorted(SQUARES)
    for r in rows:
        assert (r["status"], r["flipped"], r["maps"]) == ("compared", "false", "npy")
        assert float(r["spearman"]) == float(r["ssim"]) == float(r["iou"]) == 1.0 and float(r["peak_shift"]) == 0
    summary = diff_json(tmp_path / "d")
    assert summary["flips"]["rate"] == 0.0 and summary["settings"]["differ"] == {}
    assert summary["similarity"]["spearman"]["mean"] == 1.0 and summary["passed"] is True


def test_a_changed_head_flips_exactly_the_images_it_should(run_a: Path, world: dict[str, Path], tmp_path: Path) -> None:
    model = colour_net()
    state = model.state_dict()
    state["fc.weight"][[3, 5]] = state["fc.weight"][[5, 3]].clone()  # cat <-> dog
    state["fc.bias"][[3, 5]] = state["fc.bias"][[5, 3]].clone()
    torch.save(state, tmp_path / "swapped.pt")
    out_b = tmp_path / "b"
    args = ("--save", "heatmap,overlay,npy", "--weights", tmp_path / "swapped.pt")
    assert invoke("explain", world["images"], "-o", out_b, "-c", world["cfg"], *args).exit_code == 0
    result = invoke("diff", run_a, out_b, "--fail-over", "flips=10%")
    assert result.exit_code == 3, result.output
    assert "flips" in result.output and "above the maximum" in result.output
    rows = {r["path"]: r for r in diff_rows(out_b / "diff")}
    flipped = {p for p, r in rows.items() if r["flipped"] == "true"}
    red_or_green = {p for p, (colour, _) in SQUARES.items() if colour[2] < 200}
    assert flipped == red_or_green == {"cat/a.png", "cat/b.png", "dog/c.png"}
    assert rows["cat/a.png"]["pred_a"] == "cat" and rows["cat/a.png"]["pred_b"] == "dog"
    assert all(float(r["spearman"]) == 1.0 for r in rows.values())  # each run's map of its own prediction
    summary = diff_json(out_b / "diff")
    assert summary["flips"] == {
        "images": 4,
        "flipped": 3,
        "rate": 0.75,
        "per_class": [
            {"class": "bird", "images": 1, "flipped": 0, "rate": 0.0},
            {"class": "cat", "images": 1, "flipped": 1, "rate": 1.0},
            {"class": "dog", "images": 2, "flipped": 2, "rate": 1.0},
        ],
    }
    assert set(summary["settings"]["differ"]) == {"weights", "weights_digest"}


def test_evidence_on_opposite_halves(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):  # a bright square in each half, centred at a quarter and three quarters of the width
        img = Image.new("RGB", SIZE, (60, 60, 60))
        for x0 in (20, 80):
            img.paste((230, 230, 230), (x0, 10 + 20 * i, x0 + 20, 30 + 20 * i))
        img.save(images / f"x{i}.png")
    (tmp_path / "left.yaml").write_text(HALF + "model_kwargs: {side: left}\n")
    (tmp_path / "right.yaml").write_text(HALF + "model_kwargs: {side: right}\n")
    for side in ("left", "right"):
        result = invoke("explain", images, "-o", tmp_path / side, "-c", tmp_path / f"{side}.yaml")
        assert result.exit_code == 0, result.output
    result = invoke("diff", tmp_path / "left", tmp_path / "right", "--fail-under", "spearman=0.5", "--report")
    assert result.exit_code == 3, result.output
    assert "gate failed: spearman" in result.output
    rows = diff_rows(tmp_path / "right" / "diff")
    width = SIZE[0]
    for r in rows:
        assert r["maps"] == "heatmaps" and r["flipped"] == "false"
        assert float(r["spearman"]) < -0.3, r
        assert float(r["iou"]) == 0.0
        assert 0.35 * width < float(r["peak_shift_px"]) < 0.65 * width, r
    assert "weights_digest" in diff_json(tmp_path / "right" / "diff")["settings"]["differ"]


def test_mismatched_folders_list_every_image(run_a: Path, world: dict[str, Path], tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(world["images"], images)
    (images / "cat" / "a.png").unlink()  # only in A
    draw_square(images / "new" / "e.png", (230, 20, 20), (0, 0, 30, 30))  # only in B
    (images / "dog" / "d.png").write_bytes(b"not a png")  # an error row in B
    out_b = tmp_path / "b"
    assert invoke("explain", images, "-o", out_b, "-c", world["cfg"]).exit_code == 1
    result = invoke("diff", run_a, out_b)
    assert result.exit_code == 1, result.output
    rows = {r["path"]: r for r in diff_rows(out_b / "diff")}
    assert {p: r["status"] for p, r in rows.items()} == {
        "cat/a.png": "only_in_a",
        "cat/b.png": "compared",
        "dog/c.png": "compared",
        "dog/d.png": "error_in_b",
        "new/e.png": "only_in_b",
    }
    assert rows["dog/d.png"]["note"] and rows["cat/b.png"]["maps"] == "heatmaps"  # B saved no npy/
    counts = diff_json(out_b / "diff")["counts"]
    assert (counts["compared"], counts["only_in_a"], counts["only_in_b"], counts["error_in_b"]) == (2, 1, 1, 1)


def test_usage_errors(run_a: Path, tmp_path: Path, make_image: Any) -> None:
    assert_usage_error(invoke("diff", run_a, tmp_path), "no predictions.csv")
    other = tmp_path / "other"
    other.mkdir()
    (other / "predictions.csv").write_text("path,status\nzzz.png,ok\n")
    assert_usage_error(invoke("diff", run_a, other), "no image in common")
    assert_usage_error(invoke("diff", run_a, run_a, "--fail-under", "pointing=0.5"), "not a gate of gradcam diff")
    assert_usage_error(invoke("diff", run_a, run_a, "--top", "1.5"), "--top")
    assert_usage_error(invoke("diff", run_a, run_a, "-o", run_a), "its own folder")


def test_compare_to_runs_the_diff_after_explain(run_a: Path, world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "b"
    common = ("explain", world["images"], "-o", out, "-c", world["cfg"])
    result = invoke(*common, "--method", "gradcampp", "--compare-to", run_a, "--fail-under", "iou=0.99")
    assert result.exit_code in (0, 3), result.output
    summary = diff_json(out / "diff")
    assert summary["settings"]["differ"]["method"] == {"a": "gradcam", "b": "gradcampp"}
    assert [g["key"] for g in summary["gates"]] == ["iou"]
    # a diff gate without --compare-to, or an OUT_A that is not an output: one line, nothing runs
    assert_usage_error(
        invoke(*common[:5], tmp_path / "c", "-c", world["cfg"], "--fail-under", "ssim=0.5"), "--compare-to"
    )
    assert_usage_error(
        invoke(*common[:5], tmp_path / "d", "-c", world["cfg"], "--compare-to", tmp_path), "--compare-to"
    )
    assert_usage_error(invoke("audit", run_a, "--fail-over", "flips=0.1"), "--compare-to")


def test_python_api(run_a: Path, tmp_path: Path) -> None:
    result = gradcam_cli.diff(run_a, run_a, tmp_path / "d")
    assert result.exit_code == 0 and result.summary["counts"]["compared"] == len(SQUARES)
    assert (tmp_path / "d" / "diff.json").is_file()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (.ci/run installs Debian's chromium)")
def test_the_page_in_headless_chromium(run_a: Path, world: dict[str, Path], tmp_path: Path) -> None:
    model = colour_net()
    state = model.state_dict()
    state["fc.weight"][[3, 5]] = state["fc.weight"][[5, 3]].clone()
    torch.save(state, tmp_path / "swapped.pt")
    out_b = tmp_path / "b"
    args = ("-c", world["cfg"], "--weights", tmp_path / "swapped.pt", "--method", "gradcampp")
    assert invoke("explain", world["images"], "-o", out_b, *args).exit_code == 0
    assert invoke("diff", run_a, out_b, "--report").exit_code == 0
    page = out_b / "diff" / "diff.html"
    assert CHROMIUM is not None
    with Browser(CHROMIUM, tmp_path / "profile") as br:
        open_page(br, page)
        assert br.console_errors() == [], br.console_errors()

        def shown() -> list[str]:
            return br.evaluate("Array.from(document.querySelectorAll('#pairs .pair')).map(c => c.dataset.path)")

        def set_control(element_id: str, value: Any) -> None:
            prop = "checked" if isinstance(value, bool) else "value"
            br.evaluate(
                f"(() => {{ const e = document.getElementById({element_id!r}); e.{prop} = {json.dumps(value)};"
                " e.dispatchEvent(new Event('change')); })()"
            )

        assert sorted(shown()) == sorted(SQUARES)
        set_control("f-flips", True)
        assert sorted(shown()) == ["cat/a.png", "cat/b.png", "dog/c.png"]
        set_control("f-flips", False)
        rows = {r["path"]: r for r in diff_rows(out_b / "diff")}
        set_control("sort", "ssim")
        ordered = shown()
        assert ordered == sorted(rows, key=lambda p: (float(rows[p]["ssim"]), ordered.index(p)))
        set_control("t-key", "ssim")
        set_control("t-below", "0.9999")
        set_control("f-below", True)
        assert sorted(shown()) == sorted(p for p, r in rows.items() if float(r["ssim"]) < 0.9999)
        set_control("f-below", False)
        images = br.evaluate("Array.from(document.images).map(i => [i.naturalWidth, i.getAttribute('src')])")
        assert images and all(w > 0 for w, _ in images), images
        shot = np.asarray(Image.open(io.BytesIO(br.screenshot())).convert("RGB"), dtype=float)
        assert shot.std() > 20, "the screenshot is (nearly) one flat colour"
