"""`--weights PATH`: checkpoints as training code saves them, read with weights_only=True.

Accepted and reported: a `module.` (DataParallel/DDP), `model.` (Lightning) or `_orig_mod.` (torch.compile)
prefix, also stacked, and state dicts nested under `state_dict`, `model_state_dict` or `model`. Refused with one
line: keys that do not match (a few listed), shapes that do not match (with a num_classes hint), anything that
is not a state dict, and pickles of objects, which weights_only refuses before any of their code runs.
"""

from __future__ import annotations

import csv
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from click.testing import CliRunner
from helpers import one_line
from torch import nn

from gradcam_cli import load_settings
from gradcam_cli.cli import main
from gradcam_cli.errors import GradcamError
from gradcam_cli.model.loading import load_model
from gradcam_cli.run.explain import explain

pytestmark = pytest.mark.usefixtures("one_thread")


MODEL = "shufflenet_v2_x0_5"  # small (1.4M parameters) but real: BatchNorm buffers and an `fc` head


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """A model with weights that differ from any fresh random init: the 'fine-tuned' model we save."""
    torch.manual_seed(123)
    model = torchvision.models.get_model(MODEL, weights=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return model.eval()


def save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def load(path: Path, **extra: Any) -> Any:
    return load_model(load_settings(None, model=MODEL, weights=str(path), **extra))


def assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    ours, ref = model.state_dict(), reference.state_dict()
    assert set(ours) == set(ref)
    for key, value in ref.items():
        assert torch.equal(ours[key], value), key


# --- accepted layouts -----------------------------------------------------------------------------------------


def test_plain_state_dict_loads_without_notes(trained: nn.Module, tmp_path: Path) -> None:
    loaded = load(save(trained.state_dict(), tmp_path / "plain.pt"))
    assert_same_weights(loaded.model, trained)
    assert loaded.notes == []
    assert loaded.weights.endswith("plain.pt")


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda sd: prefixed(sd, "module."), ["'module.' prefix"]),
        (lambda sd: prefixed(sd, "_orig_mod."), ["'_orig_mod.' prefix"]),
        (lambda sd: {"state_dict": prefixed(sd, "model."), "epoch": 3}, ["'state_dict' entry", "'model.' prefix"]),
        (lambda sd: {"model": sd, "optimizer": {"lr": torch.tensor(0.1)}}, ["'model' entry"]),
        (lambda sd: {"model_state_dict": prefixed(sd, "module.")}, ["'model_state_dict' entry", "'module.'"]),
        (lambda sd: prefixed(sd, "module.model."), ["'module.' prefix", "'model.' prefix"]),
    ],
    ids=["module", "compile", "lightning", "model-entry", "model_state_dict", "stacked"],
)
def test_prefixed_and_nested_checkpoints_load_and_say_so(
    trained: nn.Module, tmp_path: Path, make: Callable[[dict[str, Any]], Any], says: list[str]
) -> None:
    loaded = load(save(make(trained.state_dict()), tmp_path / "ckpt.pt"))
    assert_same_weights(loaded.model, trained)
    text = " | ".join(loaded.notes)
    for phrase in says:
        assert phrase in text, (phrase, loaded.notes)
    assert all(note.startswith("weights ") for note in loaded.notes)
    if any("prefix" in s for s in says):
        assert f"from {len(trained.state_dict())} keys" in text


def test_missing_batchnorm_counters_are_tolerated(trained: nn.Module, tmp_path: Path) -> None:
    state = {k: v for k, v in trained.state_dict().items() if not k.endswith("num_batches_tracked")}
    loaded = load(save(state, tmp_path / "old.pt"))
    for key, value in state.items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_cli_reports_the_stripped_prefix(trained: nn.Module, tmp_path: Path, make_image: Callable[..., Path]) -> None:
    ckpt = save(prefixed(trained.state_dict(), "module."), tmp_path / "dp.pt")
    make_image(tmp_path / "in" / "a.png")
    args = ["explain", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", MODEL]
    result = CliRunner().invoke(main, [*args, "--weights", str(ckpt), "--workers", "0", "--save", "heatmap"])
    assert result.exit_code == 0, result.output
    assert f"stripped the 'module.' prefix from {len(trained.state_dict())} keys" in result.stderr
    with open(tmp_path / "out" / "predictions.csv", newline="") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["ok"]


# --- refused ----------------------------------------------------------------------------------------------------


def test_wrong_keys_list_a_few_of_each(trained: nn.Module, tmp_path: Path) -> None:
    state = trained.state_dict()
    state = {("head." + k[3:] if k.startswith("fc.") else k): v for k, v in state.items()}
    state["extra.scale"] = torch.ones(1)
    with pytest.raises(GradcamError) as exc:
        load(save(state, tmp_path / "renamed.pt"))
    message = one_line(exc, prefix="weights ")
    assert "keys do not match the model" in message
    assert "2 missing (e.g. fc.bias, fc.weight)" in message
    assert "3 unexpected (e.g. extra.scale, head.bias, head.weight)" in message


def test_many_wrong_keys_are_cut_short(tmp_path: Path) -> None:
    other = torchvision.models.mobilenet_v2(weights=None).state_dict()
    with pytest.raises(GradcamError) as exc:
        load(save(other, tmp_path / "other.pt"))
    message = one_line(exc, prefix="weights ")
    assert "missing (e.g." in message and "unexpected (e.g." in message and ", ...)" in message
    assert len(message) < 400


def test_prefix_is_not_stripped_when_it_does_not_help(trained: nn.Module, tmp_path: Path) -> None:
    state = prefixed(trained.state_dict(), "encoder.")
    with pytest.raises(GradcamError, match=rf"{len(state)} unexpected \(e\.g\. encoder\."):
        load(save(state, tmp_path / "encoder.pt"))


def test_fine_tuned_head_suggests_num_classes_and_then_loads(tmp_path: Path) -> None:
    torch.manual_seed(5)
    tuned = torchvision.models.get_model(MODEL, weights=None, num_classes=10).eval()
    ckpt = save({"state_dict": tuned.state_dict()}, tmp_path / "tuned.pt")
    with pytest.raises(GradcamError) as exc:
        load(ckpt)
    message = one_line(exc, prefix="weights ")
    assert "fc.weight (checkpoint 10x1024, model 1000x1024)" in message
    assert "set num_classes: 10" in message

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(10)) + "\n", encoding="utf-8")
    loaded = load(ckpt, num_classes=10, labels=str(labels))
    assert_same_weights(loaded.model, tuned)
    assert loaded.labels == [f"class {i}" for i in range(10)]


def test_whole_pickled_module_is_rejected_by_weights_only(trained: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(GradcamError) as exc:
        load(save(trained, tmp_path / "whole_model.pt"))
    message = one_line(exc, prefix="weights ")
    assert "weights_only=True" in message and "state_dict()" in message


class Payload:
    """Unpickling this would create `marker`: proof that weights_only never ran the pickle's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_arbitrary_pickle_is_rejected_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "evil.pt"
    with open(ckpt, "wb") as fh:
        pickle.dump({"state_dict": Payload(marker)}, fh, protocol=2)
    with pytest.raises(GradcamError) as exc:
        load(ckpt)
    assert "weights_only=True" in one_line(exc, prefix="weights ")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ([torch.zeros(3)], "expected a state dict (parameter name -> tensor), got list"),
        ({"epoch": 3, "lr": 0.1}, "expected a state dict"),
        ({}, "expected a state dict"),
        (torch.zeros(3), "got Tensor"),
    ],
)
def test_non_state_dicts_are_refused(tmp_path: Path, obj: Any, expected: str) -> None:
    with pytest.raises(GradcamError) as exc:
        load(save(obj, tmp_path / "thing.pt"))
    assert expected in one_line(exc, prefix="weights ")


def test_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a zip or pickle")
    with pytest.raises(GradcamError) as exc:
        load(junk)
    assert "not a loadable state dict" in one_line(exc, prefix="weights ")


def test_missing_checkpoint_path(tmp_path: Path) -> None:
    with pytest.raises(GradcamError, match="no such file"):
        load(tmp_path / "nope.pt")


def test_explain_with_a_checkpoint_end_to_end(trained: nn.Module, tmp_path: Path, make_image: Callable) -> None:
    ckpt = save({"model": prefixed(trained.state_dict(), "module.")}, tmp_path / "ckpt.pth")
    make_image(tmp_path / "in" / "x.jpg")
    messages: list[str] = []
    settings = load_settings(None, model=MODEL, weights=str(ckpt), workers=0, input_size=64, save="heatmap")
    summary = explain([tmp_path / "in"], tmp_path / "out", settings, log=messages.append)
    assert summary.ok == 1
    assert any("'model' entry" in m for m in messages) and any("'module.' prefix" in m for m in messages)
