"""How concentrated a map's evidence is: sparseness (Gini index) and complexity (entropy).

Both read the map users see, at the model-input size and min-max normalised to [0, 1] (`LayerMaps.saliency`),
flattened to n values a_1..a_n >= 0. No forward, no backward: a sort and a sum per map.

- sparseness (Chalasani et al., "Concise Explanations of Neural Networks using Adversarial Training", ICML
  2020; Quantus `Sparseness`): with a + eps sorted ascending, G = sum_i (2i - n - 1) a_(i) / (n sum_i a_i),
  i = 1..n. 0 for a flat map, (n - 1) / n when one pixel holds everything; higher is more concentrated. eps =
  1e-7 as Quantus adds, so an all-zero map is flat (G = 0) instead of 0/0.
- complexity (Bhatt et al., "Evaluating and Aggregating Feature-based Model Explanations", IJCAI 2020; Quantus
  `Complexity`): the entropy H = -sum_i p_i log(p_i + 1e-12) of p = a / sum(a), in nats; log n for a flat map,
  0 for a single pixel; lower is more concentrated. An all-zero map is no distribution: left empty.

The sums run in float64: n is 50,176 at 224 x 224, and float32 sums of that many terms drift in the fifth
digit, which is the precision the CSV keeps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradcam_cli.audit.batch_maps import BatchContext, LayerMaps, MetricPass

GINI_EPS = 1e-7
ENTROPY_EPS = 1e-12


def gini(maps: Tensor) -> Tensor:
    """(m, h, w) non-negative maps -> (m,) Gini index in [0, (n - 1) / n], float64."""
    a = maps.flatten(1).double() + GINI_EPS
    a, _ = torch.sort(a, dim=1)
    n = a.shape[1]
    i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    return ((2 * i - n - 1) * a).sum(dim=1) / (n * a.sum(dim=1))


def entropy(maps: Tensor) -> Tensor:
    """(m, h, w) non-negative maps -> (m,) entropy in nats of the map as a distribution; NaN for an all-zero map."""
    a = maps.flatten(1).double()
    total = a.sum(dim=1, keepdim=True)
    p = a / torch.where(total > 0, total, torch.full_like(total, torch.nan))
    return -(p * torch.log(p + ENTROPY_EPS)).sum(dim=1)


class ConcentrationPass(MetricPass):
    metrics = ("sparseness", "complexity")

    def measure(self, ctx: BatchContext, layers: Sequence[LayerMaps]) -> None:
        for maps in layers:
            if "sparseness" in self.asked:
                maps.put("sparseness", gini(maps.saliency).tolist())
            if "complexity" in self.asked:
                values = entropy(maps.saliency).tolist()
                maps.put("complexity", [v if v == v else None for v in values])  # NaN: an all-zero map
