"""Max-Sensitivity (`audit.sensitivity`) against its definition, against Quantus, and end to end.

- the pass equals a float64 re-implementation of the formula (Grad-CAM written out by hand, bilinear upsampling,
  min-max, Frobenius norms) fed the same noise draws (the seed rule re-derived here), on a tiny CNN whose input
  has saturated pixels, with a non-trivial mean/std: so the std mapping and the no-clipping rule are checked too;
- Quantus 0.6 `MaxSensitivity` with matched settings (uniform noise of the same radius in [0, 1] pixel space,
  Frobenius norms of the difference over the map, nr_samples, normalise=False, abs=False, an explain_func that
  returns the same maps) estimates the same quantity: their draws cannot be matched, so the means of many
  independent estimates are compared;
- an image's value does not depend on its batch, its position or the batch size; an all-zero map is empty;
- `gradcam explain --metrics sensitivity` fills `max_sensitivity`, records how in run.json, and gates on it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from audit_models import make_world
from helpers import invoke, rows_of
from torch import Tensor, nn

from gradcam_cli.audit import measures as M
from gradcam_cli.audit.batch_maps import BatchContext, LayerMaps, PassSetup
from gradcam_cli.audit.sensitivity import SensitivityPass
from gradcam_cli.cam.engine import CamEngine, CamResult, run_batch
from gradcam_cli.config import Settings
from gradcam_cli.data.batches import Batch
from gradcam_cli.model.loading import InputSpec, LoadedModel

MEAN = (0.4, 0.5, 0.6)
STD = (0.2, 0.25, 0.3)
SIDE = 16
CLASSES = 5
# the pass against the float64 reference: the CSV keeps 6 decimals (5e-7) and the pass runs in float32
REFERENCE_ABS = 2e-6


class TinyNet(nn.Module):
    """conv-ReLU-conv(stride 2)-ReLU -> (8, 8, 8) features, global mean, linear head: Grad-CAM at `features` is
    ReLU(sum_k W[c, k] A_k) / 64, which moves with the input because the features are ReLUs of it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def tiny_net() -> nn.Module:
    return TinyNet().eval()


def photos(n: int, seed: int = 1) -> Tensor:
    """(n, 3, SIDE, SIDE) images in [0, 1], a tenth of the pixels saturated at 0 or 1 (clipping would show)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, SIDE, SIDE, generator=g)
    saturated = torch.rand(n, 3, SIDE, SIDE, generator=g) < 0.1
    return torch.where(saturated, (pixels > 0.5).float(), pixels)


def normalise(pixels: Tensor) -> Tensor:
    mean = torch.tensor(MEAN, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=pixels.dtype).view(1, 3, 1, 1)
    return (pixels - mean) / std


def rels_of(n: int) -> list[str]:
    return [f"class{i % 3}/img{i}.png" for i in range(n)]


# -------------------------------------------------------------------------------- the pass, driven directly


def measure(
    model: nn.Module,
    pixels: Tensor,
    rels: Sequence[str],
    samples: int,
    radius: float,
    seed: int = 0,
    zero_maps: Sequence[int] = (),
) -> tuple[list[float | None], int]:
    """Run `SensitivityPass` on one batch as the evaluator does: the values (None for an empty cell), and how
    many times it called `explain`. `zero_maps`: positions whose map is replaced by zeros before the pass."""
    settings = Settings(metrics=("sensitivity",), sensitivity_samples=samples, sensitivity_radius=radius, seed=seed)
    spec = InputSpec((SIDE, SIDE), SIDE, MEAN, STD)
    loaded = LoadedModel(model, "tiny", "none", spec, [str(c) for c in range(CLASSES)])
    layers = {"features": model.features}
    setup = PassSetup(settings, loaded, layers, torch.device("cpu"), None, None)
    x = normalise(pixels)
    n = x.shape[0]
    calls = [0]
    with CamEngine(model, layers, "gradcam") as engine:
        result = engine.run(x, lambda logits: logits.argmax(dim=1, keepdim=True))

        def explain(noisy: Tensor, targets: Tensor) -> CamResult:
            calls[0] += 1
            return run_batch(engine, noisy, lambda start, stop: lambda logits: targets[start:stop])

        cams = result.cams["features"][:, 0].clone()
        cams[list(zero_maps)] = 0.0
        slots = torch.zeros(n, dtype=torch.long)
        maps = LayerMaps("features", cams, torch.arange(n), slots, result.targets[:, 0], list(rels), (SIDE, SIDE))
        black = normalise(torch.zeros(1, 3, 1, 1))
        batch = Batch(indices=list(range(n)), rels=list(rels))
        ctx = BatchContext(settings, batch, x, result, black, 8, lambda t: model(t), explain)
        SensitivityPass(setup).measure(ctx, [maps])
    values = [float(v["max_sensitivity"]) if "max_sensitivity" in v else None for v in maps.values]
    return values, calls[0]


# ---------------------------------------------------------------------------------- the float64 reference


def seed_of(seed: int, rel: str) -> int:
    """The documented rule: the 8-byte blake2b digest of '<seed>:<path>', little-endian, top bit cleared."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{rel}".encode(), digest_size=8).digest(), "little") % 2**63


def gradcam64(model: TinyNet, pixels: Tensor, cls: int) -> Tensor:
    """(3, h, w) float64 pixels -> the (h, w) map users see: Grad-CAM at `features` written out, bilinear to
    the input size, min-max to [0, 1] (zeros when constant)."""
    a = model.features(normalise(pixels[None]))[0]  # (8, 8, 8)
    grads = model.head.weight[cls].view(-1, 1, 1).expand_as(a) / (a.shape[1] * a.shape[2])  # d logit / d A
    cam = F.relu((grads.mean(dim=(1, 2), keepdim=True) * a).sum(dim=0))
    up = F.interpolate(cam[None, None], size=(SIDE, SIDE), mode="bilinear", align_corners=False)[0, 0]
    span = up.max() - up.min()
    return (up - up.min()) / span if span > 0 else torch.zeros_like(up)


def reference(model: nn.Module, pixels: Tensor, rels: Sequence[str], samples: int, radius: float) -> list[float]:
    """max_s ||m(x + u_s) - m(x)||_F / ||m(x)||_F in float64, image by image, u_s from the image's generator."""
    m64 = copy.deepcopy(model).double()
    assert isinstance(m64, TinyNet)
    out = []
    with torch.no_grad():
        for image, rel in zip(pixels.double(), rels, strict=True):
            cls = int(m64(normalise(image[None])).argmax())
            base = gradcam64(m64, image, cls)
            g = torch.Generator().manual_seed(seed_of(0, rel))
            worst = 0.0
            for _ in range(samples):
                u = (torch.rand((3, SIDE, SIDE), generator=g) * 2.0 - 1.0) * radius
                noisy = gradcam64(m64, image + u.double(), cls)
                worst = max(worst, float(torch.linalg.norm(noisy - base) / torch.linalg.norm(base)))
            out.append(worst)
    return out


def test_the_pass_equals_the_float64_formula_with_the_same_noise() -> None:
    model, pixels, rels = tiny_net(), photos(6), rels_of(6)
    values, calls = measure(model, pixels, rels, samples=4, radius=0.05)
    expected = reference(model, pixels, rels, samples=4, radius=0.05)
    assert calls == 4  # N re-explanations of the batch, whatever its size
    assert all(e > 1e-3 for e in expected)  # the maps do move: the check is not 0 == 0
    for got, want in zip(values, expected, strict=True):
        assert got == pytest.approx(want, abs=REFERENCE_ABS)


def test_an_all_zero_map_has_an_empty_cell_and_the_others_keep_theirs() -> None:
    model, pixels, rels = tiny_net(), photos(3), rels_of(3)
    full, _ = measure(model, pixels, rels, samples=2, radius=0.05)
    values, _ = measure(model, pixels, rels, samples=2, radius=0.05, zero_maps=[1])
    assert values[1] is None
    assert values[0] == full[0] and values[2] == full[2]


def test_values_do_not_depend_on_batch_size_position_or_neighbours() -> None:
    model, pixels, rels = tiny_net(), photos(6), rels_of(6)
    whole, _ = measure(model, pixels, rels, samples=3, radius=0.05)
    first, _ = measure(model, pixels[:2], rels[:2], samples=3, radius=0.05)
    rest, _ = measure(model, pixels[2:], rels[2:], samples=3, radius=0.05)
    backwards, _ = measure(model, pixels.flip(0), rels[::-1], samples=3, radius=0.05)
    # float32 convolutions may differ in the last bit between batch sizes: below the CSV's 6 decimals
    assert first + rest == pytest.approx(whole, abs=1e-6)
    assert backwards[::-1] == pytest.approx(whole, abs=1e-6)
    # and --seed changes the draws
    other_seed, _ = measure(model, pixels, rels, samples=3, radius=0.05, seed=1)
    assert other_seed != whole


# ------------------------------------------------------------------------------------------------- Quantus

IMAGES, SAMPLES, REPEATS, RADIUS = 8, 5, 24, 0.05


def test_agrees_with_quantus_max_sensitivity_in_distribution() -> None:
    """Quantus draws its own noise (np.random), so the two estimates of max_s over SAMPLES draws are compared in
    distribution: per image, the means of REPEATS independent estimates (ours: --seed 0..REPEATS-1; Quantus:
    np.random.seed(0..)) agree within 4 standard errors of their difference, and the grand means within 5%."""
    quantus = pytest.importorskip("quantus")
    model, pixels, rels = tiny_net(), photos(IMAGES, seed=3), rels_of(IMAGES)
    layers = {"features": model.features}
    x = normalise(pixels)
    with CamEngine(model, layers, "gradcam") as engine:
        targets = engine.run(x, lambda logits: logits.argmax(dim=1, keepdim=True)).targets

        def explain_func(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **kwargs: object) -> np.ndarray:
            """Quantus' explain_func: [0, 1] pixels in, the pass's maps out (same engine, same input_maps)."""
            fixed = torch.as_tensor(targets).long().view(-1, 1)
            noisy = normalise(torch.as_tensor(inputs).float())
            cams = engine.run(noisy, lambda logits: fixed).cams["features"][:, 0]
            return M.input_maps(cams, (SIDE, SIDE)).numpy()

        y = targets[:, 0].numpy()
        a = explain_func(model, pixels.numpy(), y)[:, None]
        metric = quantus.MaxSensitivity(
            nr_samples=SAMPLES,
            lower_bound=RADIUS,
            normalise=False,
            abs=False,
            disable_warnings=True,
            display_progressbar=False,
        )
        theirs = []
        for repeat in range(REPEATS):
            np.random.seed(repeat)
            scores = metric(
                model=model,
                x_batch=pixels.numpy(),
                y_batch=y,
                a_batch=a.copy(),
                channel_first=True,
                explain_func=explain_func,
                device="cpu",
                batch_size=IMAGES,
            )
            theirs.append(scores)
    ours = np.array([measure(model, pixels, rels, SAMPLES, RADIUS, seed=r)[0] for r in range(REPEATS)], dtype=float)
    q = np.array(theirs, dtype=float)
    assert ours.shape == q.shape == (REPEATS, IMAGES)
    se = np.sqrt(ours.var(axis=0, ddof=1) / REPEATS + q.var(axis=0, ddof=1) / REPEATS)
    gap = np.abs(ours.mean(axis=0) - q.mean(axis=0))
    assert (gap <= 4 * se).all(), (ours.mean(axis=0), q.mean(axis=0), se)
    assert ours.mean() == pytest.approx(q.mean(), rel=0.05)
    # a radius in the normalised space (std ignored) would be 3-5 times smaller: far outside these bounds
    assert q.mean() > 1e-3


# -------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("sensitivity"))


def test_explain_fills_max_sensitivity_records_it_and_gates_on_it(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["explain", world["images"], "-o", out, "-c", world["cfg"], "--metrics", "sensitivity"]
    result = invoke(*args, "--sensitivity-samples", "3", "--summary")
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    values = [float(r["max_sensitivity"]) for r in rows]
    assert len(values) == 4 and all(0 < v < math.inf for v in values)
    assert all(r["deletion_auc"] == "" and r["sparseness"] == "" for r in rows)
    audit = json.loads((out / "run.json").read_text(encoding="utf-8"))["audit"]
    assert audit["sensitivity"]["samples"] == 3 and audit["sensitivity"]["radius"] == 0.05
    assert "blake2b" in audit["sensitivity"]["seed"] and "not clipped" in audit["sensitivity"]["noise"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    mean = summary["metrics"]["max_sensitivity"]["mean"]
    assert mean == pytest.approx(sum(values) / 4, abs=1e-6)

    below, above = mean / 2, mean * 2
    gated = invoke("audit", out, "-q", "--fail-over", f"sensitivity={below}")
    assert gated.exit_code == 3, gated.output
    assert "sensitivity = " in gated.stderr and f"above the maximum {below:g}" in gated.stderr
    assert invoke("audit", out, "-q", "--fail-over", f"sensitivity={above}").exit_code == 0
    # the same gate at explain time, and the same values with one image per batch
    again = tmp_path / "again"
    result = invoke(*args[:3], again, *args[4:], "--sensitivity-samples", "3", "--batch-size", "1",
                    "--fail-over", f"sensitivity={below}")  # fmt: skip
    assert result.exit_code == 3, result.output
    assert [r["max_sensitivity"] for r in rows_of(again)] == [r["max_sensitivity"] for r in rows]
