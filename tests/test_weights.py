"""--weights: torchvision enums through the hub cache, checkpoint paths, class names; never a download in tests."""

from __future__ import annotations

import csv
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from gradcam_cli import GradcamError, explain, load_settings
from gradcam_cli.model.loading import load_model

FAST = {"workers": 0, "quiet": True, "input_size": 64, "device": "cpu"}


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub cache and a download that fails like an offline machine's."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return hub


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (80, 60), (200, 30, 30)).save(folder / "red.png")
    return folder


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_uncached_weights_fail_in_one_line_naming_the_file(no_download: Path) -> None:
    with pytest.raises(GradcamError) as info:
        load_model(load_settings(model="resnet18", weights="DEFAULT"))
    message = str(info.value)
    assert "\n" not in message
    assert "ResNet18_Weights.IMAGENET1K_V1" in message
    assert str(no_download / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "--weights PATH" in message and "could not be downloaded" in message


def test_cached_weights_load_from_the_hub_cache(no_download: Path, photo: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    state = torchvision.models.resnet18().state_dict()
    (no_download / "checkpoints").mkdir(parents=True)
    torch.save(state, no_download / "checkpoints" / "resnet18-f37072fd.pth")
    loaded = load_model(load_settings(model="resnet18", weights="IMAGENET1K_V1"))
    assert loaded.weights == "ResNet18_Weights.IMAGENET1K_V1"
    assert torch.equal(loaded.model.state_dict()["fc.weight"], state["fc.weight"])
    assert loaded.labels[0] == "tench" and len(loaded.labels) == 1000  # class names from the weights' metadata
    assert loaded.spec.size == (224, 224) and loaded.spec.resize_size == 256


def test_unknown_weights_name_lists_the_valid_ones() -> None:
    with pytest.raises(GradcamError, match=r"IMAGENET1K_V1, IMAGENET1K_V2"):
        load_model(load_settings(model="resnet50", weights="IMAGENET1K_V9"))


def test_checkpoint_path_gives_the_same_predictions_as_the_weights(photo: Path, tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = torchvision.models.resnet18()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, ckpt)
    summary = explain([photo], tmp_path / "out", load_settings(model="resnet18", weights=str(ckpt), **FAST))
    assert summary.exit_code == 0
    row = _rows(tmp_path / "out")[0]
    x = torch.from_numpy(np.array(Image.open(photo / "red.png").resize((64, 64)))).permute(2, 0, 1)
    x = (x.float() / 255 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[
        :, None, None
    ]
    with torch.no_grad():
        probs = model.eval()(x[None]).softmax(1)[0]
    assert int(row["pred_index"]) == int(probs.argmax())
    assert float(row["pred_prob"]) == pytest.approx(float(probs.max()), abs=1e-4)


def test_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(GradcamError, match=r"weights .*bad\.pt: not a loadable state dict"):
        load_model(load_settings(model="resnet18", weights=str(bad)))


def test_labels_file_from_the_config_names_the_classes(photo: Path, tmp_path: Path) -> None:
    (tmp_path / "names.txt").write_text("\n".join(f"class-{i}" for i in range(1000)) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text("model: resnet18\nweights: none\nlabels: names.txt\n")  # relative to the config file
    explain([photo], tmp_path / "out", load_settings(config, **FAST))
    row = _rows(tmp_path / "out")[0]
    assert row["pred_label"] == f"class-{row['pred_index']}"


def test_random_init_is_seeded_so_runs_agree() -> None:
    first = load_model(load_settings(model="resnet18", weights="none")).model.state_dict()["fc.weight"]
    second = load_model(load_settings(model="resnet18", weights="none")).model.state_dict()["fc.weight"]
    other = load_model(load_settings(model="resnet18", weights="none", seed=1)).model.state_dict()["fc.weight"]
    assert torch.equal(first, second) and not torch.equal(first, other)
