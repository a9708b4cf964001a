"""What several test files share: the CLI run in-process, one-line error checks, OUT read back as a script
would, and the fixed model and images the CAM comparisons use. Test files import this, never each other."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner, Result
from torch import Tensor, nn

from gradcam_cli.cli import main
from gradcam_cli.errors import GradcamError

# resnet18 with random weights, decoding in the test process, no progress bar
R18 = ["--model", "resnet18", "--weights", "none", "--workers", "0", "-q"]


# ------------------------------------------------------------------------------------------------------ the CLI


def invoke(*args: Any) -> Result:
    """`gradcam ARGS...` through Click's CliRunner (in this process)."""
    return CliRunner().invoke(main, [str(a) for a in args])


def explain(inputs: Path | Sequence[Path], out: Path, *extra: Any) -> Result:
    """`gradcam explain INPUTS -o OUT` with resnet18 (random weights) and `extra` flags."""
    paths = [inputs] if isinstance(inputs, Path) else list(inputs)
    return invoke("explain", *paths, "-o", out, *R18, *extra)


def assert_usage_error(result: Result, *needles: str) -> str:
    """Exit 2, exactly one line on stderr, starting with 'Error:', no traceback; returns that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("Error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def assert_click_usage_error(result: Result) -> None:
    """Click's own usage errors: exit 2 and one 'Error:' line (Click adds its Usage lines), no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert sum(ln.startswith("Error:") for ln in result.stderr.splitlines()) == 1, result.stderr


def one_line(exc: pytest.ExceptionInfo[GradcamError], prefix: str = "") -> str:
    """The message of a raised GradcamError, checked to be one non-empty line (starting with `prefix`)."""
    message = str(exc.value)
    assert message.strip(), "error message is empty"
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    assert message.startswith(prefix), message
    return message


def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every socket connection fail at once, as on a machine without network, so that a test which
    reached for a model hub fails loudly instead of passing on a machine that happens to be online."""
    import socket

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def rows_of(out: Path) -> list[dict[str, str]]:
    """OUT/predictions.csv as dicts of strings, decoded as strict UTF-8 (the file must always be valid UTF-8)."""
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -------------------------------------------------------------------------------------------- CAM comparisons

SIZE = 224
FIXED_TARGETS = [189, 126, 287, 203]  # one class per image of the batch of 4; each map has 16-36 of 49 cells > 0
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def make_model() -> nn.Module:
    """resnet18 with fixed random weights (seed 0), in eval mode."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def photo(array: np.ndarray) -> Tensor:
    """HWC uint8 photo -> normalised (3, 224, 224) float tensor."""
    t = torch.from_numpy(array).permute(2, 0, 1).float().div(255.0)
    t = F.interpolate(t[None], size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)[0]
    return (t - MEAN) / STD


def make_images(n: int, seed: int) -> Tensor:
    """Batch of n: chelsea, coffee, then random normal images."""
    from skimage import data as skdata

    real = [photo(skdata.chelsea()), photo(skdata.coffee())]
    gen = torch.Generator().manual_seed(seed)
    rand = [torch.randn(3, SIZE, SIZE, generator=gen) for _ in range(max(0, n - len(real)))]
    return torch.stack((real + rand)[:n])


def fixed(classes: Tensor) -> Callable[[Tensor], Tensor]:
    """select_targets returning the given (B, T) class table whatever the logits."""

    def select(logits: Tensor) -> Tensor:
        return classes.to(logits.device)

    return select


def assert_nontrivial(cams: Tensor) -> None:
    """Guard against vacuous passes: every map has signal, and the batch's maps are not all alike."""
    flat = cams.reshape(-1, cams.shape[-2] * cams.shape[-1])
    assert bool((flat.amax(dim=1) > 0).all()), "a reference map is all zero: the comparison would be vacuous"
    assert not torch.allclose(flat[0], flat[1]), "maps of different images coincide"
