"""`--model hf:PATH_OR_REPO_ID` with the real transformers package, offline: tiny ViT, DeiT, ConvNeXt, ResNet
and Swin classifiers saved to folders here (random weights, class names in id2label, image-processor configs
with non-ImageNet sizes, means and stds), run end to end through the CLI; the CSV's class names, run.json's
preprocessing, the family default layers, a repo id found in a Hugging Face cache built here, and the one-line
errors. Sockets refuse to connect throughout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import assert_usage_error, invoke, rows_of

from gradcam_cli import load_settings
from gradcam_cli.model.hf_source import processor_cfg
from gradcam_cli.model.layers import family_layer
from gradcam_cli.model.loading import IMAGENET_MEAN, IMAGENET_STD, load_model

transformers = pytest.importorskip("transformers")  # in the test extra

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hub")

NAMES = {0: "tabby", 1: "espresso", 2: "lighthouse"}
LABELS = {"num_labels": 3, "id2label": NAMES, "label2id": {v: k for k, v in NAMES.items()}}
VIT_PROCESSOR = {
    "image_processor_type": "ViTImageProcessor",
    "do_resize": True,
    "size": {"height": 48, "width": 48},
    "resample": 3,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.3, 0.4, 0.5],
    "image_std": [0.2, 0.25, 0.3],
}


def _models() -> dict[str, tuple[Any, dict[str, Any] | None]]:
    """name -> (model with random weights, preprocessor_config.json or None), all tiny."""
    vit = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    return {
        "vit": (
            transformers.ViTForImageClassification(
                transformers.ViTConfig(image_size=48, patch_size=16, **vit, **LABELS)
            ),
            VIT_PROCESSOR,
        ),
        "deit": (
            transformers.DeiTForImageClassification(
                transformers.DeiTConfig(image_size=64, patch_size=16, **vit, **LABELS)
            ),
            {
                "image_processor_type": "DeiTImageProcessor",
                "size": {"height": 72, "width": 72},
                "do_center_crop": True,
                "crop_size": {"height": 64, "width": 64},
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            },
        ),
        "convnext": (
            transformers.ConvNextForImageClassification(
                transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], **LABELS)
            ),
            {
                "image_processor_type": "ConvNextImageProcessor",
                "size": {"shortest_edge": 64},
                "crop_pct": 0.8,
                "resample": 2,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.25, 0.25, 0.25],
            },
        ),
        "resnet": (
            transformers.ResNetForImageClassification(
                transformers.ResNetConfig(
                    embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic", **LABELS
                )
            ),
            None,  # no preprocessor_config.json: ImageNet defaults
        ),
        "swin": (
            transformers.SwinForImageClassification(
                transformers.SwinConfig(
                    image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, **LABELS
                )
            ),
            {"image_processor_type": "ViTImageProcessor", "size": {"height": 64, "width": 64}},
        ),
    }


def _save(model: Any, processor: dict[str, Any] | None, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    if processor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-models")
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    return {name: _save(model, proc, root / name) for name, (model, proc) in _models().items()}


def explain_hf(photos: Path, out: Path, model: str, *extra: Any) -> Any:
    result = invoke("explain", photos, "-o", out, "--model", model, "--workers", "0", *extra)
    assert result.exit_code == 0, result.output
    return result


def test_vit_folder_end_to_end(folders: dict[str, Path], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = explain_hf(photos, out, f"hf:{folders['vit']}")
    assert "target layer: vit.layers.1.layernorm_before (Hugging Face ViT family default" in result.stderr
    rows = rows_of(out)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert {r["layer"] for r in rows} == {"vit.layers.1.layernorm_before"}
    assert all(r["pred_label"] == NAMES[int(r["pred_index"])] for r in rows)  # the config's id2label
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert info["labels"] == ["tabby", "espresso", "lighthouse"]
    assert info["weights"] == f"DEFAULT ({folders['vit']})"
    pre = info["preprocessing"]
    assert pre["size"] == [48, 48] and pre["resize_size"] == 48 and pre["interpolation"] == "bicubic"
    assert pre["mean"] == pytest.approx([0.3, 0.4, 0.5]) and pre["std"] == pytest.approx([0.2, 0.25, 0.3])


def test_the_folders_weights_are_loaded(folders: dict[str, Path]) -> None:
    saved = transformers.AutoModelForImageClassification.from_pretrained(str(folders["convnext"]))
    loaded = load_model(load_settings(None, model=f"hf:{folders['convnext']}"))
    assert torch.equal(loaded.model.classifier.weight, saved.classifier.weight)
    fresh = load_model(load_settings(None, model=f"hf:{folders['convnext']}", weights="none"))
    assert fresh.weights == "none" and not torch.equal(fresh.model.classifier.weight, saved.classifier.weight)


@pytest.mark.parametrize(
    ("name", "layer", "size", "resize", "mean", "std", "interpolation"),
    [
        ("deit", "deit.layers.1.layernorm_before", (64, 64), 72, (0.5,) * 3, (0.5,) * 3, "bicubic"),
        ("convnext", "convnext.encoder.stages.3", (64, 64), 80, (0.5,) * 3, (0.25,) * 3, "bilinear"),
        ("resnet", "resnet.encoder.stages.3", (224, 224), 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        ("swin", "swin.layernorm", (64, 64), 64, (0.5,) * 3, (0.5,) * 3, "bilinear"),
    ],
)
def test_families_layers_and_preprocessing(
    folders: dict[str, Path],
    name: str,
    layer: str,
    size: tuple[int, int],
    resize: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    interpolation: str,
) -> None:
    loaded = load_model(load_settings(None, model=f"hf:{folders[name]}"))
    spec = loaded.spec
    assert (spec.size, spec.resize_size, spec.interpolation) == (size, resize, interpolation)
    assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)
    found = family_layer(loaded.model, spec.size)
    assert found is not None and found[0] == layer
    assert loaded.labels == ["tabby", "espresso", "lighthouse"]


def test_swin_runs_at_its_final_layernorm(folders: dict[str, Path], photos: Path, tmp_path: Path) -> None:
    # 64 px / 4 px patches = 16x16 tokens, halved once by the patch merging between the two stages
    result = explain_hf(photos, tmp_path / "out", f"hf:{folders['swin']}", "--save", "npy")
    assert "layer swin.layernorm: tokens as a 8x8 grid\n" in result.stderr  # no prefix token to drop
    assert {r["status"] for r in rows_of(tmp_path / "out")} == {"ok"}
    maps = [np.load(p) for p in sorted((tmp_path / "out" / "npy").rglob("*.npy"))]
    assert [m.shape for m in maps] == [(8, 8), (8, 8)] and all(m.max() > m.min() for m in maps)


def test_layers_command(folders: dict[str, Path]) -> None:
    result = invoke("layers", f"hf:{folders['resnet']}")
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert "input 3x224x224; default layer: resnet.encoder.stages.3 (Hugging Face CNN default" in first


def test_processor_rescale_and_crop_are_mapped() -> None:
    # a processor that keeps 0-255 pixels (no rescale) normalises with 0-255 means: ours are in 0-1 units
    raw = transformers.ViTImageProcessor(
        size={"height": 32, "width": 40}, do_rescale=False, image_mean=[127.5] * 3, image_std=[127.5] * 3
    )
    cfg = processor_cfg(raw)
    assert cfg["input_size"] == (3, 32, 40) and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == pytest.approx((0.5,) * 3) and cfg["std"] == pytest.approx((0.5,) * 3)
    # ConvNeXt's processor warps from 384 px up (no crop)
    big = processor_cfg(transformers.ConvNextImageProcessor(size={"shortest_edge": 384}, crop_pct=0.875))
    assert big["input_size"] == (3, 384, 384) and big["crop_pct"] == 1.0 and big["interpolation"] == "bicubic"


def test_crop_mode_follows_the_processors_resize_and_crop(folders: dict[str, Path]) -> None:
    spec = load_model(load_settings(None, model=f"hf:{folders['deit']}", preprocess="crop")).spec
    assert (spec.mode, spec.resize_size, spec.size) == ("crop", 72, (64, 64))


def test_a_repo_id_from_the_cache(folders: dict[str, Path], offline_hub: Path, photos: Path, tmp_path: Path) -> None:
    missing = invoke("explain", photos, "-o", tmp_path / "out", "--model", "hf:acme/tiny-vit")
    line = assert_usage_error(missing, "hf:acme/tiny-vit", "not in the Hugging Face cache", "models--acme--tiny-vit")
    assert str(offline_hub) in line

    snapshot = offline_hub / "models--acme--tiny-vit" / "snapshots" / "feedface"
    snapshot.parent.mkdir(parents=True)
    (offline_hub / "models--acme--tiny-vit" / "refs").mkdir()
    (offline_hub / "models--acme--tiny-vit" / "refs" / "main").write_text("feedface", encoding="utf-8")
    import shutil

    shutil.copytree(folders["vit"], snapshot)
    explain_hf(photos, tmp_path / "out", "hf:acme/tiny-vit", "-q")
    assert {r["pred_label"] for r in rows_of(tmp_path / "out")} <= set(NAMES.values())
    info = json.loads((tmp_path / "out" / "run.json").read_text(encoding="utf-8"))
    assert info["weights"] == "DEFAULT (acme/tiny-vit snapshot feedface)"


def test_checkpoint_path(folders: dict[str, Path], tmp_path: Path) -> None:
    torch.manual_seed(5)
    other = transformers.ResNetForImageClassification.from_pretrained(str(folders["resnet"]))
    torch.nn.init.normal_(other.classifier[1].weight)
    torch.save(other.state_dict(), tmp_path / "ft.pt")
    loaded = load_model(load_settings(None, model=f"hf:{folders['resnet']}", weights=str(tmp_path / "ft.pt")))
    assert torch.equal(loaded.model.classifier[1].weight, other.classifier[1].weight)


def test_one_line_errors(folders: dict[str, Path], photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert_usage_error(invoke("explain", photos, "-o", out, "--model", "hf:./nowhere"), "no such folder")
    assert_usage_error(invoke("explain", photos, "-o", out, "--model", f"hf:{tmp_path}"), "has no config.json")
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(str(bert))
    assert_usage_error(invoke("explain", photos, "-o", out, "--model", f"hf:{bert}"), "a 'bert' model")
    result = invoke("explain", photos, "-o", out, "--model", f"hf:{folders['vit']}", "-c", _num_classes(tmp_path, 5))
    assert_usage_error(result, "has 3 classes")
    assert not out.exists()


def _num_classes(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "n.yaml"
    path.write_text(f"num_classes: {n}\n", encoding="utf-8")
    return path


def test_without_transformers_installed_says_which_extra(
    folders: dict[str, Path], photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    result = invoke("explain", photos, "-o", tmp_path / "out", "--model", f"hf:{folders['vit']}")
    assert_usage_error(result, "needs the transformers package", 'pip install "gradcam-cli[hf]"')
