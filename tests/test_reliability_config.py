"""Hostile and wrong configuration: fuzzed YAML, malicious pickles and YAML tags, output paths that try to
leave OUT, and the usage errors that must each be one clear line with exit code 2.

The fuzz tests use hypothesis with fixed seeds (`derandomize=True`), so CI sees the same examples every time;
run them with `--hypothesis-seed=N` and without derandomize to explore further.
"""

from __future__ import annotations

import csv
import os
import pickle
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from click.testing import Result
from helpers import invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcam_cli.config import VALIDATORS, flag_name, load_settings, read_config
from gradcam_cli.data.discover import discover
from gradcam_cli.errors import GradcamError
from gradcam_cli.out.table import BASE_COLUMNS
from gradcam_cli.out.writer import OutputWriter
from gradcam_cli.render.colormaps import COLORMAP_NAMES
from gradcam_cli.render.encode import encode_png

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def one_error_line(result: Result) -> str:
    """Exit 2, a SystemExit (no other exception), exactly one non-empty stderr line starting with 'Error:'."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), lines
    return lines[0]


# --- fuzzing the config -------------------------------------------------------------------------------------

KEYS = sorted(VALIDATORS)
# how an error may name a key besides its own name and flag: layer errors quote the layer ('layer 'x'')
ALIASES: dict[str, tuple[str, ...]] = {"target_layers": ("layer '",), "targets": ("--target",)}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", " ", "none", "pred", "0", "-1", "topk:2", "layer4", "cuda", "1e999", "\x00", "../x"]),
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
# values that are valid for the toy probe model (or nearly), so that many configs pass validation and run
PLAUSIBLE: dict[str, list[Any]] = {
    "model": ["toy_models:probe", "resnet18"],
    "weights": ["none", "missing-checkpoint.pt"],
    "target_layers": ["features", ["features"], "features.pool", "fc", "features.nope", "features[-1]"],
    "method": ["gradcam", "GradCAM", "eigencam", "scorecam", "ablationcam", "cam", "guided-gradcam"],
    "targets": ["pred", "topk:1", "topk:2", "topk:3", 0, 1, 2, "bright", ["dark", "pred"], "nope"],
    "batch_size": [1, 2, 3, 64],
    "device": ["cpu", "auto", "cuda", "cuda:7", "mps"],
    "workers": [0, 1],
    "save": ["heatmap", "npy", "heatmap,overlay,npy", [], ["overlay"]],
    "colormap": list(COLORMAP_NAMES),
    "alpha": [0, 0.3, 1],
    "preprocess": ["full", "crop"],
    "input_size": [8, 17, [16, 24], [8, 512]],
    "mean": [[0, 0, 0], [0.5, 0.4, 0.3], [1e300, 0, 0]],
    "std": [[1, 1, 1], [0.2, 0.3, 0.4], [1e-300, 1, 1]],
    "labels": ["labels.txt", "missing-labels.txt"],
    "model_kwargs": [{}, None, {"num_classes": 3}],
    "num_classes": [None, 2, 3],
    "limit": [1, 2, 100],
    "quiet": [True, False],
    "max_pixels": [1, 900, 10**9],
    "resume": [True, False],
    "fsync": [True, False],
    "amp": ["none", "bf16", "fp16", "fp32"],
    "channels_last": [True, False, "auto"],
    "decode": ["auto", "workers", "device", "nvjpeg"],
    "seed": [0, 7, 2**40],
    # audit; boxes.csv and masks/ exist in the end-to-end test's folder
    "metrics": ["deletion", "drop", "pointing,energy", [], ["insertion", "deletion"], "speed"],
    "steps": [2, 3, 1],
    "baseline": ["blur", "zero", "mean", "noise"],
    "metric_batch_size": [1, 4, None],
    "randomization": ["head", "cascade", "independent"],
    "sensitivity_samples": [1, 10, 0],
    "sensitivity_radius": [0.05, 0.0, "x"],
    "groups": ["groups.csv", "folders:1", "folders:0", ""],
    "group_min_count": [1, 3, 0],
    "boxes": ["boxes.csv", "missing-boxes.csv"],
    "masks": ["masks", "missing-masks"],
    "summary": [True, False],
    "truth": ["auto", "none", "folders", "missing-truth.csv"],
    "worst": [0, 3],
    "fail_under": [{"pointing": 0.5}, ["accuracy=0.5"], "energy=10%", {}],
    "fail_over": [{"deletion": 0.9}, "drop=50", ["gap:energy=0.1"], {"gap:site:accuracy": "5%"}, []],
    "only_below": [0.5, 1, 0],
    "sample_rate": [0.5, 1, "50%", 0],
    "files_from": ["list.txt", "-", ""],
    "compare_to": ["earlier_out", ""],
    "dist_timeout": [0.5, 120, 0, -3],  # torchrun
    # CAM method options
    "counterfactual": [True, False],
    "aug_smooth": [True, False],
    "eigen_smooth": [True, False],
    "chunk_size": [1, 3, 64],
    "fuse": ["none", "mean", "max"],
}
assert set(PLAUSIBLE) == set(VALIDATORS)


@st.composite
def configs(draw: st.DrawFn, plausible: float) -> dict[Any, Any]:
    """A YAML-able mapping: known keys (mostly plausible values, sometimes anything) and sometimes junk keys."""
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=7, unique=True))
    config: dict[Any, Any] = {}
    for key in keys:
        use_plausible = draw(st.floats(0, 1)) < plausible
        config[key] = draw(st.sampled_from(PLAUSIBLE[key])) if use_plausible else draw(anything)
    if draw(st.integers(0, 9)) == 0:
        config[draw(st.one_of(st.text(max_size=10), st.integers()))] = draw(anything)
    return config


def _names_a_key(line: str, config: dict[Any, Any]) -> bool:
    """The line names one of the config's keys: as written, escaped (a key '\\r'), as a flag, or by an alias."""
    names = [(str(k), repr(str(k))[1:-1], flag_name(str(k)), *ALIASES.get(str(k), ())) for k in config]
    return any(name in line for group in names for name in group)


@settings(FUZZ, max_examples=250)
@given(config=configs(plausible=0.3))
def test_any_config_mapping_validates_or_fails_naming_a_key(tmp_path: Path, config: dict[Any, Any]) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    read_back = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML may normalise odd keys ('\x85' -> ' ')
    try:
        load_settings(path)
    except GradcamError as exc:
        message = str(exc)
        assert message and "\n" not in message
        assert _names_a_key(message, read_back), (message, config)


@settings(FUZZ, max_examples=300)
@given(text=st.text(max_size=200))
def test_any_text_as_config_parses_or_fails_with_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        read_config(path)
    except GradcamError as exc:
        assert str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize(
    "text",
    [
        "alpha: 2001-13-45\n",  # the safe loader raises ValueError for an impossible date
        "alpha: !!int x\n",
        "alpha: !!timestamp x\n",
        "model_kwargs: " + "[" * 600 + "]" * 600 + "\n",  # RecursionError
        "std: [.nan, 1, 1]\n",
        "std: [0, 1, 1]\n",
        "mean: [.inf, 0, 0]\n",
        "input_size: 100000\n",
        'labels: "a\\0b"\n',
        'weights: "x\\0"\n',
    ],
)
def test_config_values_found_by_fuzzing(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(GradcamError) as exc:
        load_settings(path)
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message or "config key" in message, message


@pytest.fixture(scope="module")
def two_images(tmp_path_factory: pytest.TempPathFactory, make_image: Callable[..., Path]) -> Path:
    src = tmp_path_factory.mktemp("fuzzin") / "in"
    make_image(src / "a.png", size=(40, 24), seed=1)
    make_image(src / "b.jpg", size=(30, 30), seed=2)
    return src


@settings(FUZZ, max_examples=60)
@given(config=configs(plausible=0.8))
def test_any_config_runs_or_exits_2_with_one_line(
    tmp_path_factory: pytest.TempPathFactory, two_images: Path, config: dict[Any, Any]
) -> None:
    """End to end through the CLI with the toy model: exit 0 or 1 with a CSV, 3 (a gate failed) with a CSV and
    summary.json, or exit 2 with one line naming a key. Never a traceback, never exit 4. (--model/--workers/-q on
    the command line keep it fast; the config's own values for them are still validated.)"""
    folder = tmp_path_factory.mktemp("fuzzrun")
    (folder / "labels.txt").write_text("light\nshade\n", encoding="utf-8")
    (folder / "boxes.csv").write_text("path,x0,y0,x1,y1,label\na.png,0,0,20,12,bright\n", encoding="utf-8")
    (folder / "masks").mkdir()
    cfg = folder / "fuzz.yaml"
    cfg.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    read_back = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    out = folder / "out"
    result = invoke("explain", two_images, "-o", out, "-c", cfg, "--model", "toy_models:probe", "--workers", "0", "-q")
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (repr(result.exception), config)
    assert result.exit_code in (0, 1, 2, 3), (result.exit_code, result.output, config)
    if result.exit_code == 2:
        line = one_error_line(result)
        assert _names_a_key(line, read_back), (line, config)
        return
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert rows, config
    assert all(r["error"] for r in rows if r["status"] == "error")
    if result.exit_code == 3:  # a gate failed: it says so, and it wins over failed images
        assert (out / "summary.json").is_file() and "Error: gate failed:" in result.stderr, config
        return
    assert (result.exit_code == 1) == any(r["status"] == "error" for r in rows)


# --- malicious pickles and YAML tags ------------------------------------------------------------------------


class _CreatesAFile:
    """Unpickling this calls os.mkdir(path): the classic payload of a hostile checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_weights_pickle_with_a_payload_is_not_executed(tmp_path: Path, two_images: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    payload = {"features.weight": torch.zeros(1, 3, 1, 1), "trap": _CreatesAFile(marker)}
    if fmt == "torch-zip":
        torch.save(payload, ckpt)
    elif fmt == "torch-legacy":
        torch.save(payload, ckpt, _use_new_zipfile_serialization=False)
    else:
        ckpt.write_bytes(pickle.dumps(payload))
    # the payload is real: an unsafe load runs it
    if fmt != "plain-pickle":
        torch.load(ckpt, weights_only=False)
    else:
        pickle.loads(ckpt.read_bytes())
    assert marker.is_dir()
    marker.rmdir()
    result = invoke("explain", two_images, "-o", tmp_path / "out", "--model", "toy_models:probe", "--weights", ckpt)
    line = one_error_line(result)
    assert "weights " in line and "weights_only=True" in line
    assert not marker.exists(), "the checkpoint's payload ran"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "tagged",
    [
        "model: !!python/object/apply:os.mkdir ['{marker}']",
        "model: !!python/object/new:os.mkdir ['{marker}']",
        "model_kwargs: {{x: !!python/name:os.system }}",
    ],
)
def test_yaml_tags_are_not_executed(tmp_path: Path, two_images: Path, tagged: str) -> None:
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(tagged.format(marker=marker) + "\n", encoding="utf-8")
    line = one_error_line(invoke("explain", two_images, "-o", tmp_path / "out", "-c", cfg))
    assert str(cfg) in line
    assert not marker.exists()


# --- outputs stay inside OUT ---------------------------------------------------------------------------------


def test_writer_refuses_paths_that_leave_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    writer = OutputWriter(out, out / "predictions.csv", BASE_COLUMNS)
    heat = np.zeros((2, 2), np.uint8)
    try:
        for rel in ("../escaped.png", "heatmaps/../../escaped.png", str(tmp_path / "abs.png"), "/etc/x.png", ""):
            with pytest.raises(GradcamError, match="refusing"):
                writer.submit_batch([(rel, partial(encode_png, heat))], [])
    finally:
        writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_input_paths_never_make_output_names_with_dotdot(
    tmp_path: Path, make_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    make_image(tmp_path / "imgs" / "a.png")
    make_image(tmp_path / "imgs" / "deep" / "b.png")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for inputs in (["../imgs"], ["../imgs/deep/../a.png"], [str(tmp_path / "imgs")], [".."], ["../imgs/."]):
        rels = [f.rel for f in discover(inputs)]
        assert rels, inputs
        for rel in rels:
            assert not rel.startswith("/") and ".." not in rel.split("/") and "." not in rel.split("/"), (inputs, rel)


@pytest.mark.parametrize("linked", ["heatmaps", "overlays/sub"])
def test_symlinked_output_folder_is_refused(
    tmp_path: Path, make_image: Callable[..., Path], linked: str, two_images: Path
) -> None:
    src = tmp_path / "in"
    make_image(src / "sub" / "a.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    (out / linked).parent.mkdir(parents=True)
    (out / linked).symlink_to(outside)
    line = one_error_line(invoke("explain", src, "-o", out, "--model", "toy_models:probe", "--workers", "0", "-q"))
    assert "outside" in line and str(outside) in line
    assert list(outside.iterdir()) == []


def test_csv_and_run_json_symlinks_are_replaced_not_followed(
    tmp_path: Path, two_images: Path, make_image: Callable[..., Path]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    victims = {name: tmp_path / f"victim-{name}" for name in ("predictions.csv", "run.json")}
    for name, victim in victims.items():
        victim.write_text("precious", encoding="utf-8")
        (out / name).symlink_to(victim)
    result = invoke("explain", two_images, "-o", out, "--model", "toy_models:probe", "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    for name, victim in victims.items():
        assert victim.read_text(encoding="utf-8") == "precious"
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0


# --- usage errors: exit 2, one clear line each ---------------------------------------------------------------

NO_CUDA_DEVICE = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--model", "resnet18", "--device", NO_CUDA_DEVICE], [NO_CUDA_DEVICE]),
        (["--model", "resnet18", "--batch-size", "0"], ["--batch-size", "positive integer"]),
        (["--model", "resnet18", "--layer", "fc"], ["layer 'fc'", "not a spatial"]),
        (["--model", "resnet18", "--layer", "avgpool"], ["layer 'avgpool'", "1x1 map"]),
        (["--model", "resnt18"], ["resnt18", "did you mean", "resnet18"]),
        (["--model", "resnet_18"], ["resnet_18", "resnet18"]),
        (["--model", "toy_models:nope"], ["toy_models:nope", "no attribute"]),
        (["--model", "toy_models:probe", "--layer", "features.nope"], ["features.nope"]),
        (["--model", "toy_models:probe", "--max-pixels", "0"], ["--max-pixels", "positive integer"]),
        (["--model", "toy_models:probe", "--target", "7"], ["--target 7", "2 classes"]),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    tmp_path: Path, two_images: Path, args: list[str], needles: list[str]
) -> None:
    cfg = tmp_path / "small.yaml"
    cfg.write_text("input_size: 64\nweights: none\n", encoding="utf-8")
    line = one_error_line(invoke("explain", two_images, "-o", tmp_path / "out", "-c", cfg, "--workers", "0", *args))
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (tmp_path / "out").exists(), "a usage error must not write anything"
