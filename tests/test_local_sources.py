"""What a CI job has instead of a folder and a packaged model: a list of files, a `mynet.py` next to it, a config
that names paths relative to itself.

- `--files-from FILE` / `-` (stdin): paths relative to the list's folder (or the current one for stdin), missing
  files become error rows, `path` in the CSV stays relative to the list's folder, combined with INPUTS;
- `--model mynet:build` with mynet.py in the current folder, and `--model path/to/file.py:build`; whatever
  fails while importing is one line and exit 2, never exit 4;
- `weights:` and `files_from:` in a config are relative to the config file;
- stdout stays clean when torchvision tries to download weights.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_usage_error, invoke

from gradcam_cli.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

OFFLINE_R18 = ["--model", "resnet18", "--weights", "DEFAULT", "-q"]
TINY = ["--model", "resnet18", "--weights", "none", "--workers", "0", "-q"]
MYNET = textwrap.dedent(
    """
    from torch import nn


    def build(num_classes: int = 3) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)
        )
    """
)


def rows_of(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def in_tmp(tmp_path: Path) -> Iterator[Path]:
    """The test runs in tmp_path as its current folder (what a CI job's workspace is)."""
    before = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(before)


@pytest.fixture
def dataset(tmp_path: Path, make_image: Callable[..., Path]) -> Path:
    root = tmp_path / "data"
    make_image(root / "a.png", seed=1, size=(40, 30))
    make_image(root / "cats" / "b.jpg", seed=2, size=(30, 40))
    make_image(root / "cats" / "c.png", seed=3, size=(32, 32))
    return root


# ------------------------------------------------------------------------------------------------ --files-from


def test_files_from_a_list_relative_to_its_folder(dataset: Path, tmp_path: Path) -> None:
    listing = dataset / "changed.txt"
    listing.write_text("# images changed in this commit\ncats/b.jpg\n\na.png\nmissing.png\ncats/b.jpg\n")
    out = tmp_path / "out"
    result = invoke("explain", "--files-from", listing, "-o", out, *TINY)
    assert result.exit_code == 1, result.output  # one listed file is missing: its row, exit 1
    rows = rows_of(out)
    assert [(r["path"], r["status"]) for r in rows] == [
        ("cats/b.jpg", "ok"),
        ("a.png", "ok"),
        ("missing.png", "error"),
    ]
    assert "file not found" in rows[2]["error"] and "line 5" in rows[2]["error"]
    assert (out / rows[0]["overlay"]).is_file() and rows[0]["overlay"].startswith("overlays/cats/b")
    run = json.loads((out / "run.json").read_text())
    assert str(dataset.resolve()) in run["input_roots"]


def test_files_from_stdin_relative_to_the_current_folder(dataset: Path, in_tmp: Path) -> None:
    absolute = dataset / "a.png"
    text = f"data/cats/c.png\n{absolute}\n"
    result = CliRunner().invoke(main, ["explain", "--files-from", "-", "-o", "out", *TINY], input=text)
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in rows_of(in_tmp / "out")] == ["data/cats/c.png", "data/a.png"]


def test_files_from_combined_with_inputs_and_outside_paths(
    dataset: Path, tmp_path: Path, make_image: Callable[..., Path]
) -> None:
    elsewhere = make_image(tmp_path / "elsewhere" / "a.png", seed=9)
    listing = tmp_path / "lists" / "extra.txt"
    listing.parent.mkdir()
    listing.write_text(f"{elsewhere}\n../data/cats\n")  # a file outside the list's folder, and a folder
    out = tmp_path / "out"
    result = invoke("explain", dataset / "cats", "--files-from", listing, "-o", out, *TINY)
    assert result.exit_code == 0, result.output
    paths = [r["path"] for r in rows_of(out)]
    # INPUTS first (b.jpg, c.png); then the listed file outside the list's folder, named by its file name;
    # then the listed folder, whose images are already explained under the same names: prefixed, never lost
    assert paths[:3] == ["b.jpg", "c.png", "a.png"]
    assert sorted(paths[3:]) == ["cats/b.jpg", "cats/c.png"]


def test_files_from_errors_are_one_line(tmp_path: Path) -> None:
    assert_usage_error(invoke("explain", "-o", tmp_path / "o1", *TINY), "nothing to explain", "--files-from")
    assert_usage_error(
        invoke("explain", "--files-from", tmp_path / "nope.txt", "-o", tmp_path / "o2", *TINY), "nope.txt"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert_usage_error(invoke("explain", "--files-from", empty, "-o", tmp_path / "o3", *TINY), "no images found")


def test_files_from_in_a_config_is_relative_to_the_config(dataset: Path, tmp_path: Path) -> None:
    (dataset / "list.txt").write_text("a.png\n")
    config = dataset / "job.yaml"
    config.write_text("files_from: list.txt\n")
    out = tmp_path / "out"
    result = invoke("explain", "-c", config, "-o", out, *TINY)
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in rows_of(out)] == ["a.png"]


# --------------------------------------------------------------------------------------- local model code


@pytest.mark.parametrize("spelling", ["mynet:build", "./mynet.py:build", "models/mynet.py:build", "ABSOLUTE"])
def test_a_model_file_in_the_current_folder(spelling: str, dataset: Path, in_tmp: Path) -> None:
    (in_tmp / "mynet.py").write_text(MYNET)
    (in_tmp / "models").mkdir()
    (in_tmp / "models" / "mynet.py").write_text(MYNET)
    model = f"{in_tmp / 'mynet.py'}:build" if spelling == "ABSOLUTE" else spelling
    result = invoke("explain", dataset, "-o", "out", "--model", model, "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((in_tmp / "out" / "run.json").read_text())["model"] == model
    assert len(rows_of(in_tmp / "out")) == 3


def test_a_model_file_imports_its_siblings(dataset: Path, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "blocks.py").write_text(MYNET)
    (code / "net.py").write_text("from blocks import build as make\n\ndef build():\n    return make(num_classes=2)\n")
    result = invoke(
        *("explain", dataset, "-o", tmp_path / "out", "--model", f"{code / 'net.py'}:build"),
        *("--workers", "0", "-q"),
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("name", "source", "needles"),
    [
        ("nomod:build", None, ("cannot import module 'nomod'", "current folder")),
        ("broken:build", "import no_such_package_xyz\n", ("importing module 'broken'", "no_such_package_xyz")),
        ("./broken.py:build", "def build(:\n", ("SyntaxError", "broken.py, line 1")),
        ("./broken.py:build", "raise RuntimeError('needs a GPU')\n", ("RuntimeError: needs a GPU",)),
        ("./missing.py:build", None, ("no such file", "missing.py")),
        ("./broken.py:nope", "x = 1\n", ("has no attribute 'nope'",)),
    ],
)
def test_model_code_that_cannot_be_imported_is_a_usage_error(
    name: str, source: str | None, needles: tuple[str, ...], dataset: Path, in_tmp: Path
) -> None:
    if source is not None:
        (in_tmp / name.split(":")[0].removeprefix("./").removesuffix(".py")).with_suffix(".py").write_text(source)
    assert_usage_error(invoke("explain", dataset, "-o", "out", "--model", name, "-q"), *needles)
    assert not (in_tmp / "out").exists()


# ----------------------------------------------------------------------------------- config paths and stdout


def test_weights_in_a_config_are_relative_to_the_config(dataset: Path, tmp_path: Path, in_tmp: Path) -> None:
    import torchvision

    folder = tmp_path / "job"
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), folder / "finetuned.pt")
    (folder / "job.yaml").write_text("model: resnet18\nnum_classes: 4\nweights: finetuned.pt\n")
    result = invoke("explain", dataset, "-o", "out", "-c", folder / "job.yaml", "--workers", "0", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((in_tmp / "out" / "run.json").read_text())["weights"] == str(folder / "finetuned.pt")
    (folder / "bad.yaml").write_text("model: resnet18\nweights: nothere.pt\n")
    bad = invoke("explain", dataset, "-o", "out2", "-c", folder / "bad.yaml", "-q")
    message = assert_usage_error(bad, "nothere.pt")
    assert str(folder / "nothere.pt") in message and "--weights" not in message


def test_a_failed_weights_download_keeps_stdout_clean(dataset: Path, tmp_path: Path) -> None:
    """torch.hub announces downloads on stdout; offline (or not), scripts reading stdout must not see it."""
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "hub"), "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    done = subprocess.run(
        [sys.executable, "-m", "gradcam_cli", "explain", str(dataset), "-o", str(tmp_path / "out"), *OFFLINE_R18],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("Error: weights ResNet18_Weights")
