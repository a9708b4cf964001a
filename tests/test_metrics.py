"""Explanation-quality metrics against hand-computed values.

- pointing / energy on synthetic maps: a map that is one box of ones, scored against that box, is a hit with
  energy 1; the 15-pixel tolerance of Zhang et al. is checked at its edge (15 in, 16 out, diagonals).
- deletion / insertion on a constructed model whose probability is the mean intensity of the image, so the
  curve after removing the n_k brightest pixels is known in closed form (worked out in the test).
- Average Drop % and Increase in Confidence on the same model with box maps.
- the batched, chunked implementation equals a naive one-forward-per-step loop on a real CNN with the blur
  baseline, for any chunk size.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur as tv_gaussian_blur

from gradcam_cli.audit import measures as M
from gradcam_cli.render.heatmap import heatmap as render_heatmap
from gradcam_cli.render.heatmap import upsample_normalize

# --------------------------------------------------------------------------------------------- pointing, energy


def box_map(size: tuple[int, int], box: tuple[int, int, int, int]) -> Tensor:
    """An (H, W) map of zeros with ones on the half-open box x0..x1, y0..y1."""
    heat = torch.zeros(size)
    x0, y0, x1, y1 = box
    heat[y0:y1, x0:x1] = 1.0
    return heat


def boxes(*items: tuple[float, float, float, float]) -> Tensor:
    return torch.tensor(items, dtype=torch.float32).view(-1, 4)


def test_a_map_that_is_the_box_is_a_hit_with_all_its_energy_inside() -> None:
    size = (48, 64)
    heat = box_map(size, (10, 8, 30, 20))
    b = boxes((10, 8, 30, 20))
    assert M.pointing_hit(heat, b, None) == 1
    region = M.box_region(b, size)
    assert int(region.sum()) == 20 * 12  # integer boxes cover x0..x1-1, y0..y1-1
    assert M.energy_in_region(heat, region) == 1.0


def test_energy_is_the_share_of_mass_inside() -> None:
    size = (40, 40)
    heat = box_map(size, (0, 0, 20, 40))  # left half, 800 px of ones
    # a box over the left quarter holds half the mass
    assert M.energy_in_region(heat, M.box_region(boxes((0, 0, 10, 40)), size)) == pytest.approx(0.5)
    # two boxes: union, not sum (the overlap counts once)
    two = boxes((0, 0, 10, 40), (5, 0, 15, 40))
    assert M.energy_in_region(heat, M.box_region(two, size)) == pytest.approx(0.75)
    # graded values: mass, not area
    graded = torch.zeros(size)
    graded[0, 0], graded[39, 39] = 3.0, 1.0
    assert M.energy_in_region(graded, M.box_region(boxes((0, 0, 1, 1)), size)) == pytest.approx(0.75)


def test_fractional_boxes_are_rasterised_by_pixel_centres() -> None:
    region = M.box_region(boxes((0.4, 0.6, 2.5, 1.6)), (4, 4))
    # x centres 0.5, 1.5 are in [0.4, 2.5); 2.5 is not; y centre 0.5 < 0.6 is out, 1.5 is in
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 0:2] = True
    assert torch.equal(region, expected)


@pytest.mark.parametrize(
    ("peak_xy", "box", "hit"),
    [
        # box (10, 10, 30, 20) covers pixels x 10..29, y 10..19; distances from the peak pixel's centre
        ((44, 10), (10, 10, 30, 20), 1),  # 44.5 - 30 = 14.5
        ((45, 10), (10, 10, 30, 20), 0),  # 15.5
        ((45, 10), (10, 10, 30.5, 20), 1),  # 15.0: the tolerance is inclusive
        ((20, 34), (10, 10, 30, 20), 1),  # 14.5 below
        ((20, 35), (10, 10, 30, 20), 0),  # 15.5 below
        ((0, 15), (10, 10, 30, 20), 1),  # 9.5 left
        ((39, 29), (10, 10, 30, 20), 1),  # diagonal sqrt(9.5^2 + 9.5^2) = 13.4
        ((40, 30), (10, 10, 30, 20), 1),  # sqrt(10.5^2 + 10.5^2) = 14.85
        ((41, 31), (10, 10, 30, 20), 0),  # sqrt(11.5^2 + 11.5^2) = 16.26
    ],
)
def test_pointing_tolerance_is_15_pixels(peak_xy: tuple[int, int], box: tuple[float, ...], hit: int) -> None:
    heat = torch.zeros(80, 80)
    heat[peak_xy[1], peak_xy[0]] = 1.0
    assert M.pointing_hit(heat, boxes(box), None) == hit  # type: ignore[arg-type]
    # the same region as a mask gives the same answer (mask pixels count as their unit squares)
    if float(box[2]).is_integer():
        mask = M.box_region(boxes(box), (80, 80))  # type: ignore[arg-type]
        assert M.pointing_hit(heat, boxes(), mask) == hit


def test_pointing_with_a_mask() -> None:
    size = (60, 60)
    mask = torch.zeros(size, dtype=torch.bool)
    mask[10:20, 10:20] = True  # pixels 10..19
    cases = {(15, 15): 1, (25, 15): 1, (34, 15): 1, (35, 15): 0, (29, 29): 1, (30, 30): 1, (31, 31): 0}
    for (x, y), hit in cases.items():
        heat = torch.zeros(size)
        heat[y, x] = 1.0
        assert M.pointing_hit(heat, boxes(), mask) == hit, (x, y)
    assert M.distance_to_mask((25, 15), mask, 15) == 5.5  # to the edge of pixel 19, at 20
    assert M.distance_to_mask((59, 59), mask, 15) == math.inf
    # boxes and a mask together: a hit on either counts
    heat = torch.zeros(size)
    heat[50, 50] = 1.0
    assert M.pointing_hit(heat, boxes((45, 45, 55, 55)), mask) == 1


def test_all_zero_map_misses_and_has_no_energy_and_no_annotation_is_not_scored() -> None:
    heat = torch.zeros(20, 20)
    b = boxes((0, 0, 20, 20))
    assert M.pointing_hit(heat, b, None) == 0  # no maximum: a miss, even with a box over the whole image
    assert M.energy_in_region(heat, M.box_region(b, (20, 20))) == 0.0
    assert M.pointing_hit(box_map((20, 20), (0, 0, 5, 5)), boxes(), None) is None


def test_original_map_peak_is_the_csv_peak_in_full_and_crop_mode() -> None:
    """pointing uses the same maximum the CSV reports as peak_x/peak_y (render.heatmap), on the same map."""
    gen = torch.Generator().manual_seed(0)
    for crop in [(0.0, 0.0, 64.0, 48.0), (11.0, 3.0, 53.0, 45.0)]:
        for _ in range(5):
            cam = torch.rand(7, 7, generator=gen)
            heat = upsample_normalize(cam, (48, 64), crop)
            rendered = render_heatmap(cam, (48, 64), crop)
            assert M.peak(heat) == (rendered.peak_x, rendered.peak_y)
            # and it is the saved heatmap before rounding
            assert (torch.round(heat * 255).to(torch.int16) - rendered.pixels.to(torch.int16)).abs().max() <= 1


# ----------------------------------------------------------------------------------- deletion and insertion


class MeanIntensity(nn.Module):
    """P(class 0) = s, the mean of channel 0 (inputs in [0, 1]); logits log s and log(1 - s), so the softmax is
    exactly (s, 1 - s). Deleting pixels towards a zero baseline lowers s by their values: a closed form."""

    def forward(self, x: Tensor) -> Tensor:
        s = x[:, 0].mean(dim=(1, 2)).clamp(1e-7, 1 - 1e-7)
        return torch.stack([s.log(), (1 - s).log()], dim=1)


BLACK = torch.zeros(1, 3, 1, 1)  # normalisation mean 0, std 1: a black pixel is 0


def ramp_image(n_side: int = 4) -> tuple[Tensor, Tensor]:
    """An image whose 16 pixels hold the values 0/15 .. 15/15 in a scrambled order, and that order as a map."""
    n = n_side * n_side
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    values = perm.float() / (n - 1)
    x = values.view(1, 1, n_side, n_side).expand(1, 3, n_side, n_side).contiguous()
    return x, values.view(1, n_side, n_side)


def test_step_counts_and_ranks() -> None:
    assert M.step_counts(16, 4) == [0, 4, 8, 12, 16]
    assert M.step_counts(10, 4) == [0, 3, 5, 8, 10]  # round half up: 2.5 -> 3, 7.5 -> 8
    sal = torch.tensor([[[0.1, 0.9], [0.5, 0.5]]])
    assert M.saliency_ranks(sal).tolist() == [[3, 0, 1, 2]]  # ties keep raster order


def test_deletion_and_insertion_curves_have_their_closed_form() -> None:
    """16 pixels with values i/15 (i = 0..15), most salient = brightest, steps = 4 (4 pixels per step).

    After deleting the n brightest, s = sum_{i < 16-n} i/15 / 16 = (16-n)(15-n) / 480:
    deletion = 0.5, 0.275, 0.116667, 0.025, 0   -> AUC = (0.25 + 0.275 + 0.116667 + 0.025 + 0) / 4 = 1/6.
    Revealing the n brightest, s = (15n - n(n-1)/2) / 240:
    insertion = 0, 0.225, 0.383333, 0.475, 0.5  -> AUC = (0 + 0.225 + 0.383333 + 0.475 + 0.25) / 4 = 1/3.
    """
    model = MeanIntensity()
    x, values = ramp_image()
    base = M.baseline_images(x, "zero", BLACK)
    assert torch.equal(base, torch.zeros_like(x))
    one = torch.zeros(1, dtype=torch.long)
    curves = M.perturbation_curves(model, x, base, values, one, one, steps=4, chunk=3)
    expected_del = [(16 - n) * (15 - n) / 480 for n in (0, 4, 8, 12, 16)]
    expected_ins = [(15 * n - n * (n - 1) / 2) / 240 for n in (0, 4, 8, 12, 16)]
    assert expected_del == pytest.approx([0.5, 0.275, 0.1166667, 0.025, 0.0], abs=1e-6)
    assert expected_ins == pytest.approx([0.0, 0.225, 0.3833333, 0.475, 0.5], abs=1e-6)
    torch.testing.assert_close(curves["deletion"][0], torch.tensor(expected_del), atol=1e-5, rtol=0)
    torch.testing.assert_close(curves["insertion"][0], torch.tensor(expected_ins), atol=1e-5, rtol=0)
    assert float(M.auc(curves["deletion"])[0]) == pytest.approx(1 / 6, abs=1e-5)
    assert float(M.auc(curves["insertion"])[0]) == pytest.approx(1 / 3, abs=1e-5)

    # the reversed map deletes the darkest first: the curves swap roles (symmetry of the ramp)
    worst = M.perturbation_curves(model, x, base, -values, one, one, steps=4, chunk=100)
    assert float(M.auc(worst["deletion"])[0]) == pytest.approx(1 / 3, abs=1e-5)
    assert float(M.auc(worst["insertion"])[0]) == pytest.approx(1 / 6, abs=1e-5)


def test_several_maps_per_image_and_given_image_probabilities() -> None:
    """Maps share their image's baseline; p_image replaces the forward of the unperturbed image."""
    model = MeanIntensity()
    x, values = ramp_image()
    x2 = torch.cat([x, 1 - x])
    sal = torch.cat([values, -values, 1 - values])
    image_of = torch.tensor([0, 0, 1])
    targets = torch.tensor([0, 0, 1])
    base = M.baseline_images(x2, "zero", BLACK)
    with torch.no_grad():
        p_image = model(x2).softmax(1)
    a = M.perturbation_curves(model, x2, base, sal, image_of, targets, steps=4, chunk=5)
    b = M.perturbation_curves(model, x2, base, sal, image_of, targets, steps=4, chunk=64, p_image=p_image)
    for mode in M.PERTURBATION_MODES:
        torch.testing.assert_close(a[mode], b[mode])
    # each map against its own image, class and order, one forward per step
    for m in range(3):
        i = int(image_of[m])
        ref = naive_curves(model, x2[i : i + 1], base[i : i + 1], sal[m], int(targets[m]), 4)
        for mode in M.PERTURBATION_MODES:
            torch.testing.assert_close(a[mode][m], torch.tensor(ref[mode]), atol=1e-5, rtol=0)


def naive_curves(model: nn.Module, x: Tensor, base: Tensor, sal: Tensor, target: int, steps: int) -> dict[str, list]:
    """One forward per step per image, straight from the definition, for comparison."""
    n = sal.numel()
    order = torch.argsort(sal.flatten(), descending=True, stable=True)
    out: dict[str, list] = {"deletion": [], "insertion": []}
    for k in range(steps + 1):
        count = M.step_counts(n, steps)[k]
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[order[:count]] = True
        chosen = chosen.view(1, 1, *sal.shape)
        with torch.no_grad():
            deleted = torch.where(chosen, base, x)
            inserted = torch.where(chosen, x, base)
            out["deletion"].append(float(model(deleted).softmax(1)[0, target]))
            out["insertion"].append(float(model(inserted).softmax(1)[0, target]))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_batched_curves_equal_the_one_forward_per_step_definition(chunk: int) -> None:
    torch.manual_seed(0)
    # a small CNN with batch norm (eval) and pooling: batch composition must not change any image's output
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    sal = torch.rand(3, 32, 32, generator=gen)
    image_of, targets = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 4])
    base = M.baseline_images(x, "blur", BLACK)
    curves = M.perturbation_curves(model, x, base, sal, image_of, targets, steps=5, chunk=chunk)
    for m in range(3):
        i = int(image_of[m])
        ref = naive_curves(model, x[i : i + 1], base[i : i + 1], sal[m], int(targets[m]), 5)
        for mode in M.PERTURBATION_MODES:
            torch.testing.assert_close(curves[mode][m], torch.tensor(ref[mode]), atol=1e-5, rtol=1e-4)


def test_auc_is_the_trapezoid_rule() -> None:
    assert M.auc(torch.tensor([[1.0, 1.0, 1.0]])).item() == pytest.approx(1.0)
    assert M.auc(torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.5)
    assert M.auc(torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0]])).item() == pytest.approx((1 + 0.5) / 4)


def test_baselines() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 20, 24, generator=gen)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    xn = (x - mean) / std
    black = (0 - mean) / std
    # zero: a black image in pixel space
    zero = M.baseline_images(xn, "zero", black)
    torch.testing.assert_close(zero * std + mean, torch.zeros_like(x), atol=1e-6, rtol=0)
    # mean: each image's own per-channel mean colour
    torch.testing.assert_close(
        M.baseline_images(xn, "mean", black) * std + mean, x.mean((2, 3), keepdim=True).expand_as(x)
    )
    # blur: torchvision's Gaussian blur (11 taps, sigma 5, reflect padding), which commutes with normalisation
    torch.testing.assert_close(M.gaussian_blur(x), tv_gaussian_blur(x, [11, 11], [5.0, 5.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(M.baseline_images(xn, "blur", black) * std + mean, M.gaussian_blur(x), atol=1e-5, rtol=0)
    flat = torch.full((1, 3, 9, 9), 0.3)
    torch.testing.assert_close(M.gaussian_blur(flat), flat)
    tiny = torch.rand(1, 3, 3, 4, generator=gen)  # smaller than the kernel: still defined, still a mean
    assert M.gaussian_blur(tiny).shape == tiny.shape
    with pytest.raises(ValueError):
        M.baseline_images(xn, "noise", black)


# ----------------------------------------------------------------------------------------------- drop/increase


def test_masking_is_pixel_multiplication() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 8, 8, generator=gen)
    s = torch.rand(2, 8, 8, generator=gen)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    masked = M.masked_by_saliency((x - mean) / std, s, (0 - mean) / std)
    torch.testing.assert_close(masked * std + mean, x * s.unsqueeze(1), atol=1e-6, rtol=0)


def test_average_drop_and_increase_by_hand() -> None:
    model = MeanIntensity()
    ones = torch.ones(1, 3, 4, 4)
    half = torch.zeros(1, 3, 4, 4)
    half[..., :2, :] = 1.0  # top half bright: P0 = 0.5
    quarter_of_ones = box_map((4, 4), (0, 0, 2, 2)).view(1, 4, 4)  # 4 of 16 pixels
    top_half = box_map((4, 4), (0, 0, 4, 2)).view(1, 4, 4)

    def probs(x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return model(x).softmax(1), model(M.masked_by_saliency(x, s, BLACK)).softmax(1)

    # all-ones image, map keeps a quarter: Y = 1, O = 0.25 -> drop 75 %, no increase
    full, masked = probs(ones, quarter_of_ones)
    assert float(M.average_drop(full[:, 0], masked[:, 0])[0]) == pytest.approx(75.0, abs=1e-3)
    assert int(M.increase_in_confidence(full[:, 0], masked[:, 0])[0]) == 0
    # the map keeps exactly the bright half: O = Y = 0.5 -> drop 0, equal is not an increase
    full, masked = probs(half, top_half)
    assert float(M.average_drop(full[:, 0], masked[:, 0])[0]) == pytest.approx(0.0, abs=1e-4)
    assert int(M.increase_in_confidence(full[:, 0], masked[:, 0])[0]) == 0
    # class 1 (P1 = 1 - mean): keeping a quarter of the bright half raises it from 0.5 to 0.75
    full, masked = probs(half, quarter_of_ones)
    assert float(masked[0, 1]) == pytest.approx(0.75, abs=1e-6)
    assert float(M.average_drop(full[:, 1], masked[:, 1])[0]) == 0.0
    assert int(M.increase_in_confidence(full[:, 1], masked[:, 1])[0]) == 1


def test_input_maps_normalise_and_zero_constant_maps() -> None:
    cams = torch.stack([torch.arange(4.0).view(2, 2), torch.full((2, 2), 3.0)])
    maps = M.input_maps(cams, (8, 8))
    assert maps.shape == (2, 8, 8)
    assert float(maps[0].min()) == 0.0 and float(maps[0].max()) == 1.0
    assert float(maps[1].abs().max()) == 0.0


# ------------------------------------------------------------------------------------------- the pass registry


def test_every_metric_name_has_exactly_one_pass_and_only_asked_families_are_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gradcam_cli.audit import evaluate
    from gradcam_cli.audit.batch_maps import PassSetup
    from gradcam_cli.audit.metrics import METRIC_NAMES
    from gradcam_cli.config import Settings
    from gradcam_cli.model.loading import InputSpec, LoadedModel

    served = [name for make in evaluate.PASSES for name in make.metrics]
    assert sorted(served) == sorted(METRIC_NAMES)  # each --metrics name is measured by one family

    built: list[str] = []
    for make in evaluate.PASSES:
        original = make.__init__

        def record(self: object, setup: PassSetup, _make: type = make, _init: object = original) -> None:
            built.append(_make.__name__)
            _init(self, setup)  # type: ignore[operator]

        monkeypatch.setattr(make, "__init__", record)
    spec = InputSpec(size=(32, 32), resize_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    loaded = LoadedModel(nn.Conv2d(3, 2, 3), "tiny", "none", spec, [])
    settings = Settings(metrics=("sparseness", "drop"))
    evaluator = evaluate.Evaluator(PassSetup(settings, loaded, {}, torch.device("cpu"), None, None))
    assert built == ["ConcentrationPass", "PerturbationPass"]  # no probe forward, no random weights for the rest
    assert set(evaluator.stage_seconds) == {"metrics", "metric:sparseness", "metric:drop"}
