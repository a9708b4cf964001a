"""ROAD (`audit.road`): the imputer and the scores against pytorch-grad-cam's, the noise and its seeding, and
`explain --metrics road` with its gates end to end.

pytorch-grad-cam solves each imputation system exactly (scipy's sparse LU in float64); ours stops at a relative
residual ||r|| / ||b|| of RTOL = 1e-5 in float32. The error of the solution is at most cond(A) times that
relative to its scale (1 here); on these small images (<= 96 px) it measures at most 6e-5, so the tests allow
IMPUTED_TOL = 1e-4 on imputed values. Probabilities move far less than the inputs on the tiny model (measured
5e-7 at most, the CSV's own rounding): PROB_TOL = 2e-6 on the scores as written (6 digits).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from audit_models import make_world
from helpers import invoke, rows_of
from pytorch_grad_cam.metrics import road as pgc
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
from torch import Tensor, nn

from gradcam_cli.audit import road as R
from gradcam_cli.audit.batch_maps import BatchContext, LayerMaps

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__:DeprecationWarning")  # pytorch-grad-cam

COLUMNS = ("road_morf", "road_lerf", "road_combined")
IMPUTED_TOL = 1e-4
PROB_TOL = 2e-6


def smooth_maps(n: int, h: int, w: int, seed: int) -> Tensor:
    """(n, h, w) smooth random maps in [0, 1] (min 0, max 1), as upsampled CAMs look, without ties."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 5, 5, generator=g)
    up = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).squeeze(1)
    up = up + 1e-3 * torch.rand(n, h, w, generator=g)  # break the ties of the interpolation
    lo, hi = up.flatten(1).amin(1).view(-1, 1, 1), up.flatten(1).amax(1).view(-1, 1, 1)
    return (up - lo) / (hi - lo)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )  # fmt: skip
    with torch.no_grad():
        model[-1].weight.mul_(20.0)  # probabilities far from uniform, so that imputation moves them
    return model.eval()


def run_pass(model: nn.Module, x: Tensor, sal: Tensor, classes: Tensor, rels: list[str], chunk: int) -> list[Any]:
    """RoadPass on one map per image with exactly `sal` as the maps: {column: value string} per map."""
    n = x.shape[0]
    with torch.no_grad():
        probs = model(x).softmax(1)

    def forward(t: Tensor) -> Tensor:
        with torch.no_grad():
            return model(t)

    maps = LayerMaps("layer", sal, torch.arange(n), torch.zeros(n, dtype=torch.long), classes, rels, sal.shape[1:])
    maps.__dict__["saliency"] = sal  # these maps as they are (no resize, no renormalisation)
    ctx = BatchContext(None, None, x, SimpleNamespace(probs=probs), None, chunk, forward, None)  # type: ignore[arg-type]
    R.RoadPass(SimpleNamespace(settings=SimpleNamespace(seed=0, metrics=("road",)))).measure(ctx, [maps])  # type: ignore[arg-type]
    return maps.values


@pytest.fixture
def no_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise 0 on both sides: ours, and every NoisyLinearImputer pytorch-grad-cam makes."""
    monkeypatch.setattr(R, "NOISE_STD", 0.0)
    monkeypatch.setattr(pgc.NoisyLinearImputer.__init__, "__defaults__", (0.0, pgc.neighbors_weights))


# -------------------------------------------------------------------------------------------------- removal


@pytest.mark.parametrize("size", [(32, 32), (37, 48)])
def test_percentiles_and_removal_are_numpys_and_pytorch_grad_cams(size: tuple[int, int]) -> None:
    sal = smooth_maps(3, *size, seed=1)
    thr = R.thresholds(sal)
    for i in range(3):
        for o, values in enumerate((sal[i], 1 - sal[i])):
            expected = np.percentile(values.numpy(), R.PERCENTILES)
            assert np.array_equal(thr[i, o].numpy(), expected.astype(np.float32))
            for k, t in enumerate(expected):
                keep = values < t  # RemoveMostRelevantFirst's binary mask: 1 kept, 0 imputed
                got = R.removed_pixels(sal[i : i + 1], torch.tensor([o]), thr[i : i + 1, o, k])[0]
                assert torch.equal(got, ~keep)


# ------------------------------------------------------------------------------------------------ imputation


def masks_for(h: int, w: int) -> list[Tensor]:
    """(h, w) bool removed masks: random pixels, the most / least salient 90% of a smooth map, a central block."""
    g = torch.Generator().manual_seed(3)
    sal = smooth_maps(1, h, w, seed=4)[0]
    block = torch.zeros(h, w, dtype=torch.bool)
    block[h // 4 : 3 * h // 4, w // 5 : 4 * w // 5] = True
    return [torch.rand(h, w, generator=g) < 0.5, sal >= sal.quantile(0.1), sal <= sal.quantile(0.9), block]


@pytest.mark.parametrize("size", [(32, 32), (40, 48), (96, 96)])
def test_imputer_equals_pytorch_grad_cams_noisy_linear_imputer(size: tuple[int, int]) -> None:
    masks = masks_for(*size)
    x = torch.randn(len(masks), 3, *size, generator=torch.Generator().manual_seed(5))
    ours = R.impute(x, torch.stack(masks))
    imputer = pgc.NoisyLinearImputer(noise=0.0)
    for i, removed in enumerate(masks):
        theirs = imputer(x[i], (~removed).float())
        assert torch.equal(ours[i][:, ~removed], x[i][:, ~removed])
        assert (ours[i] - theirs).abs().max().item() < IMPUTED_TOL


def test_a_fully_removed_image_is_the_mean_colour_and_a_kept_one_is_unchanged() -> None:
    x = torch.randn(2, 3, 16, 20)
    removed = torch.stack([torch.ones(16, 20, dtype=torch.bool), torch.zeros(16, 20, dtype=torch.bool)])
    out = R.impute(x, removed)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1], x[1])


def test_the_noise_is_n_0_sigma_on_removed_pixels_only() -> None:
    x = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(6))
    removed = torch.stack([masks_for(48, 48)[i] for i in range(4)])
    seeds = [R.noise_seed(0, f"img{i}.png", "layer", "morf", 50) for i in range(4)]
    noise = R.job_noise(seeds, (3, 48, 48), R.NOISE_STD, x.device)
    residual = R.impute(x, removed, noise) - R.impute(x, removed)
    on = removed.unsqueeze(1).expand_as(x)
    assert torch.equal(residual[~on], torch.zeros_like(residual[~on]))
    r = residual[on].double()
    assert abs(r.mean().item()) < 4 * R.NOISE_STD / r.numel() ** 0.5
    assert r.std().item() == pytest.approx(R.NOISE_STD, rel=0.03)


# ------------------------------------------------------------------------------------------------ the scores


def world_of_maps(n: int = 3, size: int = 32) -> tuple[nn.Module, Tensor, Tensor, Tensor, list[str]]:
    model = tiny_model()
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))
    sal = smooth_maps(n, size, size, seed=8)
    with torch.no_grad():
        classes = model(x).argmax(1)
    return model, x, sal, classes, [f"img{i}.png" for i in range(n)]


@pytest.mark.usefixtures("no_noise")
def test_scores_equal_pytorch_grad_cams_road_without_noise() -> None:
    model, x, sal, classes, rels = world_of_maps()
    values = run_pass(model, x, sal, classes, rels, chunk=7)
    cams, targets = sal.numpy(), [ClassifierOutputSoftmaxTarget(int(c)) for c in classes]
    expected = {
        "road_morf": pgc.ROADMostRelevantFirstAverage()(x, cams, targets, model),
        "road_lerf": pgc.ROADLeastRelevantFirstAverage()(x, cams, targets, model),
        "road_combined": pgc.ROADCombined()(x, cams, targets, model),
    }
    for column in COLUMNS:
        got = [float(v[column]) for v in values]
        assert np.abs(np.array(got) - expected[column]).max() < PROB_TOL, column
    assert float(values[0]["road_morf"]) != pytest.approx(0.0, abs=1e-3)  # the test measures something


@pytest.mark.usefixtures("no_noise")
def test_a_flat_map_removes_every_pixel_and_scores_the_mean_colour() -> None:
    """A constant map: both orders remove everything at every percentile (nothing is below the threshold), so
    every imputed image is the normalisation mean colour (0) and both scores are P(0) - P(x)."""
    model, x, _, classes, rels = world_of_maps()
    values = run_pass(model, x, torch.zeros(3, 32, 32), classes, rels, chunk=10)
    with torch.no_grad():
        expected = model(torch.zeros_like(x)).softmax(1) - model(x).softmax(1)
    for i, v in enumerate(values):
        change = expected[i, classes[i]].item()
        assert float(v["road_morf"]) == pytest.approx(change, abs=1e-6)
        assert float(v["road_lerf"]) == pytest.approx(change, abs=1e-6)
        assert float(v["road_combined"]) == pytest.approx(0.0, abs=1e-6)


def test_noise_moves_the_scores_little() -> None:
    """sigma = 0.01 of noise on the imputed pixels is a small input change: the scores move by well under a
    tenth of it (measured 8e-5 here), and they do move."""
    model, x, sal, classes, rels = world_of_maps()
    noisy = run_pass(model, x, sal, classes, rels, chunk=64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(R, "NOISE_STD", 0.0)
        clean = run_pass(model, x, sal, classes, rels, chunk=64)
    for a, b in zip(noisy, clean, strict=True):
        for column in COLUMNS:
            assert abs(float(a[column]) - float(b[column])) < 1e-3
    assert noisy != clean


def test_values_do_not_depend_on_chunk_size_or_image_order() -> None:
    model, x, sal, classes, rels = world_of_maps(n=4)
    reference = run_pass(model, x, sal, classes, rels, chunk=72)
    for chunk in (1, 5, 18):
        assert run_pass(model, x, sal, classes, rels, chunk=chunk) == reference
    order = [2, 0, 3, 1]
    shuffled = run_pass(model, x[order], sal[order], classes[order], [rels[i] for i in order], chunk=13)
    assert shuffled == [reference[i] for i in order]
    alone = run_pass(model, x[1:2], sal[1:2], classes[1:2], rels[1:2], chunk=4)
    assert alone == reference[1:2]


def test_the_noise_seed_is_stable_and_keyed_by_path_and_map() -> None:
    a = R.noise_seed(0, "cat/a.png", "layer4", "morf", 10)
    assert a == R.noise_seed(0, "cat/a.png", "layer4", "morf", 10)
    others = [
        R.noise_seed(1, "cat/a.png", "layer4", "morf", 10),
        R.noise_seed(0, "cat/b.png", "layer4", "morf", 10),
        R.noise_seed(0, "cat/a.png", "layer3", "morf", 10),
        R.noise_seed(0, "cat/a.png", "layer4", "lerf", 10),
        R.noise_seed(0, "cat/a.png", "layer4", "morf", 20),
    ]
    assert len({a, *others}) == 6 and all(0 <= s < 2**63 for s in others)


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def road_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    world = make_world(tmp_path_factory.mktemp("road"))
    out = world["root"] / "out"
    result = invoke("explain", world["images"], "-o", out, "-c", world["cfg"], "--metrics", "road", "--summary")
    assert result.exit_code == 0, result.output
    return world, out


def test_explain_fills_the_road_columns_and_records_how(road_run: tuple[dict[str, Path], Path]) -> None:
    _, out = road_run
    rows = rows_of(out)
    assert len(rows) == 4
    for row in rows:
        morf, lerf, combined = (float(row[c]) for c in COLUMNS)
        assert -1 <= morf <= 1 and -1 <= lerf <= 1
        assert combined == pytest.approx((lerf - morf) / 2, abs=1.5e-6)
        assert row["deletion_auc"] == ""
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    road = run["audit"]["road"]
    assert road["percentiles"] == list(R.PERCENTILES) and road["noise_std"] == R.NOISE_STD
    assert road["solver"]["rtol"] == R.RTOL and road["solver"]["max_iter"] == R.MAX_ITER
    assert "metric:road" in run["stage_seconds"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["metrics"]) == set(COLUMNS)


@pytest.mark.parametrize(
    ("gates", "code"),
    [
        (["--fail-over", "road_morf=1", "--fail-under", "road=-1", "--fail-under", "road_lerf=-1"], 0),
        (["--fail-over", "road_morf=-1"], 3),
        (["--fail-under", "road=1"], 3),
        (["--fail-under", "road_lerf=1"], 3),
    ],
)
def test_road_gates(road_run: tuple[dict[str, Path], Path], gates: list[str], code: int) -> None:
    _, out = road_run
    result = invoke("audit", out, "-q", *gates)
    assert result.exit_code == code, result.output


def test_explain_exits_3_on_a_failed_road_gate(road_run: tuple[dict[str, Path], Path], tmp_path: Path) -> None:
    world, _ = road_run
    args = ["explain", world["images"], "-o", tmp_path / "o", "-c", world["cfg"], "--metrics", "road", "--limit", "2"]
    result = invoke(*args, "--fail-under", "road=1")
    assert result.exit_code == 3, result.output
    assert "road" in result.stderr
