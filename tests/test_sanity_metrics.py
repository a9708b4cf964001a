"""The sanity-check metrics `randomization` (Adebayo et al.) and `random_logit` (Sixt et al.).

- the batched Spearman and SSIM equal scipy's spearmanr and scikit-image's structural_similarity;
- on `tests.sanity_models:tiny_net` (one Linear head) the randomization value equals Quantus MPRT's first
  top-down step, and random_logit equals Quantus RandomLogit given the same other class;
- the model's weights come back bit-identical, also when the explain fails mid-way, and the caller's RNG is
  untouched;
- end to end: the columns, the cascade's curve files and run.json record, and a gate on the column;
- on the ImageNet-trained EfficientNet-Lite0 Grad-CAM's map changes with a random head, guided backprop's
  hardly does (Adebayo et al.'s finding).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from audit_models import make_world
from helpers import invoke, rows_of
from sanity_models import CONFIG, tiny_net
from torch import Tensor, nn

from gradcam_cli.audit import measures as M
from gradcam_cli.audit.batch_maps import LayerMaps
from gradcam_cli.audit.map_similarity import average_ranks, spearman, ssim
from gradcam_cli.audit.random_logit import other_class, random_logit_values
from gradcam_cli.audit.randomization import randomization_curves
from gradcam_cli.audit.reinit import plan_randomization
from gradcam_cli.cam.engine import CamEngine, CamResult
from gradcam_cli.errors import GradcamError

stats = pytest.importorskip("scipy.stats")
skmetrics = pytest.importorskip("skimage.metrics")

SIZE = (32, 32)
SEED = 3


# ------------------------------------------------------------------------------------------- map similarity


def test_average_ranks_and_spearman_equal_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    smooth = rng.random((6, 9, 11))
    tied = rng.integers(0, 4, (6, 9, 11)) / 3.0  # four levels: many ties
    for a, b in ((smooth, tied), (tied, tied[::-1].copy()), (smooth, smooth**2 + 0.1 * tied)):
        ours = spearman(torch.from_numpy(a).float(), torch.from_numpy(b).float()).numpy()
        pairs = zip(a.astype(np.float32), b.astype(np.float32), strict=True)
        theirs = [stats.spearmanr(x.ravel(), y.ravel())[0] for x, y in pairs]
        np.testing.assert_allclose(ours, theirs, atol=1e-10)
    row = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0]])
    np.testing.assert_array_equal(average_ranks(row).numpy(), stats.rankdata(row.numpy()[0])[None])


def test_spearman_of_a_constant_map_is_nan() -> None:
    a = torch.rand(2, 8, 8)
    b = a.clone()
    b[1] = 0.5
    rho = spearman(a, b)
    assert rho[0].item() == pytest.approx(1.0) and torch.isnan(rho[1])


@pytest.mark.parametrize("shape", [(32, 32), (9, 13), (7, 7)])
def test_ssim_equals_scikit_image_with_data_range_1(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    a = rng.random((4, *shape)).astype(np.float32)
    b = np.clip(a + 0.3 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
    b[1] = np.round(b[1] * 3) / 3  # ties and plateaus
    b[2] = 0.0  # a constant map: SSIM is still defined
    ours = ssim(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    theirs = [skmetrics.structural_similarity(x, y, data_range=1.0) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


# ---------------------------------------------------------------------------------- tiny model, vs Quantus


def tiny_inputs() -> Tensor:
    return torch.rand(4, 3, *SIZE, generator=torch.Generator().manual_seed(5))


def explained(model: nn.Module, x: Tensor) -> tuple[CamEngine, CamResult, LayerMaps]:
    """The engine (not entered), its Grad-CAM of the predicted classes at `features`, and those maps as a set."""
    engine = CamEngine(model, {"features": model.features}, "gradcam")
    with engine:
        result = engine.run(x, lambda logits: logits.argmax(dim=1, keepdim=True))
    b = x.shape[0]
    image_of, slots = torch.arange(b), torch.zeros(b, dtype=torch.long)
    rels = [f"img{i}.png" for i in range(b)]
    maps = LayerMaps("features", result.cams["features"][:, 0], image_of, slots, result.targets[:, 0], rels, SIZE)
    return engine, result, maps


def engine_explain(engine: CamEngine):  # type: ignore[no-untyped-def]
    return lambda x, targets: engine.run(x, lambda logits: targets)


def quantus_explain(model: nn.Module, inputs: np.ndarray, targets: np.ndarray, **_: object) -> np.ndarray:
    """Quantus's explain_func: our Grad-CAM of `targets` at `features` of whichever model Quantus passes, as the
    [0, 1] input-size maps the metrics compare."""
    with CamEngine(model, {"features": model.features}, "gradcam") as engine:
        result = engine.run(torch.from_numpy(inputs), lambda logits: torch.as_tensor(targets).view(-1, 1))
    return M.input_maps(result.cams["features"][:, 0], SIZE).numpy()


def test_randomization_equals_quantus_mprt_first_top_down_step() -> None:
    """Same seed rule (manual_seed(seed + 1) before reset_parameters), same maps (abs and normalise off, the
    explain_func returns our maps): Quantus's first top-down step is `fc`, our head. Tolerance 1e-6."""
    quantus = pytest.importorskip("quantus")
    model = tiny_net()
    x = tiny_inputs()
    plan = plan_randomization(model, {"features": model.features}, SIZE, torch.device("cpu"), SEED, cascade=False)
    assert plan.weights.names == [["fc"]]
    engine, result, maps = explained(model, x)
    with engine:
        (curve,) = randomization_curves(engine_explain(engine), x, result.targets, [maps], plan.weights)
    metric = quantus.MPRT(layer_order="top_down", seed=SEED, abs=False, normalise=False, disable_warnings=True)
    scores = metric(
        model=model,
        x_batch=x.numpy(),
        y_batch=result.targets[:, 0].numpy(),
        a_batch=maps.saliency.numpy()[:, None],
        explain_func=quantus_explain,
        device="cpu",
    )
    assert list(scores)[:2] == ["original", "fc"]
    np.testing.assert_allclose(curve[:, 0].numpy(), scores["fc"], atol=1e-6)
    assert curve[:, 0].max() < 0.99  # the head mattered


def quantus_ssim_2d(a: np.ndarray, b: np.ndarray, batched: bool = True, **kwargs: object) -> list[float]:
    """Quantus's own `ssim`, on the maps as images: RandomLogit flattens them to (batch, n) first, which would make
    scikit-image filter 1-D rows; Quantus's data_range (max - min of the pair) is 1 for [0, 1] maps with range."""
    from quantus.functions.similarity_func import ssim as q_ssim

    return q_ssim(a.reshape(-1, *SIZE), b.reshape(-1, *SIZE), batched=True)  # type: ignore[no-any-return]


def test_random_logit_equals_quantus_random_logit_for_the_same_other_class() -> None:
    quantus = pytest.importorskip("quantus")
    model = tiny_net()
    x = tiny_inputs()
    engine, result, maps = explained(model, x)
    assert bool((maps.saliency.flatten(1).amax(1) == 1).all())  # Quantus's data_range is then 1
    y = result.targets[:, 0].numpy()
    np.random.seed(SEED)  # the other classes as Quantus draws them for a batch
    drawn = np.random.randint(0, 10 - 1, len(y))
    others = torch.from_numpy(np.where(drawn < y, drawn, drawn + 1))
    with engine:
        (ours,) = random_logit_values(engine_explain(engine), x, result.targets, [maps], [others])
    metric = quantus.RandomLogit(
        num_classes=10, seed=SEED, abs=False, normalise=False, similarity_func=quantus_ssim_2d, disable_warnings=True
    )
    scores = metric(
        model=model,
        x_batch=x.numpy(),
        y_batch=y,
        a_batch=maps.saliency.numpy()[:, None],
        explain_func=quantus_explain,
        device="cpu",
    )
    np.testing.assert_allclose(ours.numpy(), scores, atol=1e-6)


def test_the_other_class_is_another_uniform_class_of_the_image_and_slot() -> None:
    drawn = [other_class(f"a/{i}.png", 0, 3, 10, SEED) for i in range(2000)]
    assert 3 not in drawn and set(drawn) == set(range(10)) - {3}
    counts = np.bincount(drawn, minlength=10)
    assert counts[[c for c in range(10) if c != 3]].min() > 2000 / 9 * 0.7
    assert other_class("a/1.png", 1, 3, 10, SEED) == other_class("a/1.png", 1, 3, 10, SEED)
    assert len({other_class("a/1.png", t, 3, 10, SEED) for t in range(20)}) > 1
    assert len({other_class("a/1.png", 0, 3, 10, s) for s in range(20)}) > 1


# ----------------------------------------------------------------------------------------- restore, RNG


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().clone().contiguous().numpy().tobytes() for k, v in model.state_dict().items()}


def test_weights_are_restored_after_an_error_and_the_rng_is_untouched() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    before = state_bytes(model)
    rng_before = torch.get_rng_state()
    layer = {"2": model[2]}
    plan = plan_randomization(model, layer, SIZE, torch.device("cpu"), SEED, cascade=True)
    assert torch.equal(torch.get_rng_state(), rng_before)
    # the head: what starts after the ReLU "2"; then top-down the blocks with weights not random yet
    assert plan.step_names == ["head", "1", "0"]
    assert plan.weights.names == [["3", "4", "8"], ["1"], ["0"]]
    g = torch.Generator().manual_seed(0)  # the test's own randomness, off the global RNG
    x = torch.rand(2, 3, *SIZE, generator=g)
    seen: list[dict[str, bytes]] = []

    def failing(x: Tensor, targets: Tensor) -> CamResult:
        seen.append(state_bytes(model))
        if len(seen) == 3:
            raise RuntimeError("injected")
        return CamResult(x, x, targets, {"2": torch.rand(2, 1, 28, 28, generator=g)})

    maps = LayerMaps("2", torch.rand(2, 28, 28, generator=g), torch.arange(2), torch.zeros(2, dtype=torch.long),
                     torch.zeros(2, dtype=torch.long), ["a", "b"], SIZE)  # fmt: skip
    with pytest.raises(RuntimeError, match="injected"):
        randomization_curves(failing, x, torch.zeros(2, 1, dtype=torch.long), [maps], plan.weights)
    assert seen[0]["8.weight"] != before["8.weight"] and seen[0]["0.weight"] == before["0.weight"]
    assert seen[2]["1.running_mean"] != before["1.running_mean"]
    assert state_bytes(model) == before
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_the_engine_keeps_parameters_without_grad_while_swapping() -> None:
    model = tiny_net()
    x = tiny_inputs()
    plan = plan_randomization(model, {"features": model.features}, SIZE, torch.device("cpu"), SEED, cascade=True)
    assert plan.step_names == ["head", "features.2", "features.0"]
    engine, result, maps = explained(model, x)
    before = state_bytes(model)
    with engine:
        (curve,) = randomization_curves(engine_explain(engine), x, result.targets, [maps], plan.weights)
        assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert state_bytes(model) == before
    assert curve.shape == (4, 3)


def test_random_weights_follow_the_seed_rule() -> None:
    """Each module: torch.manual_seed(seed + 1), then reset_parameters(), as Quantus."""
    model = tiny_net()
    plan = plan_randomization(model, {"features": model.features}, SIZE, torch.device("cpu"), SEED, cascade=False)
    torch.manual_seed(SEED + 1)
    expected = nn.Linear(8, 10)
    (state,) = plan.weights.states[0]
    assert torch.equal(state.params["weight"], expected.weight.detach())
    assert torch.equal(state.params["bias"], expected.bias.detach())


def test_an_input_layer_counts_its_own_module_as_after() -> None:
    model = tiny_net()
    plan = plan_randomization(model, {"fc:input": model.fc}, SIZE, torch.device("cpu"), SEED, cascade=False)
    assert plan.weights.names == [["fc"]]
    plan = plan_randomization(model, {"features.2:input": model.features[2]}, SIZE, torch.device("cpu"), 0, False)
    assert plan.weights.names == [["features.2", "fc"]]


def test_a_layer_with_nothing_to_re_initialise_after_it_is_refused() -> None:
    model = tiny_net()
    with pytest.raises(GradcamError, match="nothing to re-initialise"):
        plan_randomization(model, {"fc": model.fc}, SIZE, torch.device("cpu"), SEED, cascade=False)


# ----------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = make_world(tmp_path_factory.mktemp("sanity"))
    (paths["root"] / "tiny.yaml").write_text(CONFIG + f"workers: 0\nquiet: true\nseed: {SEED}\n", encoding="utf-8")
    return paths


def test_explain_fills_both_columns_and_cascade_writes_curves(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(
        "explain", world["images"], "-o", out, "-c", world["root"] / "tiny.yaml",
        "--metrics", "randomization,random_logit", "--randomization", "cascade",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert len(rows) == 4
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    record = run["audit"]["randomization"]
    assert record["mode"] == "cascade" and record["seed"] == SEED and record["head"] == ["fc"]
    assert record["blocks"] == ["head", "features.2", "features.0"]
    assert record["steps"] == [["fc"], ["features.2"], ["features.0"]]
    assert "metric:randomization" in run["stage_seconds"]
    for row in rows:
        assert -1 <= float(row["randomization"]) <= 1 and -1 <= float(row["random_logit"]) <= 1
        curve = np.load(out / "randomization" / f"{row['path']}.npy")
        assert curve.dtype == np.float32 and curve.shape == (3,)
        assert curve[0] == pytest.approx(float(row["randomization"]), abs=1e-6)
    # head mode: the same column, no curves
    head = tmp_path / "head"
    result = invoke(
        "explain", world["images"], "-o", head, "-c", world["root"] / "tiny.yaml",
        "--metrics", "randomization",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert [r["randomization"] for r in rows_of(head)] == [r["randomization"] for r in rows]
    assert not (head / "randomization").exists()


def test_values_do_not_depend_on_the_batch(world: dict[str, Path], image_dir: Path, tmp_path: Path) -> None:
    """On photo-like images (noise and a blob; the squares' flat maps have plateaus whose ties float rounding
    breaks one way or the other) the values are the same whatever images share a batch."""
    runs = []
    for batch in ("1", "4"):
        out = tmp_path / batch
        result = invoke(
            "explain", image_dir, "-o", out, "-c", world["root"] / "tiny.yaml",
            "--metrics", "randomization,random_logit", "--batch-size", batch,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        runs.append([(float(r["randomization"]), float(r["random_logit"])) for r in rows_of(out)])
    # the same other classes; the maps differ only by float rounding of batched convolutions
    assert len(runs[0]) == 7
    np.testing.assert_allclose(runs[0], runs[1], atol=1e-4)


def test_a_gate_on_randomization_exits_3(world: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "gated"
    result = invoke(
        "explain", world["images"], "-o", out, "-c", world["root"] / "tiny.yaml",
        "--metrics", "randomization", "--fail-over", "randomization=-1",
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "randomization = " in result.stderr and "above the maximum -1" in result.stderr


def test_guided_backprop_randomises_the_configured_layers_head(world: dict[str, Path], tmp_path: Path) -> None:
    records = []
    for method in ("gradcam", "guided-backprop"):
        out = tmp_path / method
        result = invoke(
            "explain", world["images"], "-o", out, "-c", world["root"] / "tiny.yaml", "--method", method,
            "--layer", "features.2", "--metrics", "randomization",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        records.append(json.loads((out / "run.json").read_text(encoding="utf-8"))["audit"]["randomization"])
        assert all(r["randomization"] != "" for r in rows_of(out))
    assert records[0]["head"] == records[1]["head"] == ["fc"]
    assert records[1]["target_layers"] == ["features.2"]


# ------------------------------------------------------------------------------------ the real demo model

DEMO = Path(__file__).resolve().parents[1] / "configs" / "efficientnet_lite0.yaml"
SAMPLES = Path(__file__).resolve().parents[1] / "sample_images"


def test_on_the_real_model_gradcam_changes_with_a_random_head_and_guided_backprop_does_not(tmp_path: Path) -> None:
    """Adebayo et al.: with the head re-initialised, Grad-CAM's map changes (low rank correlation) while guided
    backprop's stays nearly the same picture (high); margin 0.3 between the means."""
    pytest.importorskip("efficientnet_lite_pytorch", reason="the demo extra is part of `make test`'s install")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("chelsea.png", "coffee.png", "astronaut.png"):
        (images / name).write_bytes((SAMPLES / name).read_bytes())
    means = {}
    for method in ("gradcam", "guided-backprop"):
        out = tmp_path / method
        result = invoke(
            "explain", images, "-o", out, "-c", DEMO, "--method", method, "--device", "cpu", "--workers", "0",
            "-q", "--metrics", "randomization",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
            values = [float(r["randomization"]) for r in csv.DictReader(fh)]
        means[method] = float(np.mean(values))
    assert means["gradcam"] + 0.3 < means["guided-backprop"], means
    assert means["guided-backprop"] > 0.5, means
