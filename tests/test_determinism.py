"""Determinism: two runs give byte-identical outputs, and the batch size does not change a heatmap.

resnet18 with `--weights none` (randomly initialised from a fixed seed, so runs are comparable) at a 64 px
input, on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import invoke, rows_of
from PIL import Image

TIMING_KEYS = {"started", "finished", "wall_seconds", "images_per_second", "stage_seconds", "stage_images_per_second"}


def files_of(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cfg = tmp_path_factory.mktemp("cfg") / "small.yaml"
    cfg.write_text("input_size: 64\n", encoding="utf-8")
    return ["--model", "resnet18", "--weights", "none", "--device", "cpu", "-c", str(cfg), "-q"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, make_image: Callable[..., Path]) -> Path:
    """33 images of mixed sizes and formats: batches of 7 and 32 both end with a partial batch."""
    src = tmp_path_factory.mktemp("det") / "in"
    sizes = [(64, 48), (48, 64), (40, 40), (90, 30)]
    for i in range(33):
        make_image(src / f"img{i:02d}.{('png', 'jpg', 'webp')[i % 3]}", size=sizes[i % 4], seed=100 + i)
    return src


@pytest.fixture(scope="module")
def runs(photos: Path, tmp_path_factory: pytest.TempPathFactory, resnet: list[str]) -> dict[str, Path]:
    """Four runs over the same images: batch 7 twice (0 and 2 decode workers), batch 1 and batch 32."""
    base = tmp_path_factory.mktemp("runs")
    plans = {
        "b7": ["--batch-size", "7", "--workers", "0", "--save", "heatmap,overlay,npy"],
        "b7_workers": ["--batch-size", "7", "--workers", "2", "--save", "heatmap,overlay,npy"],
        "b1": ["--batch-size", "1", "--workers", "0", "--save", "heatmap"],
        "b32": ["--batch-size", "32", "--workers", "0", "--save", "heatmap"],
    }
    for name, flags in plans.items():
        result = invoke("explain", photos, "-o", base / name, *resnet, *flags)
        assert result.exit_code == 0, result.output
    return {name: base / name for name in plans}


def test_two_runs_give_byte_identical_outputs(runs: dict[str, Path]) -> None:
    """Second run with 2 decode workers instead of 0: the same bytes everywhere but run.json's timings."""
    one, two = runs["b7"], runs["b7_workers"]
    a, b = files_of(one), files_of(two)
    assert a.keys() == b.keys() and len(a) == 3 * 33 + 2
    different = [name for name in a if name != "run.json" and a[name] != b[name]]
    assert different == [], different
    info_a, info_b = json.loads(a["run.json"]), json.loads(b["run.json"])
    for info in (info_a, info_b):
        for key in [*TIMING_KEYS, "workers"]:
            info.pop(key)
    assert info_a == info_b
    # and the maps are not trivially equal (all zero): they are real, distinct maps
    heats = [np.asarray(Image.open(one / r["heatmap"])) for r in rows_of(one)]
    assert sum(h.max() == 255 for h in heats) > 25
    assert len({h.tobytes() for h in heats}) == 33


def test_batch_size_does_not_change_the_heatmap(runs: dict[str, Path]) -> None:
    """Batch sizes 1, 7 and 32: same predictions, every heatmap pixel within 1/255."""
    loaded: dict[str, dict[str, dict[str, Any]]] = {}
    for name in ("b1", "b7", "b32"):
        out = runs[name]
        loaded[name] = {
            r["path"]: {**r, "pixels": np.asarray(Image.open(out / r["heatmap"])).astype(np.int16)}
            for r in rows_of(out)
        }
    base = loaded["b1"]
    assert len(base) == 33
    worst = 0
    for name in ("b7", "b32"):
        assert loaded[name].keys() == base.keys()
        for path, row in loaded[name].items():
            ref = base[path]
            assert row["pred_index"] == ref["pred_index"] and row["target_index"] == ref["target_index"]
            assert float(row["pred_prob"]) == pytest.approx(float(ref["pred_prob"]), abs=2e-6)
            assert float(row["cam_max"]) == pytest.approx(float(ref["cam_max"]), rel=1e-4, abs=1e-6)
            worst = max(worst, int(np.abs(row["pixels"] - ref["pixels"]).max()))
    assert worst <= 1, f"a heatmap pixel differs by {worst}/255 between batch sizes"
