"""`explain --metrics/--summary/gates`, `--only-below`, `--sample-rate` and `gradcam audit`, end to end.

The model is `tests.audit_models:colour_net` (red -> cat, green -> dog, blue -> bird; its Grad-CAM is the
pixels of the predicted colour), and the images are coloured squares on grey in folders named after their true
class, so every number here is known in advance or recomputed independently from the outputs:

    cat/a.png  red square at (10, 10)-(40, 40)    -> cat  (correct)   box "cat" on the square      -> hit
    cat/b.png  green square at (70, 40)-(110, 80) -> dog  (wrong)     box "dog" at the far corner  -> miss
    dog/c.png  green square at (20, 50)-(50, 80)  -> dog  (correct)   a mask of the square         -> hit
    dog/d.png  blue square at (80, 10)-(110, 40)  -> bird (wrong)     no annotation                -> not scored

so accuracy 2/4, pointing 2/3, confusions cat->dog and dog->bird once each.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from audit_models import PREDICTED, SQUARES, draw_square, make_world
from click.testing import Result
from helpers import invoke, rows_of
from PIL import Image

from gradcam_cli.audit import measures as M
from gradcam_cli.config import load_settings
from gradcam_cli.data.decode import decode_rgb, model_input
from gradcam_cli.data.discover import in_sample
from gradcam_cli.model.loading import load_model

BASE_HEADER = (
    "path,status,error,pred_index,pred_label,pred_prob,target_index,target_label,target_prob,"
    "method,layer,cam_max,peak_x,peak_y,heatmap,overlay"
)
CAM_HEADER = ",true_index,true_label,correct,guided"
# every metric column is in every run's header (empty unless measured), after the truth and guided columns
METRIC_HEADER = (
    ",deletion_auc,insertion_auc,avg_drop,increase,pointing_hit,energy_in_box"
    ",randomization,random_logit,max_sensitivity,sparseness,complexity,road_morf,road_lerf,road_combined"
)
HEADER = BASE_HEADER + CAM_HEADER + METRIC_HEADER
STEPS = 5


def header_of(out: Path) -> str:
    return (out / "predictions.csv").read_text(encoding="utf-8").splitlines()[0]


def one_error_line(result: Result, *needles: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("audit"))


@pytest.fixture(scope="module")
def audited(world: dict[str, Path]) -> tuple[Result, Path]:
    """One explain with every metric (asked in a scrambled order), boxes, masks, npy maps and --summary."""
    out = world["root"] / "out"
    result = invoke(
        "explain", world["images"], "-o", out, "-c", world["cfg"],
        "--metrics", "energy,drop,deletion,pointing,insertion", "--steps", STEPS,
        "--boxes", world["boxes"], "--masks", world["masks"], "--save", "heatmap,overlay,npy", "--summary",
    )  # fmt: skip
    return result, out


# --------------------------------------------------------------------------------------------- the columns


def test_metric_columns_are_appended_in_canonical_order(audited: tuple[Result, Path]) -> None:
    result, out = audited
    assert result.exit_code == 0, result.output
    assert header_of(out) == HEADER
    rows = rows_of(out)
    assert [r["path"] for r in rows] == sorted(SQUARES)
    assert {r["path"]: r["pred_label"] for r in rows} == PREDICTED


def test_the_header_is_the_same_with_or_without_metrics(world: dict[str, Path], tmp_path: Path) -> None:
    """One policy for optional columns: always there, empty when their feature is off."""
    result = invoke("explain", world["images"], "-o", tmp_path / "o", "-c", world["cfg"], "--limit", "1")
    assert result.exit_code == 0, result.output
    assert header_of(tmp_path / "o") == HEADER
    (row,) = rows_of(tmp_path / "o")
    assert all(row[c] == "" for c in METRIC_HEADER.strip(",").split(","))
    result = invoke(
        "explain", world["images"], "-o", tmp_path / "p", "-c", world["cfg"], "--limit", "1", "--metrics", "drop"
    )
    assert header_of(tmp_path / "p") == HEADER
    (row,) = rows_of(tmp_path / "p")
    assert row["avg_drop"] != "" and row["increase"] != "" and row["deletion_auc"] == ""
    # the audit reads only the measured metrics (run.json), not the empty columns
    invoke("audit", tmp_path / "p")
    summary = json.loads((tmp_path / "p" / "summary.json").read_text(encoding="utf-8"))
    assert sorted(summary["metrics"]) == ["avg_drop", "increase"]
    line = one_error_line(invoke("audit", tmp_path / "p", "--fail-under", "insertion=0.5"), "insertion")
    assert "--metrics insertion" in line


def test_perturbation_metrics_equal_a_recomputation_from_the_outputs(
    world: dict[str, Path], audited: tuple[Result, Path]
) -> None:
    """Recompute deletion/insertion/drop for each row from the saved CAM (npy), the decoded image and the model:
    proves the pipeline measured the right map, for the right class, on the right input."""
    _, out = audited
    settings = load_settings(world["cfg"])
    loaded = load_model(settings)
    black = torch.zeros(1, 3, 1, 1)  # mean 0, std 1
    for row in rows_of(out):
        arr, _box = model_input(decode_rgb(world["images"] / row["path"]), loaded.spec)
        x = torch.from_numpy(arr).float().unsqueeze(0) / 255.0
        cam = torch.from_numpy(np.load(out / "npy" / f"{row['path']}.npy"))
        sal = M.input_maps(cam.unsqueeze(0), (32, 32))
        target = torch.tensor([int(row["target_index"])])
        base = M.baseline_images(x, "blur", black)
        curves = M.perturbation_curves(loaded.model, x, base, sal, torch.tensor([0]), target, STEPS)
        assert float(row["deletion_auc"]) == pytest.approx(float(M.auc(curves["deletion"])[0]), abs=2e-6)
        assert float(row["insertion_auc"]) == pytest.approx(float(M.auc(curves["insertion"])[0]), abs=2e-6)
        with torch.no_grad():
            p_full = loaded.model(x).softmax(1)[0, target]
            p_masked = loaded.model(M.masked_by_saliency(x, sal, black)).softmax(1)[0, target]
        assert float(row["avg_drop"]) == pytest.approx(float(M.average_drop(p_full, p_masked)[0]), abs=1e-3)
        assert row["increase"] == str(int(M.increase_in_confidence(p_full, p_masked)[0]))
        for col in ("deletion_auc", "insertion_auc"):
            assert 0.0 <= float(row[col]) <= 1.0


def test_pointing_and_energy_match_the_csv_peaks_and_the_annotations(audited: tuple[Result, Path]) -> None:
    _, out = audited
    rows = {r["path"]: r for r in rows_of(out)}
    assert {p: r["pointing_hit"] for p, r in rows.items()} == {
        "cat/a.png": "1",
        "cat/b.png": "0",
        "dog/c.png": "1",
        "dog/d.png": "",
    }
    # the hit is the CSV's own peak against the annotation, 15 px tolerance, recomputed here by hand
    a, b = rows["cat/a.png"], rows["cat/b.png"]
    px, py = int(a["peak_x"]) + 0.5, int(a["peak_y"]) + 0.5
    assert 10 <= px <= 40 and 10 <= py <= 40
    px, py = int(b["peak_x"]) + 0.5, int(b["peak_y"]) + 0.5
    assert math.hypot(max(px - 20, 0), max(py - 20, 0)) > 15

    # energy from the saved heatmap (rounded to 8 bits) inside the box / mask
    def energy(row: dict[str, str], region: np.ndarray) -> float:
        heat = np.asarray(Image.open(out / row["heatmap"]), dtype=np.float64)
        return float(heat[region].sum() / heat.sum())

    region_a = np.zeros((90, 120), dtype=bool)
    region_a[10:40, 10:40] = True
    region_b = np.zeros((90, 120), dtype=bool)
    region_b[0:20, 0:20] = True
    region_c = np.zeros((90, 120), dtype=bool)
    region_c[50:80, 20:50] = True
    assert float(a["energy_in_box"]) == pytest.approx(energy(a, region_a), abs=0.01)
    assert float(a["energy_in_box"]) > 0.8  # the map is the red square
    assert (
        float(b["energy_in_box"]) == pytest.approx(energy(b, region_b), abs=0.01) and float(b["energy_in_box"]) < 0.05
    )
    c = rows["dog/c.png"]
    assert float(c["energy_in_box"]) == pytest.approx(energy(c, region_c), abs=0.01) and float(c["energy_in_box"]) > 0.8
    assert rows["dog/d.png"]["energy_in_box"] == ""


def test_several_targets_get_their_own_values(world: dict[str, Path], tmp_path: Path) -> None:
    """--target cat --target dog: two rows per image; the cat box scores only the cat rows."""
    out = tmp_path / "out"
    result = invoke(
        "explain", world["images"], "-o", out, "-c", world["cfg"], "--target", "cat", "--target", "dog",
        "--metrics", "pointing,energy,deletion", "--steps", "3", "--boxes", world["boxes"], "--limit", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert [(r["path"], r["target_label"]) for r in rows] == [("cat/a.png", "cat"), ("cat/a.png", "dog")]
    cat, dog = rows
    assert cat["pointing_hit"] == "1" and dog["pointing_hit"] == ""  # no dog box on a.png
    assert dog["energy_in_box"] == ""
    # the dog map of a red square is all zero (ReLU of a negative score): its deletion curve is its own
    assert cat["deletion_auc"] != dog["deletion_auc"]


# ------------------------------------------------------------------------------------------- summary, gates


def test_explain_summary_json(audited: tuple[Result, Path]) -> None:
    result, out = audited
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["counts"] == {"images": 4, "rows": 4, "ok": 4, "error": 0, "skipped": 0}
    gt = summary["ground_truth"]
    assert gt["source"] == "folders"  # auto: every image sits in a folder named after a class
    assert (gt["images"], gt["correct"], gt["accuracy"]) == (4, 2, 0.5)
    assert gt["top_confusions"] == [
        {"truth": "cat", "predicted": "dog", "count": 1},
        {"truth": "dog", "predicted": "bird", "count": 1},
    ]
    assert summary["pointing"] == {"hits": 2, "annotated": 3, "hit_rate": round(2 / 3, 6)}
    rows = rows_of(out)
    deletion = [float(r["deletion_auc"]) for r in rows]
    assert summary["metrics"]["deletion_auc"]["mean"] == pytest.approx(sum(deletion) / 4, abs=1e-6)
    assert summary["metrics"]["energy_in_box"]["count"] == 3
    per_class = {c["class"]: c for c in summary["per_class"]}
    assert set(per_class) == {"bird", "cat", "dog"}
    assert per_class["dog"]["rows"] == 2 and per_class["dog"]["truth_images"] == 2
    assert per_class["dog"]["accuracy"] == 0.5 and per_class["cat"]["accuracy"] == 0.5
    assert per_class["dog"]["pointing_hit_rate"] == 0.5  # b.png missed, c.png hit
    assert per_class["bird"]["truth_images"] == 0 and per_class["bird"]["accuracy"] is None
    # worst deletion first = highest AUC; the pointing worst list holds the misses only
    worst = summary["worst"]["deletion_auc"]
    assert [w["value"] for w in worst] == sorted((round(v, 6) for v in deletion), reverse=True)
    assert [w["path"] for w in summary["worst"]["pointing_hit"]] == ["cat/b.png"]
    assert "increase" not in summary["worst"]
    assert result.stderr == ""  # quiet (from the config) and no gate: the summary goes to the file only


def test_audit_command_writes_the_same_summary(audited: tuple[Result, Path]) -> None:
    _, out = audited
    before = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    result = invoke("audit", out)
    assert result.exit_code == 0, result.output
    after = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    before.pop("generated"), after.pop("generated")
    assert before == after
    assert "accuracy 0.5000 (2/4, ground truth: folders)" in result.stdout
    assert "pointing hit rate 0.6667 (2/3 annotated maps)" in result.stdout


@pytest.mark.parametrize(
    ("gates", "code", "needles"),
    [
        (["--fail-under", "accuracy=0.5", "--fail-under", "pointing=0.66"], 0, []),
        (["--fail-under", "pointing=0.7"], 3, ["pointing = 0.6667, below the minimum 0.7 by 0.0333"]),
        (["--fail-under", "accuracy=60%"], 3, ["accuracy = 0.5000, below the minimum 0.6 by 0.1000"]),
        (["--fail-over", "deletion=0.01"], 3, ["deletion = ", "above the maximum 0.01"]),
        (["--fail-under", "energy=0.99", "--fail-over", "drop=100"], 3, ["energy = "]),
    ],
)
def test_audit_gates(audited: tuple[Result, Path], gates: list[str], code: int, needles: list[str]) -> None:
    _, out = audited
    result = invoke("audit", out, "-q", *gates)
    assert result.exit_code == code, result.output
    failed = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: gate failed")]
    assert len(failed) == (0 if code == 0 else 1), result.stderr
    for needle in needles:
        assert needle in result.stderr
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["passed"] is (code == 0)
    assert all(g["gate"].startswith("--fail-") for g in summary["gates"])


def test_audit_usage_errors_exit_2(world: dict[str, Path], audited: tuple[Result, Path], tmp_path: Path) -> None:
    _, out = audited
    one_error_line(invoke("audit", tmp_path / "nowhere"), "no such folder")
    (tmp_path / "empty").mkdir()
    one_error_line(invoke("audit", tmp_path / "empty"), "no predictions.csv")
    one_error_line(invoke("audit", out, "--fail-under", "speed=3"), "--fail-under", "speed=3")
    one_error_line(invoke("audit", out, "--fail-under", "pointing=lots"), "--fail-under")
    one_error_line(invoke("audit", out, "--fail-over", "pointing=0.5"), "--fail-over")  # pointing is higher-is-better
    one_error_line(invoke("audit", out, "--truth", "none", "--fail-under", "accuracy=0.1"), "no ground truth")
    plain = tmp_path / "plain"
    assert invoke("explain", world["images"], "-o", plain, "-c", world["cfg"], "--limit", "2").exit_code == 0
    one_error_line(invoke("audit", plain, "--fail-under", "pointing=0.5"), "no pointing_hit column", "--metrics")


def test_truth_from_labels_csv_and_from_a_file(world: dict[str, Path], audited: tuple[Result, Path]) -> None:
    _, out = audited
    labels = world["root"] / "truth.csv"
    labels.write_text("path,label\ncat/a.png,cat\ncat/b.png,5\ndog/c.png,bird\n", encoding="utf-8")
    result = invoke("audit", out, "--truth", labels)
    assert result.exit_code == 0, result.output
    gt = json.loads((out / "summary.json").read_text(encoding="utf-8"))["ground_truth"]
    # a: cat = cat; b: index 5 (dog) = dog; c: bird != dog; d has no label
    assert (gt["source"], gt["images"], gt["correct"]) == (str(labels), 3, 2)
    assert gt["top_confusions"] == [{"truth": "bird", "predicted": "dog", "count": 1}]
    none = invoke("audit", out, "--truth", "none")
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["ground_truth"] == {
        "source": None,
        "images": 0,
        "reason": "--truth none",
    }
    assert none.exit_code == 0
    invoke("audit", out)  # leave the shared folder as the fixture made it


def test_a_labels_csv_in_the_input_folder_is_found(world: dict[str, Path], tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for rel, (colour, box) in SQUARES.items():
        draw_square(flat / rel.replace("/", "_"), colour, box)
    (flat / "labels.csv").write_text("path,label\ncat_a.png,cat\ncat_b.png,cat\n", encoding="utf-8")
    out = tmp_path / "out"
    result = invoke("explain", flat, "-o", out, "-c", world["cfg"], "--summary", "--fail-under", "accuracy=0.5")
    assert result.exit_code == 0, result.output
    gt = json.loads((out / "summary.json").read_text(encoding="utf-8"))["ground_truth"]
    assert gt["source"] == str((flat / "labels.csv").resolve())
    assert (gt["images"], gt["correct"]) == (2, 1)


def test_gate_failure_exits_3_and_wins_over_failed_images(world: dict[str, Path], tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    for rel, (colour, box) in SQUARES.items():
        draw_square(mixed / rel, colour, box)
    (mixed / "cat" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    args = ["explain", mixed, "-o", out, "-c", world["cfg"]]
    # failed images alone: 1
    assert invoke(*args).exit_code == 1
    # a failing gate as well: 3 wins, both are reported
    result = invoke(*args, "--fail-under", "accuracy=0.9")
    assert result.exit_code == 3, result.output
    assert "Error: gate failed: accuracy = 0.5000, below the minimum 0.9 by 0.4000" in result.stderr
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["counts"]["error"] == 1 and summary["passed"] is False
    # a passing gate leaves the 1
    assert invoke(*args, "--fail-under", "accuracy=0.5").exit_code == 1
    # audit follows the same rule
    assert invoke("audit", out).exit_code == 1
    assert invoke("audit", out, "--fail-under", "accuracy=0.9").exit_code == 3


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--metrics", "pointing"], ["--metrics pointing needs annotations"]),
        (["--boxes", "BOXES"], ["--boxes/--masks are used by --metrics pointing,energy"]),
        (["--metrics", "drop", "--fail-under", "pointing=0.5"], ["--fail-under pointing", "--metrics pointing"]),
        (["--metrics", "speed"], ["metrics", "deletion,insertion,drop,pointing,energy"]),
        (["--steps", "1"], ["steps", "2 to 1000"]),
        (["--only-below", "1.5"], ["only-below"]),
        (["--sample-rate", "0"], ["sample-rate"]),
        (["--fail-under", "accuracy"], ["fail-under", "KEY=VALUE"]),
        (["--truth", "none", "--fail-under", "accuracy=0.5"], ["needs ground truth"]),
        (["--metrics", "pointing", "--boxes", "MISSING"], ["--boxes", "no such file"]),
        (["--metrics", "pointing", "--boxes", "TYPO"], ["line 2", "'catt'", "did you mean 'cat'"]),
        (["--metrics", "pointing", "--boxes", "ELSEWHERE"], ["none of its 1 annotated paths"]),
        (["--metrics", "energy", "--masks", "MISSING"], ["--masks", "not a folder"]),
    ],
)
def test_explain_usage_errors_exit_2_before_running(
    world: dict[str, Path], tmp_path: Path, args: list[str], needles: list[str]
) -> None:
    (tmp_path / "typo.csv").write_text("path,x0,y0,x1,y1,label\ncat/a.png,0,0,5,5,catt\n", encoding="utf-8")
    (tmp_path / "elsewhere.csv").write_text("path,x0,y0,x1,y1,label\nother/z.png,0,0,5,5,cat\n", encoding="utf-8")
    swap = {
        "BOXES": str(world["boxes"]),
        "MISSING": str(tmp_path / "missing"),
        "TYPO": str(tmp_path / "typo.csv"),
        "ELSEWHERE": str(tmp_path / "elsewhere.csv"),
    }
    out = tmp_path / "out"
    result = invoke("explain", world["images"], "-o", out, "-c", world["cfg"], *[swap.get(a, a) for a in args])
    one_error_line(result, *needles)
    assert not out.exists()


def test_baseline_choice_is_checked_by_click(world: dict[str, Path], tmp_path: Path) -> None:
    result = invoke("explain", world["images"], "-o", tmp_path / "o", "-c", world["cfg"], "--baseline", "noise")
    assert result.exit_code == 2 and "Traceback" not in result.output


# ---------------------------------------------------------------------------------- --only-below, --sample-rate


def test_only_below_explains_only_unconfident_images_and_skips_the_backward(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b.png (big green square) is predicted at 0.93, the others at 0.74: --only-below 0.9 skips b only, and
    the engine (forward + backward) never sees it."""
    from gradcam_cli import explain as api_explain
    from gradcam_cli.cam.engine import CamEngine

    seen: list[int] = []
    original, original_check = CamEngine.run, CamEngine.check

    def counting(self: CamEngine, x: torch.Tensor, select: Any) -> Any:
        seen.append(int(x.shape[0]))
        return original(self, x, select)

    def counting_check(self: CamEngine, x: torch.Tensor, select: Any) -> Any:  # the probe before the run
        seen.append(int(x.shape[0]))
        return original_check(self, x, select)

    monkeypatch.setattr(CamEngine, "run", counting)
    monkeypatch.setattr(CamEngine, "check", counting_check)
    out = tmp_path / "out"
    settings = load_settings(world["cfg"], only_below=0.9, metrics="drop", summary=True, batch_size=4)
    summary = api_explain([world["images"]], out, settings)
    assert summary.exit_code == 0
    assert summary.skipped_confident == 1 and summary.ok == 3 and summary.errors == 0
    assert seen == [1, 3]  # the probe image before the run, then the batch of 4 without b.png
    rows = {r["path"]: r for r in rows_of(out)}
    skipped = rows["cat/b.png"]
    assert skipped["status"] == "skipped" and skipped["pred_label"] == "dog"
    assert float(skipped["pred_prob"]) >= 0.9 and "only-below" in skipped["error"]
    assert skipped["heatmap"] == skipped["overlay"] == skipped["avg_drop"] == ""
    assert not (out / "heatmaps" / "cat" / "b.png.png").exists()
    for rel in ("cat/a.png", "dog/c.png", "dog/d.png"):
        assert rows[rel]["status"] == "ok" and (out / rows[rel]["heatmap"]).is_file() and rows[rel]["avg_drop"]
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["counts"] == {"images": 4, "ok": 3, "error": 0, "skipped": 1}
    # accuracy still counts the skipped image: its prediction is known (dog for a cat: wrong)
    s = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert s["counts"]["skipped"] == 1 and s["ground_truth"]["images"] == 4 and s["ground_truth"]["correct"] == 2


def test_only_below_with_every_image_confident_runs_no_engine(world: dict[str, Path], tmp_path: Path) -> None:
    from gradcam_cli import explain as api_explain

    settings = load_settings(world["cfg"], only_below=0.05, save="heatmap")
    summary = api_explain([world["images"]], tmp_path / "out", settings)
    assert (summary.ok, summary.errors, summary.skipped_confident, summary.exit_code) == (0, 0, 4, 0)
    assert [r["status"] for r in rows_of(tmp_path / "out")] == ["skipped"] * 4
    assert not (tmp_path / "out" / "heatmaps").exists()


def test_sample_rate_keeps_a_deterministic_hash_sample(world: dict[str, Path], tmp_path: Path) -> None:
    many = tmp_path / "many"
    rels = [f"img{i:02d}.png" for i in range(24)]
    for i, rel in enumerate(rels):
        draw_square(many / rel, (20 * (i % 12), 200, 30), (5, 5, 40, 40))

    def expected(rate: float) -> list[str]:
        # the rule, by hand: the first 8 bytes of sha256(path) as a fraction of 2^64, kept when below the rate
        return [r for r in rels if int.from_bytes(hashlib.sha256(r.encode()).digest()[:8], "big") / 2**64 < rate]

    picks = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        result = invoke("explain", many, "-o", out, "-c", world["cfg"], "--sample-rate", "0.4", "--save", "heatmap")
        assert result.exit_code == 0, result.output
        picks.append([r["path"] for r in rows_of(out)])
    assert picks[0] == picks[1] == expected(0.4)
    assert 0 < len(picks[0]) < len(rels)
    assert [r for r in rels if in_sample(r, 0.4)] == expected(0.4)
    # a larger rate keeps a superset; percentages are accepted
    assert set(expected(0.4)) <= set(r for r in rels if in_sample(r, 0.7))
    out = tmp_path / "pct"
    assert invoke("explain", many, "-o", out, "-c", world["cfg"], "--sample-rate", "40%").exit_code == 0
    assert [r["path"] for r in rows_of(out)] == expected(0.4)


# ---------------------------------------------------------------------------------------------- no torch


@pytest.mark.parametrize("command", ["audit", "report"])
def test_audit_and_report_never_import_torch(
    audited: tuple[Result, Path], run_process: Any, tmp_path: Path, command: str
) -> None:
    _, out = audited
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("predictions.csv", "run.json"):
        (copy / name).write_bytes((out / name).read_bytes())
    code = (
        "import sys\n"
        "from gradcam_cli.cli import main\n"
        "try:\n"
        f"    main([{command!r}, {str(copy)!r}, '-q'])\n"
        "except SystemExit as exc:\n"
        "    sys.stderr.write(f'EXIT={exc.code} TORCH={\"torch\" in sys.modules}\\n')\n"
    )
    proc = run_process([sys.executable, "-c", code])
    assert "TORCH=False" in proc.stderr and "EXIT=0" in proc.stderr, proc.stderr
    assert (copy / ("summary.json" if command == "audit" else "report.html")).is_file()


def test_audit_usage_errors_answer_before_torch_is_imported(world: dict[str, Path], run_process: Any) -> None:
    code = (
        "import sys\n"
        "from gradcam_cli.cli import main\n"
        "try:\n"
        f"    main(['explain', {str(world['images'])!r}, '-o', 'never', '-c', {str(world['cfg'])!r},"
        " '--metrics', 'drop', '--fail-under', 'pointing=0.5'])\n"
        "except SystemExit as exc:\n"
        "    sys.stderr.write(f'EXIT={exc.code} TORCH={\"torch\" in sys.modules}\\n')\n"
    )
    proc = run_process([sys.executable, "-c", code])
    assert "EXIT=2 TORCH=False" in proc.stderr, proc.stderr
    assert "Error: --fail-under pointing=...: needs --metrics pointing" in proc.stderr


def test_resume_keeps_metric_columns_and_refuses_other_metrics(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["explain", world["images"], "-o", out, "-c", world["cfg"], "--metrics", "drop,deletion", "--steps", "3"]
    assert invoke(*args).exit_code == 0
    first = rows_of(out)
    (out / "heatmaps" / "dog" / "d.png.png").unlink()  # d must be explained again, the others are kept
    result = invoke(*args, "--resume", "--summary")
    assert result.exit_code == 0, result.output
    assert header_of(out) == HEADER
    again = rows_of(out)
    assert [r["path"] for r in again] == [r["path"] for r in first]  # input order restored
    for before, after in zip(first, again, strict=True):
        assert after["deletion_auc"] == before["deletion_auc"] and after["avg_drop"] == before["avg_drop"]
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["resume"] == {"skipped": 3}
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["metrics"]["avg_drop"]["count"] == 4
    # other metrics would mix two kinds of rows in one CSV: a usage error, nothing touched
    line = one_error_line(invoke(*args[:-4], "--metrics", "drop", "--resume"), "--resume", "audit")
    assert "start fresh" in line
    assert header_of(out) == HEADER
