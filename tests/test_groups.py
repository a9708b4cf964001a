"""Bias audits by group (`--groups`): a known-answer run, the grouping and gap maths on hand-written rows, the
gap gates, and the usage errors.

The known answer. `tests.audit_models:marker_net` fires on bright red pixels only (features = ReLU(red - 0.6)
at full resolution, logits = (40 * mean(features), 0)), so its Grad-CAM after min-max normalisation is exactly
1 on every red pixel and 0 on the grey background (see MarkerNet). The 64 x 64 images:

    site a: a/img0..3.png  a red 16 x 16 object (256 px), boxed exactly
    site b: b/img0..3.png  the same object and a red 32 x 16 marker in the top-left corner (512 px)
    loose.png             an object only, and in no group (not in groups.csv; no folder for folders:1)

so energy in box = red pixels in the box / all red pixels:

    a: 256 / 256 = 1             b: 256 / (256 + 512) = 1/3             gap = 1 - 1/3 = 2/3, low b, high a

target probability = sigmoid(40 * 0.4 * red area / 4096): a sigmoid(1) = 0.731059, b sigmoid(3) = 0.952574.
labels.csv calls every image `object` except b/img2 and b/img3 (`other`): accuracy a 4/4, b 2/4, gap 0.5.
loose.png is counted under (none) with energy 1, and takes part in no gap.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_usage_error, invoke
from PIL import Image, ImageDraw

from gradcam_cli.audit.groups import NO_GROUP, Groups, gap, resolve_groups
from gradcam_cli.audit.summary import summarize
from gradcam_cli.audit.truth import Truth
from gradcam_cli.config import load_settings, read_config
from gradcam_cli.errors import GradcamError

SIZE = 64
OBJECT = 16
MARKER = (0, 0, 32, 16)  # x0, y0, x1, y1: 512 px
POSITIONS = [(24, 24), (20, 30), (30, 20), (40, 40)]
CONFIG = (
    "model: tests.audit_models:marker_net\nweights: none\ninput_size: 64\nmean: [0, 0, 0]\nstd: [1, 1, 1]\n"
    "target_layers: [features]\nworkers: 0\nquiet: true\n"
)
ENERGY = {"a": 1.0, "b": 256 / (256 + 512)}
PROB = {"a": 1 / (1 + math.exp(-1.0)), "b": 1 / (1 + math.exp(-3.0))}
ACCURACY = {"a": 1.0, "b": 0.5}


def draw(path: Path, x: int, y: int, marker: bool) -> None:
    img = Image.new("RGB", (SIZE, SIZE), (100, 100, 100))
    pen = ImageDraw.Draw(img)
    pen.rectangle([x, y, x + OBJECT - 1, y + OBJECT - 1], fill=(255, 0, 0))
    if marker:
        pen.rectangle([MARKER[0], MARKER[1], MARKER[2] - 1, MARKER[3] - 1], fill=(255, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The images above in group folders a/ and b/ (plus loose.png), boxes.csv, groups.csv, labels.csv."""
    root = tmp_path_factory.mktemp("groups")
    images = root / "images"
    boxes, groups, labels = ["path,x0,y0,x1,y1,label"], ["path,site"], ["path,label"]
    for site in "ab":
        for k, (x, y) in enumerate(POSITIONS):
            rel = f"{site}/img{k}.png"
            draw(images / rel, x, y, marker=site == "b")
            boxes.append(f"{rel},{x},{y},{x + OBJECT},{y + OBJECT},object")
            groups.append(f"{rel},{site}")
            labels.append(f"{rel},{'other' if site == 'b' and k >= 2 else 'object'}")
    draw(images / "loose.png", 24, 24, marker=False)
    boxes.append("loose.png,24,24,40,40,object")
    labels.append("loose.png,object")
    (root / "boxes.csv").write_text("\n".join(boxes) + "\n", encoding="utf-8")
    (root / "groups.csv").write_text("\n".join(groups) + "\n", encoding="utf-8")
    (images / "labels.csv").write_text("\n".join(labels) + "\n", encoding="utf-8")
    (root / "marker.yaml").write_text(CONFIG, encoding="utf-8")
    return {"root": root, "images": images, "boxes": root / "boxes.csv", "groups": root / "groups.csv"}


@pytest.fixture(scope="module")
def gated(world: dict[str, Path]) -> tuple[Any, Path]:
    out = world["root"] / "out"
    result = invoke(
        "explain", world["images"], "-o", out, "-c", world["root"] / "marker.yaml", "--metrics", "energy",
        "--boxes", world["boxes"], "--groups", world["groups"],
        "--fail-over", "gap:energy=0.15", "--fail-over", "gap:accuracy=5%",
    )  # fmt: skip
    return result, out


def summary_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def check_known_answer(block: dict[str, Any], attribute: str) -> None:
    """summary.json's groups block equals the values derived in the module docstring."""
    entries = {e["group"]: e for e in block["attributes"][attribute]["groups"]}
    assert list(entries) == ["a", "b", NO_GROUP]  # by name, (none) last
    for site in "ab":
        e = entries[site]
        assert e["images"] == 4 and e["truth_images"] == 4 and e["count_energy_in_box"] == 4
        assert e["mean_energy_in_box"] == pytest.approx(ENERGY[site], abs=1e-6)
        assert e["mean_target_prob"] == pytest.approx(PROB[site], abs=1e-6)
        assert e["accuracy"] == ACCURACY[site]
    none = entries[NO_GROUP]
    assert none["images"] == 1 and none["mean_energy_in_box"] == pytest.approx(1.0)  # counted, not dropped
    energy = block["largest_gaps"]["energy_in_box"]
    assert energy["attribute"] == attribute
    assert energy["gap"] == pytest.approx(2 / 3, abs=1e-6)
    assert (energy["low"]["group"], energy["high"]["group"]) == ("b", "a")
    assert energy["groups"] == 2  # (none) takes no part
    accuracy = block["attributes"][attribute]["gaps"]["accuracy"]
    assert accuracy["gap"] == 0.5 and (accuracy["low"]["group"], accuracy["high"]["group"]) == ("b", "a")


def test_known_answer_groups_block_and_failed_gap_gates(gated: tuple[Any, Path], world: dict[str, Path]) -> None:
    result, out = gated
    assert result.exit_code == 3, result.output
    summary = summary_of(out)
    block = summary["groups"]
    assert block["source"] == str(world["groups"].resolve()) and block["no_group"] == NO_GROUP
    check_known_answer(block, "site")
    failed = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: gate failed")]
    assert len(failed) == 2
    assert "gap:energy = 0.6667 (site: b 0.3333 .. a 1.0000), above the maximum 0.15" in result.stderr
    assert "gap:accuracy = 0.5000 (site: b 0.5000 .. a 1.0000), above the maximum 0.05" in result.stderr
    gates = {g["key"]: g for g in summary["gates"]}
    assert gates["gap:energy"]["value"] == pytest.approx(2 / 3, abs=1e-6) and not gates["gap:energy"]["passed"]
    # run.json records the resolved source, which audit and report reuse
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["audit"]["groups"] == str(world["groups"].resolve())


def test_audit_by_folder_level_on_the_same_folder(gated: tuple[Any, Path]) -> None:
    """The images lie in group folders a/ and b/: folders:1 gives the same groups (attribute folder1), and
    loose.png, with no folder, is (none)."""
    _, out = gated
    result = invoke("audit", out, "--groups", "folders:1", "--fail-over", "gap:energy=0.15")
    assert result.exit_code == 3, result.output
    check_known_answer(summary_of(out)["groups"], "folder1")
    assert "largest energy_in_box gap 0.6667 by folder1: b 0.3333 vs a 1.0000" in result.stdout
    # one attribute's gate, a passing threshold
    assert invoke("audit", out, "--groups", "folders:1", "--fail-over", "gap:folder1:energy=0.7").exit_code == 0
    # groups of 4 images take no part in a gap when 5 values are needed: a gate that cannot be measured fails
    result = invoke("audit", out, "--groups", "folders:1", "--group-min-count", "5", "--fail-over", "gap:energy=0.9")
    assert result.exit_code == 3 and "fewer than 2 groups with 5+ values of energy_in_box" in result.stderr
    assert summary_of(out)["groups"]["min_count"] == 5
    # without --groups: what run.json recorded (the CSV) and its min count (3); with none: no groups block
    assert invoke("audit", out).exit_code == 0
    assert list(summary_of(out)["groups"]["attributes"]) == ["site"] and summary_of(out)["groups"]["min_count"] == 3
    assert invoke("audit", out, "--groups", "none").exit_code == 0
    assert summary_of(out)["groups"] is None


def test_gap_gate_usage_errors_on_audit(gated: tuple[Any, Path]) -> None:
    _, out = gated
    assert_usage_error(invoke("audit", out, "--fail-over", "gap:camera:energy=0.1"), "no attribute 'camera'")
    assert_usage_error(invoke("audit", out, "--groups", "none", "--fail-over", "gap:energy=0.1"), "no groups")
    assert_usage_error(invoke("audit", out, "--fail-over", "gap:deletion=0.1"), "no deletion_auc column")
    assert_usage_error(invoke("audit", out, "--fail-under", "gap:energy=0.1"), "as --fail-over")
    assert_usage_error(invoke("audit", out, "--fail-over", "gap:speed=0.1"), "gap:KEY")
    assert_usage_error(invoke("audit", out, "--groups", "folders:0"), "folders:N")
    assert_usage_error(invoke("audit", out, "--groups", "folders:x"), "folders:N")


def test_groups_usage_errors_before_the_run(world: dict[str, Path], tmp_path: Path) -> None:
    cfg = world["root"] / "marker.yaml"

    def run(*extra: Any) -> Any:
        out = tmp_path / "o"
        return invoke(
            "explain", world["images"], "-o", out, "-c", cfg, "--metrics", "energy", "--boxes", world["boxes"], *extra
        )

    no_path = tmp_path / "no_path.csv"
    no_path.write_text("file,site\na/img0.png,a\n", encoding="utf-8")
    no_attr = tmp_path / "no_attr.csv"
    no_attr.write_text("path\na/img0.png\n", encoding="utf-8")
    nothing = tmp_path / "nothing.csv"
    nothing.write_text("path,site\nelsewhere/x.png,a\n", encoding="utf-8")
    assert_usage_error(run("--groups", tmp_path / "missing.csv"), "no such file")
    assert_usage_error(run("--groups", no_path), "path,<attribute>")
    assert_usage_error(run("--groups", no_attr), "no attribute columns")
    assert_usage_error(run("--groups", nothing), "none of its paths matches an image")
    assert_usage_error(run("--groups", "folders:-1"), "folders:N")
    assert_usage_error(run("--fail-over", "gap:energy=0.1"), "add --groups")
    assert_usage_error(run("--groups", world["groups"], "--fail-over", "gap:drop=0.1"), "needs --metrics drop")
    assert_usage_error(
        run("--groups", world["groups"], "--truth", "none", "--fail-over", "gap:accuracy=0.1"), "--truth"
    )
    assert not (tmp_path / "o").exists()  # nothing ran


def test_groups_in_a_config_are_relative_to_it(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "sub" / "c.yaml"
    cfg.write_text("groups: groups.csv\nfail_over: {gap:energy: 0.1, 'gap:site:accuracy': 5%}\n", encoding="utf-8")
    s = load_settings(cfg)
    assert s.groups == str(tmp_path / "sub" / "groups.csv")
    assert s.fail_over == (("gap:energy", 0.1), ("gap:site:accuracy", 0.05))
    cfg.write_text("groups: Folders:2\n", encoding="utf-8")
    assert read_config(cfg)["groups"] == "folders:2"  # a keyword, not a path


# ------------------------------------------------------------------------------------ the maths, by hand


def test_folder_levels() -> None:
    groups = resolve_groups("folders:2", [])
    assert groups is not None and groups.attributes == ("folder2",)
    assert groups.of("site1/cam3/x.png") == {"folder2": "cam3"}
    assert groups.of("site1/x.png") == {"folder2": NO_GROUP}  # the file name is not a folder
    assert groups.of("x.png") == {"folder2": NO_GROUP}


def test_csv_lookup_by_path_and_stem(tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    path.write_text("path,site,camera\n./a/x.png,s1,\nb\\y,s2,c9\n", encoding="utf-8")
    groups = resolve_groups(str(path), ["a/x.png", "b/y.jpg", "c/z.png"])
    assert groups is not None and groups.attributes == ("site", "camera")
    assert groups.of("a/x.png") == {"site": "s1", "camera": NO_GROUP}  # an empty cell: no group
    assert groups.of("b/y.jpg") == {"site": "s2", "camera": "c9"}  # listed without its extension
    assert groups.of("c/z.png") == {"site": NO_GROUP, "camera": NO_GROUP}
    with pytest.raises(GradcamError, match="twice"):
        path.write_text("path,site,site\n", encoding="utf-8")
        resolve_groups(str(path), [])


def test_gap_excludes_small_groups_and_no_group() -> None:
    means = {"a": (0.9, 3), "b": (0.2, 2), "c": (0.5, 5), NO_GROUP: (0.0, 50)}
    found = gap(means, min_count=3)
    assert found == {"gap": 0.4, "low": {"group": "c", "value": 0.5}, "high": {"group": "a", "value": 0.9}, "groups": 2}
    assert gap(means, min_count=2)["gap"] == pytest.approx(0.7)  # b now takes part
    assert gap(means, min_count=4) is None  # one group left: nothing to compare
    tie = gap({"y": (0.5, 3), "x": (0.5, 3)}, 1)
    assert tie is not None and tie["gap"] == 0 and (tie["low"]["group"], tie["high"]["group"]) == ("x", "y")


def row(path: str, energy: str, prob: str, pred: str = "0", status: str = "ok") -> dict[str, str]:
    return {
        "path": path, "status": status, "pred_index": pred, "pred_label": f"c{pred}", "target_index": pred,
        "target_label": f"c{pred}", "target_prob": prob, "energy_in_box": energy, "deletion_auc": "0.5",
    }  # fmt: skip


def test_summarize_groups_on_hand_written_rows() -> None:
    """Two attributes over six images; per group the means are hand-computed below."""
    header = ["path", "status", "pred_index", "pred_label", "target_index", "target_label", "target_prob"]
    header += ["energy_in_box", "deletion_auc"]
    rows = [
        row("p1.png", "0.9", "0.8"),
        row("p2.png", "0.7", "0.6", pred="1"),
        row("p3.png", "0.8", "0.7"),
        row("p4.png", "0.2", "0.9"),
        row("p5.png", "0.4", "0.5", pred="1"),
        row("p6.png", "", "", status="error"),
    ]
    table = {
        "p1.png": {"site": "x", "cam": "k1"},
        "p2.png": {"site": "x", "cam": "k1"},
        "p3.png": {"site": "x", "cam": "k2"},
        "p4.png": {"site": "y", "cam": "k2"},
        "p5.png": {"site": "y", "cam": ""},
        "p6.png": {"site": "y", "cam": "k2"},
    }
    groups = Groups("g.csv", ("site", "cam"), table)
    truth = Truth(source="t.csv", by_path={f"p{k}.png": "c0" for k in range(1, 7)})
    s = summarize(header, rows, truth, (), run=None, groups=groups, group_min_count=2)
    site = {e["group"]: e for e in s["groups"]["attributes"]["site"]["groups"]}
    # x: p1..p3, energy (0.9 + 0.7 + 0.8) / 3 = 0.8, prob 0.7, right 2 of 3 (p2 predicted c1)
    assert site["x"] == {
        "group": "x", "images": 3, "truth_images": 3, "accuracy": pytest.approx(2 / 3), "mean_target_prob": 0.7,
        "mean_energy_in_box": pytest.approx(0.8), "count_energy_in_box": 3, "mean_deletion_auc": 0.5,
        "count_deletion_auc": 3,
    }  # fmt: skip
    # y: p4..p6 (p6 an error row: an image, no prediction, no values), energy 0.3, prob 0.7, right 1 of 2
    assert (site["y"]["images"], site["y"]["truth_images"], site["y"]["accuracy"]) == (3, 2, 0.5)
    assert site["y"]["mean_energy_in_box"] == pytest.approx(0.3) and site["y"]["count_energy_in_box"] == 2
    gaps = s["groups"]["attributes"]["site"]["gaps"]
    assert gaps["energy_in_box"]["gap"] == pytest.approx(0.5)
    assert gaps["accuracy"]["gap"] == pytest.approx(2 / 3 - 0.5, abs=1e-6)
    assert gaps["deletion_auc"]["gap"] == 0
    # cam: k1 {p1, p2} energy 0.8, k2 {p3, p4, p6} energy 0.5, p5 (empty cell) under (none)
    cam = {e["group"]: e for e in s["groups"]["attributes"]["cam"]["groups"]}
    assert list(cam) == ["k1", "k2", NO_GROUP] and cam[NO_GROUP]["images"] == 1
    assert s["groups"]["attributes"]["cam"]["gaps"]["energy_in_box"]["gap"] == pytest.approx(0.3)
    # the largest gap over both attributes: site's for energy, cam's for accuracy (k1 1/2, k2 2/2)
    largest = s["groups"]["largest_gaps"]
    assert largest["energy_in_box"]["attribute"] == "site"
    assert largest["accuracy"]["attribute"] == "cam" and largest["accuracy"]["gap"] == 0.5
    # without groups the block is null; without truth no accuracy
    assert summarize(header, rows, truth, ())["groups"] is None
    no_truth = summarize(header, rows, Truth(), (), groups=groups, group_min_count=2)["groups"]
    assert "accuracy" not in no_truth["largest_gaps"]
    assert "accuracy" not in no_truth["attributes"]["site"]["groups"][0]


def test_resume_may_change_the_groups(world: dict[str, Path], tmp_path: Path) -> None:
    """Groups shape only the summary, not the rows: a resume with other groups (or of a run.json from before
    groups were recorded) keeps the rows done, and the summary follows the new groups."""
    out = tmp_path / "o"
    base = ["explain", world["images"], "-o", out, "-c", world["root"] / "marker.yaml", "--metrics", "energy"]
    base += ["--boxes", world["boxes"]]
    assert invoke(*base, "--groups", world["groups"], "--limit", "4").exit_code == 0
    run_json = out / "run.json"
    run = json.loads(run_json.read_text(encoding="utf-8"))
    del run["audit"]["groups"], run["audit"]["group_min_count"]  # as an older version wrote it
    run_json.write_text(json.dumps(run), encoding="utf-8")
    result = invoke(*base, "--groups", "folders:1", "--resume", "--summary")
    assert result.exit_code == 0, result.output  # not "--resume: ... was made with audit ..." (exit 2)
    assert summary_of(out)["counts"]["images"] == 9
    block = summary_of(out)["groups"]
    assert block["source"] == "folders:1" and list(block["attributes"]) == ["folder1"]
    # a recorded groups file that has gone: one line saying where the source came from
    run = json.loads(run_json.read_text(encoding="utf-8"))
    run["audit"]["groups"] = str(tmp_path / "gone.csv")
    run_json.write_text(json.dumps(run), encoding="utf-8")
    assert_usage_error(invoke("audit", out), "gone.csv: no such file", "run.json recorded")
    assert invoke("audit", out, "--groups", "none").exit_code == 0
