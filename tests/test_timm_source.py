"""`--model timm:NAME` with the real timm package, offline: random-init models (a CNN and a small ViT) end to
end through the CLI, timm's preprocessing in run.json, the family default layers, Grad-CAM at a ViT's norm1
against a token-by-token reference, pretrained weights from a Hugging Face cache built here, and the
one-line errors. Sockets refuse to connect throughout: a test that reached for the network would fail."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import assert_usage_error, invoke, rows_of

from gradcam_cli import load_settings
from gradcam_cli.data.decode import decode_rgb, model_input
from gradcam_cli.model.labels import imagenet_labels
from gradcam_cli.model.layers import family_layer
from gradcam_cli.model.loading import load_model

timm = pytest.importorskip("timm")  # in the test extra; the import is what the tests below are about

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hub")

TINY_VIT = {"depth": 2, "img_size": 64}  # vit_tiny_patch16_224 cut to 2 blocks and 64 px: a 4x4 patch grid


def config(tmp_path: Path, **keys: Any) -> Path:
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(keys), encoding="utf-8")
    return path


def run_json(out: Path) -> dict[str, Any]:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))


def test_timm_cnn_end_to_end_with_its_preprocessing_and_imagenet_names(photos: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("explain", photos, "-o", out, "--model", "timm:resnet18", "--weights", "none", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert "target layer: layer4 (timm: the final feature map" in result.stderr
    rows = rows_of(out)
    assert [r["status"] for r in rows] == ["ok", "ok"] and {r["layer"] for r in rows} == {"layer4"}
    names = imagenet_labels()
    assert all(r["pred_label"] == names[int(r["pred_index"])] for r in rows)
    info = run_json(out)
    cfg = timm.create_model("resnet18").pretrained_cfg
    assert info["model"] == "timm:resnet18" and info["weights"] == "none"
    assert info["preprocessing"] == {
        "size": [224, 224],
        "resize_size": round(224 / cfg["crop_pct"]),
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "mode": "full",
        "interpolation": "bicubic",
    }
    assert cfg["interpolation"] == "bicubic"


def test_timm_vit_map_equals_a_token_by_token_reference(photos: Path, tmp_path: Path) -> None:
    """Grad-CAM at blocks[-1].norm1 recomputed here from its definition on the tokens themselves: the patch
    tokens A (16 of them, after the class token) and dy/dA from autograd; alpha_c = mean over tokens of
    dy/dA[:, c]; map = relu(sum_c alpha_c A[:, c]) laid out row by row on the 4x4 patch grid."""
    cfg = config(tmp_path, model="timm:vit_tiny_patch16_224", weights="none", model_kwargs=TINY_VIT)
    out = tmp_path / "out"
    result = invoke("explain", photos, "-o", out, "-c", cfg, "--workers", "0", "--save", "npy", "-q")
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert {r["layer"] for r in rows} == {"blocks.1.norm1"}

    loaded = load_model(load_settings(str(cfg)))  # seeded: the same weights as the run's
    model = loaded.model
    assert loaded.spec.size == (64, 64) and loaded.spec.interpolation == "bicubic"
    mean = torch.tensor(loaded.spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(loaded.spec.std).view(1, 3, 1, 1) * 255
    kept: list[torch.Tensor] = []
    handle = model.blocks[1].norm1.register_forward_hook(lambda m, i, o: kept.append(o))
    for row in rows:
        arr, _ = model_input(decode_rgb(photos / row["path"]), loaded.spec)
        x = (torch.from_numpy(arr)[None].float() - mean) / std
        kept.clear()
        logits = model(x)
        tokens = kept[0]  # (1, 1 + 16, C)
        target = int(logits.argmax(dim=1))
        assert target == int(row["target_index"])
        (grads,) = torch.autograd.grad(logits[0, target], tokens)
        patches, patch_grads = tokens[0, 1:].detach(), grads[0, 1:]  # drop the class token
        alpha = patch_grads.mean(dim=0)  # (C,)
        reference = torch.relu((patches * alpha).sum(dim=1)).reshape(4, 4)
        ours = np.load(out / "npy" / f"{row['path']}.npy")
        assert ours.shape == (4, 4)
        assert reference.abs().max() > 0
        np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-4, atol=1e-6 * float(reference.abs().max()))
    handle.remove()


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("resnet18", {}, "layer4"),
        ("convnext_atto", {"depths": (1, 1, 1, 1)}, "stages.3"),
        ("efficientnet_b0", {}, "bn2"),  # the head convolution's BatchNorm + SiLU: post-activation
        ("vit_tiny_patch16_224", TINY_VIT, "blocks.1.norm1"),
        ("deit_tiny_distilled_patch16_224", TINY_VIT, "blocks.1.norm1"),  # class + distillation tokens
        ("swin_tiny_patch4_window7_224", {"depths": (1, 1, 1, 1), "img_size": 64, "window_size": 2}, "layers.3"),
    ],
)
def test_family_default_layers(name: str, kwargs: dict[str, Any], expected: str) -> None:
    loaded = load_model(load_settings(None, model=f"timm:{name}", weights="none", model_kwargs=kwargs))
    found = family_layer(loaded.model, loaded.spec.size)
    assert found is not None and found[0] == expected


def test_layers_command_shows_the_family_default(tmp_path: Path) -> None:
    cfg = config(tmp_path, model_kwargs=TINY_VIT)
    result = invoke("layers", "timm:vit_tiny_patch16_224", "-c", cfg)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "input 3x64x64; default layer: blocks.1.norm1 (timm ViT family default" in lines[0]
    (picked,) = [ln for ln in lines if ln.startswith(">")]
    assert "blocks.1.norm1" in picked and "tokens as a 4x4 grid, first 1 token (class/prefix) dropped" in picked


def _cache_snapshot(cache: Path, repo: str, files: dict[str, Callable[[Path], None]]) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out: refs/main names the snapshot folder."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0123456789abcdef", encoding="utf-8")
    for name, write in files.items():
        write(snapshot / name)
    return snapshot


def test_default_weights_come_from_the_local_cache_only(offline_hub: Path, tmp_path: Path, photos: Path) -> None:
    from safetensors.torch import save_file

    out = tmp_path / "out"
    missing = invoke("explain", photos, "-o", out, "--model", "timm:resnet18", "--workers", "0")
    line = assert_usage_error(missing, "--weights DEFAULT", "timm/resnet18.a1_in1k", str(offline_hub))
    assert "nothing is downloaded" in line and not out.exists()

    torch.manual_seed(123)
    state = timm.create_model("resnet18").state_dict()
    _cache_snapshot(offline_hub, "timm/resnet18.a1_in1k", {"model.safetensors": lambda p: save_file(state, str(p))})
    loaded = load_model(load_settings(None, model="timm:resnet18"))  # --weights not given: DEFAULT
    assert loaded.weights == "DEFAULT (timm/resnet18.a1_in1k)"
    assert torch.equal(loaded.model.fc.weight, state["fc.weight"])
    assert len(loaded.labels) == 1000 and any("read from" in n for n in loaded.notes)


def test_checkpoint_path(tmp_path: Path) -> None:
    torch.manual_seed(7)
    source = timm.create_model("resnet18", num_classes=3)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ft.pt")
    loaded = load_model(load_settings(None, model="timm:resnet18", weights=str(tmp_path / "ft.pt"), num_classes=3))
    assert torch.equal(loaded.model.fc.weight, source.fc.weight)
    assert loaded.labels == [] and any("stripped the 'module.' prefix" in n for n in loaded.notes)


def test_create_model_stays_a_factory(tmp_path: Path) -> None:
    loaded = load_model(
        load_settings(None, model="timm:create_model", model_kwargs={"model_name": "resnet18", "num_classes": 4})
    )
    assert loaded.weights == "none" and loaded.model.fc.out_features == 4
    assert loaded.spec.interpolation == "bilinear"  # a factory's preprocessing is what it always was


@pytest.mark.parametrize(
    ("model", "weights", "needles"),
    [
        ("timm:resnet_18", "none", ("timm has no model 'resnet_18'", "did you mean resnet18")),
        ("timm:resnet18.no_such_tag", "DEFAULT", ("no pretrained weights 'resnet18.no_such_tag'", "resnet18.a1_in1k")),
        ("timm:resnet18", "missing.pt", ("--weights missing.pt: no such file",)),
    ],
)
def test_one_line_errors(photos: Path, tmp_path: Path, model: str, weights: str, needles: tuple[str, ...]) -> None:
    result = invoke("explain", photos, "-o", tmp_path / "out", "--model", model, "--weights", weights)
    assert_usage_error(result, *needles)


def test_without_timm_installed_says_which_extra(photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm gives on import
    result = invoke("explain", photos, "-o", tmp_path / "out", "--model", "timm:resnet18", "--weights", "none")
    assert_usage_error(result, "needs the timm package", 'pip install "gradcam-cli[timm]"')


def test_a_crop_mode_that_is_not_reproduced_is_said() -> None:
    overlay = {"pretrained_cfg_overlay": {"crop_mode": "squash", "crop_pct": 0.8}}
    loaded = load_model(
        load_settings(None, model="timm:resnet18", weights="none", preprocess="crop", model_kwargs=overlay)
    )
    assert (loaded.spec.mode, loaded.spec.resize_size) == ("crop", 280)  # 224 / 0.8
    assert any("crop_mode 'squash'" in n for n in loaded.notes)
