"""Sparseness (Gini) and complexity (entropy) of `audit.concentration` against Quantus 0.6, and end to end.

Quantus' `Sparseness` and `Complexity` with abs=False and normalise=False read the maps as given, as ours do
(our maps are already non-negative and min-max normalised by `input_maps`). They run in numpy float64 here, so
the two must agree to float64 rounding (1e-12), on random maps, on the edge cases (a flat map, one hot pixel,
an all-zero map: Gini 0 for both, entropy NaN for both, an empty cell in the CSV), and on the maps an
`explain --metrics sparseness,complexity` run measured (recomputed from its saved CAMs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from audit_models import make_world
from helpers import invoke, rows_of

from gradcam_cli.audit import measures as M
from gradcam_cli.audit.concentration import entropy, gini

quantus = pytest.importorskip("quantus")

FLOAT64 = 1e-12
CLOSED_FORM = 1e-9  # the entropy's log(p + 1e-12) moves log n and 0 by n * 1e-12 at most
INPUT = 32  # the colour world's model input size


def quantus_scores(metric: str, maps: np.ndarray) -> np.ndarray:
    """Quantus `Sparseness` or `Complexity` of (m, h, w) maps, abs and normalise off, as a float64 array."""
    cls = quantus.Sparseness if metric == "sparseness" else quantus.Complexity
    m = maps.shape[0]
    a = maps.astype(np.float64)[:, None].copy()
    x = np.zeros((m, 3, *maps.shape[1:]), dtype=np.float64)
    scores = cls(abs=False, normalise=False, disable_warnings=True, display_progressbar=False)(
        model=None, x_batch=x, y_batch=np.zeros(m, dtype=int), a_batch=a, channel_first=True
    )
    return np.asarray(scores, dtype=np.float64)


def ours(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = torch.from_numpy(maps)
    return gini(t).numpy(), entropy(t).numpy()


@pytest.mark.parametrize("shape", [(5, 12, 10), (3, 48, 64)])
def test_random_maps_equal_quantus(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    maps = rng.random(shape)
    maps[1] **= 8  # a peaked map next to the uniform-noise ones
    g, h = ours(maps)
    np.testing.assert_allclose(g, quantus_scores("sparseness", maps), rtol=0, atol=FLOAT64)
    np.testing.assert_allclose(h, quantus_scores("complexity", maps), rtol=0, atol=FLOAT64)


def test_float32_input_maps_are_measured_in_float64() -> None:
    """The pass reads float32 saliency maps: the result is their float64 value, not a float32 sum's."""
    maps = np.random.default_rng(7).random((2, 224, 224)).astype(np.float32)
    g, h = ours(maps)
    np.testing.assert_allclose(g, quantus_scores("sparseness", maps), rtol=0, atol=FLOAT64)
    np.testing.assert_allclose(h, quantus_scores("complexity", maps), rtol=0, atol=FLOAT64)


@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # Quantus' 0 / 0
def test_edge_cases_equal_quantus_and_have_their_closed_form() -> None:
    side = 8
    n = side * side
    flat = np.full((side, side), 0.5)
    hot = np.zeros((side, side))
    hot[3, 5] = 1.0
    zero = np.zeros((side, side))
    maps = np.stack([flat, hot, zero])  # Quantus refuses a batch that is all zeros or all ones: mixed here
    g, h = ours(maps)
    qg, qh = quantus_scores("sparseness", maps), quantus_scores("complexity", maps)
    np.testing.assert_allclose(g, qg, rtol=0, atol=FLOAT64)
    np.testing.assert_allclose(h[:2], qh[:2], rtol=0, atol=FLOAT64)
    assert math.isnan(h[2]) and math.isnan(qh[2])  # no distribution: both NaN, our CSV cell is empty
    # flat: Gini 0, entropy log n; one hot pixel: Gini (n - 1) / n up to the 1e-7 both add, entropy 0
    assert g[0] == pytest.approx(0.0, abs=FLOAT64) and h[0] == pytest.approx(math.log(n), abs=CLOSED_FORM)
    assert g[1] == pytest.approx((n - 1) / n, abs=1e-5) and h[1] == pytest.approx(0.0, abs=CLOSED_FORM)
    assert g[2] == pytest.approx(0.0, abs=FLOAT64)  # all zero is flat for Gini (the 1e-7)


# -------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def concentrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    world = make_world(tmp_path_factory.mktemp("concentration"))
    out = world["root"] / "out"
    result = invoke(
        "explain", world["images"], "-o", out, "-c", world["cfg"], "--metrics", "sparseness,complexity",
        "--save", "heatmap,npy", "--summary",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out


def test_explain_columns_equal_quantus_on_the_saved_maps(concentrated: Path) -> None:
    rows = rows_of(concentrated)
    assert len(rows) == 4
    for row in rows:
        cam = torch.from_numpy(np.load(concentrated / "npy" / f"{row['path']}.npy"))
        saliency = M.input_maps(cam[None], (INPUT, INPUT)).numpy()
        assert float(row["sparseness"]) == pytest.approx(quantus_scores("sparseness", saliency)[0], abs=5e-7)
        assert float(row["complexity"]) == pytest.approx(quantus_scores("complexity", saliency)[0], abs=5e-7)
        assert row["max_sensitivity"] == "" and row["deletion_auc"] == ""
    audit = json.loads((concentrated / "run.json").read_text(encoding="utf-8"))["audit"]
    assert audit["metrics"] == ["sparseness", "complexity"]


def test_gates_on_sparseness_and_complexity_exit_3(concentrated: Path) -> None:
    summary = json.loads((concentrated / "summary.json").read_text(encoding="utf-8"))
    sparseness = summary["metrics"]["sparseness"]["mean"]
    complexity = summary["metrics"]["complexity"]["mean"]
    passing = ["--fail-under", f"sparseness={sparseness / 2}", "--fail-over", f"complexity={complexity * 2}"]
    assert invoke("audit", concentrated, "-q", *passing).exit_code == 0
    under = invoke("audit", concentrated, "-q", "--fail-under", f"sparseness={min(1.0, sparseness * 1.05)}")
    assert under.exit_code == 3, under.output
    assert "sparseness = " in under.stderr and "below the minimum" in under.stderr
    over = invoke("audit", concentrated, "-q", "--fail-over", f"complexity={complexity / 2}")
    assert over.exit_code == 3, over.output
    assert "complexity = " in over.stderr and "above the maximum" in over.stderr
