"""Batched similarity of two sets of maps: Spearman rank correlation and SSIM, in float64 on the maps' device.

- spearman(a, b): the Pearson correlation of the two maps' ranks over their n pixels, ties given the average
  of the ranks they span (scipy.stats.spearmanr). A constant map has no ranks (its rank variance is 0): NaN.
- ssim(a, b): scikit-image's `structural_similarity` with its defaults for 2-D grey images and data_range R:
  a 7 x 7 uniform window, K1 = 0.01, K2 = 0.03, C1 = (K1 R)^2, C2 = (K2 R)^2, the sample covariance (window
  statistics times N / (N - 1), N = 49), and the mean of
      S = (2 mu_a mu_b + C1)(2 cov_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(var_a + var_b + C2))
  over the windows that lie wholly inside the map (skimage crops 3 pixels from each edge of its filtered
  image, which are exactly those).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def average_ranks(values: Tensor) -> Tensor:
    """(m, n) -> (m, n) float64 ranks 1..n along each row, ties sharing the mean of the ranks they span."""
    m, n = values.shape
    ordered, order = torch.sort(values, dim=1, stable=True)
    new_group = torch.ones_like(ordered, dtype=torch.bool)
    new_group[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = torch.cumsum(new_group.long(), dim=1) - 1 + n * torch.arange(m, device=values.device).view(-1, 1)
    position = torch.arange(1, n + 1, device=values.device, dtype=torch.float64).expand(m, n)
    total = torch.zeros(m * n, dtype=torch.float64, device=values.device).index_add_(
        0, group.flatten(), position.flatten()
    )
    count = torch.bincount(group.flatten(), minlength=m * n).to(torch.float64)
    mean_rank = (total / count.clamp(min=1))[group]  # (m, n), in sorted order
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """(m, n) x (m, n) -> (m,) float64 Pearson correlation per row; NaN where a row is constant."""
    a = a.double() - a.double().mean(dim=1, keepdim=True)
    b = b.double() - b.double().mean(dim=1, keepdim=True)
    denominator = torch.sqrt((a * a).sum(dim=1) * (b * b).sum(dim=1))
    return (a * b).sum(dim=1) / torch.where(denominator > 0, denominator, torch.full_like(denominator, torch.nan))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """(m, h, w) x (m, h, w) maps -> (m,) float64 Spearman rank correlation; NaN where a map is constant."""
    return pearson(average_ranks(a.flatten(1)), average_ranks(b.flatten(1)))


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """(m, h, w) x (m, h, w) maps, h, w >= 7 -> (m,) float64 mean SSIM over the valid 7 x 7 windows."""
    x, y = a.double().unsqueeze(1), b.double().unsqueeze(1)
    n = SSIM_WINDOW * SSIM_WINDOW
    stats = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], dim=1), SSIM_WINDOW, stride=1)
    mu_x, mu_y, xx, yy, xy = stats.unbind(dim=1)
    cov_norm = n / (n - 1)
    var_x, var_y = cov_norm * (xx - mu_x * mu_x), cov_norm * (yy - mu_y * mu_y)
    cov_xy = cov_norm * (xy - mu_x * mu_y)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(dim=1)
