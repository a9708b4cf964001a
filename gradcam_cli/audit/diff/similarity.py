"""How alike two saliency maps are: the measures of "Sanity checks for saliency maps" (Adebayo et al. 2018) plus
the overlap of their most salient regions. NumPy only (no torch, no SciPy): `gradcam diff` reads files and
computes nothing with a model.

Every function takes two maps of one shape (h, w), float, and returns a float; maps are min-max normalised to
[0, 1] first where the measure depends on scale (SSIM), so a run's unnormalised CAMs (npy/) and the 8-bit
heatmaps (heatmaps/) compare the same way.
"""

from __future__ import annotations

import math

import numpy as np

SSIM_WINDOW = 7  # scikit-image's default: a uniform 7 x 7 window, sample covariance
SSIM_K1, SSIM_K2 = 0.01, 0.03


def normalized(m: np.ndarray) -> np.ndarray:
    """(h, w) -> float64 in [0, 1] by min-max; a constant map becomes all zeros."""
    m = np.asarray(m, dtype=np.float64)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def average_ranks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ranks with ties given their average rank, the stable ascending order) of a flat array.

    Ties matter: heatmaps are 8-bit and ReLU leaves many exact zeros, and giving tied values arbitrary distinct
    ranks would make two identical maps look less than identical.
    """
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.empty(xs.size, dtype=bool)
    new[:1] = True
    np.not_equal(xs[1:], xs[:-1], out=new[1:])
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, xs.size))
    ranks = np.empty(xs.size, dtype=np.float64)
    ranks[order] = (starts + (counts - 1) / 2.0)[group]
    return ranks, order


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of the pixel values: Pearson's r of their (average) ranks, in [-1, 1].

    NaN when either map is constant (no ranking to correlate), unless the two maps are equal (then 1).
    """
    if np.array_equal(a, b):
        return 1.0
    ra, _ = average_ranks(np.ravel(a))
    rb, _ = average_ranks(np.ravel(b))
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / denom if denom > 0 else math.nan


def _box_means(x: np.ndarray, size: int) -> np.ndarray:
    """Mean over every size x size window that fits inside x (the 'valid' positions), by an integral image."""
    s = np.zeros((x.shape[0] + 1, x.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(x, axis=0), axis=1, out=s[1:, 1:])
    total = s[size:, size:] - s[:-size, size:] - s[size:, :-size] + s[:-size, :-size]
    return total / (size * size)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004) of the two normalised maps, as scikit-image computes it by
    default (uniform 7 x 7 window, sample covariance, K1 0.01, K2 0.03, data range 1, mean over the positions
    where the window fits). Maps smaller than the window use one window as large as the map."""
    x, y = normalized(a), normalized(b)
    if np.array_equal(x, y):
        return 1.0
    size = min(SSIM_WINDOW, *x.shape)
    n = size * size
    cov_norm = n / (n - 1) if n > 1 else 1.0
    ux, uy = _box_means(x, size), _box_means(y, size)
    vx = cov_norm * (_box_means(x * x, size) - ux * ux)
    vy = cov_norm * (_box_means(y * y, size) - uy * uy)
    vxy = cov_norm * (_box_means(x * y, size) - ux * uy)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())


def top_region(m: np.ndarray, q: float) -> np.ndarray:
    """A boolean mask of the ceil(q x pixels) most salient pixels (ties broken by position, the same way for
    equal maps)."""
    flat = np.ravel(m)
    k = max(1, math.ceil(q * flat.size))
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(np.shape(m))


def top_iou(a: np.ndarray, b: np.ndarray, q: float) -> float:
    """Intersection over union of the two maps' top-q regions: 1 when they mark the same pixels, 0 when none."""
    ta, tb = top_region(a, q), top_region(b, q)
    union = int(np.count_nonzero(ta | tb))
    return int(np.count_nonzero(ta & tb)) / union if union else 1.0


def difference_picture(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8: where the maps disagree. Red where A is higher, blue where B is, white where equal;
    the strength is |A - B| of the normalised maps."""
    d = normalized(b) - normalized(a)
    strength = np.abs(d)
    rgb = np.ones((*d.shape, 3), dtype=np.float64)
    a_higher, b_higher = d < 0, d > 0
    rgb[..., 1] -= strength  # green fades wherever they differ
    rgb[..., 2] -= np.where(a_higher, strength, 0.0)  # red: A higher
    rgb[..., 0] -= np.where(b_higher, strength, 0.0)  # blue: B higher
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
