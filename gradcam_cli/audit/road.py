"""ROAD: RemOve And Debias (Rong et al., "A Consistent and Efficient Evaluation Strategy for Attribution
Methods", ICML 2022), as pytorch-grad-cam's ROADMostRelevantFirstAverage / ROADLeastRelevantFirstAverage /
ROADCombined with ClassifierOutputSoftmaxTarget, batched on the compute device.

A map s (h, w) in [0, 1] (`LayerMaps.saliency`) of class c on the normalised input x (3, h, w), with
P(x) = softmax(model(x))[c]:

- removal: at percentile q in 10, 20, ..., 90, MoRF keeps the pixels with s < t_q(s) and removes the rest, LeRF
  the same with 1 - s; t_q is numpy's linear-interpolation percentile of the map's h * w values. So MoRF at
  q = 10 removes the 90% most relevant pixels, LeRF at q = 10 the 90% least relevant.
- imputation (noisy linear imputation, pytorch-grad-cam's NoisyLinearImputer): every removed pixel i is the
  weighted mean of its 8 neighbours N(i) inside the image, per channel,
      d_i y_i - sum_{j in N(i), removed} w_ij y_j = sum_{j in N(i), kept} w_ij x_j,   d_i = sum_{j in N(i)} w_ij,
  w = 1/6 for the 4 direct neighbours, 1/12 for the 4 diagonal ones; then y_i += sigma * N(0, 1), sigma =
  NOISE_STD in normalised units. Kept pixels are unchanged.
- scores: MoRF = mean_q [P(imputed) - P(x)] (lower is better), LeRF likewise (higher is better), combined =
  (LeRF - MoRF) / 2 (higher is better).

The system (D - W on the removed pixels) is symmetric positive definite when every connected removed region
touches a kept pixel. With 8-connectivity a removed region without a kept neighbour is the whole image: then
every pixel is removed, there is nothing to interpolate from, and the image is filled with 0 in normalised
units (the normalisation mean colour) plus the noise. pytorch-grad-cam's direct solver has no solution there.

It is solved per image and channel by conjugate gradients in float32, all systems of a chunk at once,
preconditioned by one symmetric multigrid V-cycle (`v_cycle`): damped Jacobi smoothing, piecewise-constant
2 x 2 aggregation and Galerkin coarse operators down to 1 x 1, the coarse correction weighted by CORRECTION.
So the iterations hardly grow with the image size (plain Jacobi preconditioning needs more iterations than the
image has rows: information crosses one pixel per iteration). The start is a coarse-to-fine masked average
(`warm_start`); a system stops when ||r|| <= RTOL * ||b|| or after MAX_ITER iterations, each on its own, so
its result does not depend on the other systems of its chunk. The operator is a 9-point stencil with
per-pixel coefficients, applied by shifted multiply-adds (zero padding drops the neighbours outside the
image).

The noise of one (image, map, order, percentile) comes from a CPU generator seeded with settings.seed plus a
64-bit BLAKE2b hash of the image path, the map name, the order and the percentile (`noise_seed`): the same
run gives the same values whatever the batch size or the order of the images.

Cost per batch of M maps: 2 * 9 * M imputations (chunks of --metric-batch-size images) and as many forwards.
No backward.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gradcam_cli.audit.batch_maps import BatchContext, LayerMaps, MetricPass, PassSetup

PERCENTILES: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
ORDERS: tuple[str, ...] = ("morf", "lerf")
NOISE_STD = 0.01
RTOL = 1e-5
MAX_ITER = 200
SWEEPS = 1  # damped Jacobi sweeps before and after each coarse-grid correction
OMEGA = 2.0 / 3.0
CORRECTION = 1.5  # weight of the coarse-grid correction: plain 2 x 2 aggregation under-corrects smooth errors
DIRECT, DIAGONAL = 1.0 / 6.0, 1.0 / 12.0


# ------------------------------------------------------------------------------------------------ removal


def percentiles(values: Tensor, qs: Sequence[float]) -> Tensor:
    """(m, n) float32 -> (m, len(qs)) float32 percentiles of each row, as numpy's default (np.percentile(row, q)
    for a scalar q): at virtual index v = (n - 1) * (q / 100) (float64), with t = v - floor(v) and a, b the
    sorted values at floor(v), floor(v) + 1, a + (b - a) * t for t < 0.5 and b - (b - a) * (1 - t) otherwise,
    in float32."""
    v, _ = torch.sort(values.float(), dim=1)
    n = v.shape[1]
    index = [(n - 1) * (q / 100) for q in qs]
    lo = [math.floor(i) for i in index]
    a, b = v[:, lo], v[:, [min(i + 1, n - 1) for i in lo]]
    t = torch.tensor([i - f for i, f in zip(index, lo, strict=True)], dtype=torch.float32, device=v.device)
    u = torch.tensor([1 - (i - f) for i, f in zip(index, lo, strict=True)], dtype=torch.float32, device=v.device)
    return torch.where(t >= 0.5, b - (b - a) * u, a + (b - a) * t)


def thresholds(saliency: Tensor, qs: Sequence[float] = PERCENTILES) -> Tensor:
    """(m, h, w) maps -> (m, 2, Q) float32 thresholds: [:, 0] percentiles of s (MoRF), [:, 1] of 1 - s (LeRF)."""
    s = saliency.flatten(1).float()
    return torch.stack([percentiles(s, qs), percentiles(1 - s, qs)], dim=1)


def removed_pixels(saliency: Tensor, order: Tensor, threshold: Tensor) -> Tensor:
    """(J, h, w) maps, (J,) order (0 MoRF, 1 LeRF), (J,) threshold -> (J, h, w) bool, True where removed:
    not (value < threshold), the value being s for MoRF and 1 - s for LeRF, in float32."""
    s = saliency.float()
    value = torch.where(order.view(-1, 1, 1) == 0, s, 1 - s)
    return ~(value < threshold.view(-1, 1, 1))


# ------------------------------------------------------------------------------------------------ imputation


OFFSETS: tuple[tuple[int, int], ...] = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))  # k = 3dy+dx+4


def shifted(v: Tensor, dy: int, dx: int) -> Tensor:
    """(..., h, w) -> u with u[y, x] = v[y + dy, x + dx], 0 outside the image."""
    h, w = v.shape[-2:]
    return F.pad(v, (1, 1, 1, 1))[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def fine_stencil(removed: Tensor) -> Tensor:
    """(J, h, w) 0/1 removed -> (J, 9, h, w) the imputation matrix A = D - W on the removed pixels as a stencil:
    [:, k, y, x] = A[(y, x), (y, x) + OFFSETS[k]]; d = the weight of the neighbours inside the image, W the
    weights between removed pixels (1/6 direct, 1/12 diagonal); rows and columns of kept pixels are 0."""
    ones = torch.ones_like(removed)
    weights = [0.0 if (dy, dx) == (0, 0) else (DIAGONAL if dy and dx else DIRECT) for dy, dx in OFFSETS]
    d = sum(wt * shifted(ones, dy, dx) for wt, (dy, dx) in zip(weights, OFFSETS, strict=True))
    coef = [-wt * removed * shifted(removed, dy, dx) for wt, (dy, dx) in zip(weights, OFFSETS, strict=True)]
    coef[4] = d * removed
    return torch.stack(coef, dim=1)


def apply(coef: Tensor, v: Tensor) -> Tensor:
    """(J, 9, h, w) stencil, (J, C, h, w) vectors -> A v per system and channel."""
    h, w = v.shape[-2:]
    padded = F.pad(v, (1, 1, 1, 1))
    out = coef[:, 4:5] * v
    for k, (dy, dx) in enumerate(OFFSETS):
        if k != 4:
            out.addcmul_(coef[:, k : k + 1], padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w])
    return out


def coarsen(coef: Tensor) -> Tensor:
    """Galerkin coarse operator P^T A P for P constant on 2 x 2 blocks: (J, 9, h, w) -> (J, 9, ceil(h/2),
    ceil(w/2)); fine pixel (y, x) with offset (dy, dx) lands at coarse offset (floor((y%2 + dy) / 2), ...)."""
    coef = F.pad(coef, (0, coef.shape[-1] % 2, 0, coef.shape[-2] % 2))
    out = coef.new_zeros(*coef.shape[:2], coef.shape[-2] // 2, coef.shape[-1] // 2)
    for k, (dy, dx) in enumerate(OFFSETS):
        for py in (0, 1):
            for px in (0, 1):
                big = 3 * ((py + dy) // 2) + (px + dx) // 2 + 4
                out[:, big] += coef[:, k, py::2, px::2]
    return out


def restrict(r: Tensor) -> Tensor:
    """P^T: (J, C, h, w) -> (J, C, ceil(h/2), ceil(w/2)), sums over 2 x 2 blocks."""
    r = F.pad(r, (0, r.shape[-1] % 2, 0, r.shape[-2] % 2))
    return r[..., 0::2, 0::2] + r[..., 0::2, 1::2] + r[..., 1::2, 0::2] + r[..., 1::2, 1::2]


def prolong(z: Tensor, size: Sequence[int]) -> Tensor:
    """P: each coarse value onto its 2 x 2 block, cropped to `size`."""
    return z.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[..., : size[0], : size[1]]


def hierarchy(removed: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(J, h, w) 0/1 removed -> [(stencil, inverse diagonal (J, 1, h_l, w_l))] from the pixels down to 1 x 1."""
    levels = []
    coef = fine_stencil(removed)
    while True:
        diag = coef[:, 4:5]
        levels.append((coef, torch.where(diag > 0, 1 / diag.clamp_min(1e-30), torch.zeros_like(diag))))
        if max(coef.shape[-2:]) == 1:
            return levels
        coef = coarsen(coef)


def v_cycle(levels: Sequence[tuple[Tensor, Tensor]], r: Tensor) -> Tensor:
    """One multigrid V-cycle for A z = r (J, C, h, w): SWEEPS damped Jacobi sweeps (weight OMEGA) before and
    after the coarse-grid correction P v_cycle(P^T (r - A z)) times CORRECTION, exact on the 1 x 1 level.

    Symmetric positive definite, so a conjugate-gradient preconditioner: the same symmetric sweeps on both
    sides, restriction = P^T, and with the error operator E = S (I - CORRECTION P B_c P^T A) S, the sweeps S
    contract in the A-norm (the spectrum of OMEGA D^-1 A lies in (0, 4/3] for these diagonally dominant
    matrices) and the coarse term is positive semi-definite by induction, so E < I for any CORRECTION >= 0.
    """
    coef, dinv = levels[0]
    if len(levels) == 1:
        return dinv * r
    z = OMEGA * dinv * r
    for _ in range(SWEEPS - 1):
        z.addcmul_(OMEGA * dinv, r - apply(coef, z))
    z.add_(prolong(v_cycle(levels[1:], restrict(r - apply(coef, z))), r.shape[-2:]), alpha=CORRECTION)
    for _ in range(SWEEPS):
        z.addcmul_(OMEGA * dinv, r - apply(coef, z))
    return z


def warm_start(x: Tensor, keep: Tensor) -> Tensor:
    """(J, C, h, w) values, (J, 1, h, w) 0/1 kept -> a fill of the removed pixels: the masked mean of the kept
    values over 2 x 2 blocks, level by level, each level's empty cells taking the bilinear upsampling of the
    coarser one; 0 where the image has no kept pixel at all. Kept pixels keep x."""
    levels = [(x * keep, keep)]
    while max(levels[-1][1].shape[-2:]) > 1:
        v, w = levels[-1]
        kernel = (min(2, v.shape[-2]), min(2, v.shape[-1]))
        levels.append((F.avg_pool2d(v, kernel, ceil_mode=True), F.avg_pool2d(w, kernel, ceil_mode=True)))
    est = torch.zeros_like(levels[-1][0])
    for v, w in reversed(levels):
        if est.shape[-2:] != v.shape[-2:]:
            est = F.interpolate(est, size=v.shape[-2:], mode="bilinear", align_corners=False)
        est = torch.where(w > 0, v / w.clamp_min(1e-12), est)
    return est


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=(-2, -1), keepdim=True)


def conjugate_gradient(
    levels: Sequence[tuple[Tensor, Tensor]], b: Tensor, y: Tensor, rtol: float = RTOL, max_iter: int = MAX_ITER
) -> tuple[Tensor, int]:
    """Solve A y = b per system and channel (b, y: (J, C, h, w), zero on kept pixels) by conjugate gradients
    preconditioned with `v_cycle`, from y. Each (system, channel) stops on its own (its iterate is frozen)
    once ||r|| <= rtol * ||b||. Returns y and the iterations the slowest one took."""
    coef = levels[0][0]
    r = b - apply(coef, y)
    z = v_cycle(levels, r)
    p, rz = z, _dot(r, z)
    goal = rtol * _dot(b, b).sqrt()
    active = _dot(r, r).sqrt() > goal
    step = 0
    while step < max_iter and bool(active.any()):
        ap = apply(coef, p)
        alpha = active * rz / _dot(p, ap).clamp_min(1e-30)  # 0 for a converged system: its y and r stay
        y.addcmul_(alpha, p)
        r.addcmul_(alpha, ap, value=-1.0)
        z = v_cycle(levels, r)
        rz_new = _dot(r, z)
        p = z.addcmul_(rz_new / rz.clamp_min(1e-30), p)
        active = active & (_dot(r, r).sqrt() > goal)
        rz, step = rz_new, step + 1
    return y, step


def linear_fill(x: Tensor, removed: Tensor, rtol: float = RTOL, max_iter: int = MAX_ITER) -> tuple[Tensor, int]:
    """(J, C, h, w) images, (J, h, w) bool removed -> (J, C, h, w) float32 with the removed pixels replaced by the
    solution of the imputation system (no noise), and the iterations the slowest system took."""
    x = x.float()
    rem = removed.to(x.dtype)
    levels = hierarchy(rem)
    rem = rem.unsqueeze(1)
    keep = 1 - rem
    b = -apply(fine_stencil(torch.ones_like(removed, dtype=x.dtype)), x * keep) * rem
    y, steps = conjugate_gradient(levels, b, warm_start(x, keep) * rem, rtol, max_iter)
    return torch.where(rem > 0, y, x), steps


def impute(x: Tensor, removed: Tensor, noise: Tensor | None = None, rtol: float = RTOL) -> Tensor:
    """`linear_fill` plus `noise` (N, C, h, w), already scaled, on the removed pixels only."""
    filled, _ = linear_fill(x, removed, rtol)
    return filled if noise is None else filled + noise * removed.unsqueeze(1)


# ------------------------------------------------------------------------------------------------ the pass


def noise_seed(seed: int, rel: str, name: str, order: str, percentile: int) -> int:
    """settings.seed plus a BLAKE2b hash of (image path, map name, order, percentile), modulo 2**63."""
    key = f"{rel}\n{name}\n{order}\n{percentile}".encode()
    return (seed + int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")) % 2**63


def job_noise(seeds: Sequence[int], shape: Sequence[int], std: float, device: torch.device) -> Tensor:
    """(J, C, h, w) std * N(0, 1), each image from a CPU generator of its own seed, moved to `device`."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return (torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]) * std).to(device)


class RoadPass(MetricPass):
    metrics = ("road",)

    def __init__(self, setup: PassSetup) -> None:
        super().__init__(setup)
        self.seed = setup.settings.seed

    def manifest(self) -> dict[str, Any]:
        return {
            "road": {
                "percentiles": list(PERCENTILES),
                "noise_std": NOISE_STD,
                "noise_seed": "seed + blake2b-64(path, map, order, percentile) mod 2**63, CPU generator",
                "imputer": "noisy linear: 8 neighbours, 1/6 direct, 1/12 diagonal",
                "solver": {
                    "method": "conjugate gradients, multigrid V-cycle preconditioner, float32",
                    "rtol": RTOL,
                    "max_iter": MAX_ITER,
                },
            }
        }

    def measure(self, ctx: BatchContext, layers: Sequence[LayerMaps]) -> None:
        for maps in layers:
            diff = self._changes(ctx, maps)  # (m, 2, Q)
            morf, lerf = diff.mean(dim=2).double().unbind(dim=1)
            maps.put("road_morf", morf.tolist())
            maps.put("road_lerf", lerf.tolist())
            maps.put("road_combined", ((lerf - morf) / 2).tolist())

    def _changes(self, ctx: BatchContext, maps: LayerMaps) -> Tensor:
        """(m, 2, Q) P(imputed) - P(x) per map, order and percentile, ctx.chunk imputations at a time."""
        thr = thresholds(maps.saliency)
        m, q = thr.shape[0], len(PERCENTILES)
        jobs = torch.arange(m * 2 * q, device=thr.device)
        probs = [self._probs(ctx, maps, thr, jobs[i : i + ctx.chunk]) for i in range(0, jobs.numel(), ctx.chunk)]
        p_x = ctx.result.probs[maps.image_of, maps.classes].float()
        return torch.cat(probs).view(m, 2, q) - p_x.view(m, 1, 1)

    def _probs(self, ctx: BatchContext, maps: LayerMaps, thr: Tensor, jobs: Tensor) -> Tensor:
        """P(imputed)[class] for `jobs` (J,): job j is map j // 2Q, order (j // Q) % 2, percentile j % Q."""
        q = len(PERCENTILES)
        k, order, pct = jobs // (2 * q), (jobs // q) % 2, jobs % q
        removed = removed_pixels(maps.saliency[k], order, thr[k, order, pct])
        x = ctx.x[maps.image_of[k]]
        seeds = [
            noise_seed(self.seed, maps.rels[a], maps.name, ORDERS[o], PERCENTILES[p])
            for a, o, p in zip(k.tolist(), order.tolist(), pct.tolist(), strict=True)
        ]
        noise = job_noise(seeds, x.shape[1:], NOISE_STD, x.device)
        filled, _ = linear_fill(x, removed)
        imputed = filled + noise * removed.unsqueeze(1)
        p = ctx.forward(imputed.to(ctx.x.dtype)).softmax(dim=1)
        return p[torch.arange(p.shape[0], device=p.device), maps.classes[k]]
