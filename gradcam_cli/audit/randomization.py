"""Model parameter randomization (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018; Quantus
`MPRT`): does the map change when the model forgets what it learned after the target layer?

Per map: rho = Spearman(original map, the map of the same class once the head is re-initialised), both at the
model-input size in [0, 1] (`LayerMaps.saliency`, `measures.input_maps`), ties ranked by their average
(`map_similarity.spearman`). Lower is better: a map that keeps its ranking under random weights does not
explain the model. The head, its blocks and the random weights are `reinit`'s; for methods without a layer
(guided backprop) the head follows the run's configured layer all the same, so methods are compared on the
same re-initialisation.

No ranks, no correlation: an original map that is constant (all zero after `input_maps`) gets no value (the
cell stays empty, the curve holds NaN); a randomised map that is constant while the original is not gets 0
(a constant shares no ordering with anything).

`--randomization cascade` continues, after the head step, one block at a time down the model, keeping the
earlier steps' weights random; the column is the head step's value in both modes, and each map's curve
(rho per step, float32) is written to `randomization/<rel><suffix>.npy` (`OutputNames.randomization_curve`).

Cost per batch: one explain (the run's method, forward and backward) per step: 1 for `head`, 1 + the number
of blocks for `cascade`. The random weights are made once per run; each batch swaps them in by pointer.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradcam_cli.audit import measures as M
from gradcam_cli.audit.batch_maps import BatchContext, Explain, LayerMaps, MetricPass, PassSetup
from gradcam_cli.audit.map_similarity import spearman
from gradcam_cli.audit.reinit import RandomWeights, plan_randomization
from gradcam_cli.model.layers import choose_layers
from gradcam_cli.render.encode import encode_npy


def rank_similarity(original: Tensor, randomised: Tensor) -> Tensor:
    """(m, h, w) x (m, h, w) -> (m,) Spearman rho; NaN for a constant original, 0 for a constant randomised map."""
    rho = spearman(original, randomised)
    flat_original = original.flatten(1)
    constant = (flat_original.amax(dim=1) == flat_original.amin(dim=1)).to(rho.device)
    return torch.where(torch.isnan(rho) & ~constant, torch.zeros_like(rho), rho)


def randomization_curves(
    explain: Explain, x: Tensor, targets: Tensor, layers: Sequence[LayerMaps], weights: RandomWeights
) -> list[Tensor]:
    """Per map set, (m, S) rank similarity of each map to the map of the same class (fixed `targets` (B, T))
    after each of the S cumulative randomization steps; the model's own weights are back on return."""
    curves: list[list[Tensor]] = [[] for _ in layers]
    with weights.swapped() as randomise:
        for step in range(len(weights.states)):
            randomise(step)
            result = explain(x, targets)
            for curve, maps in zip(curves, layers, strict=True):
                randomised = M.input_maps(maps.pick(result), maps.input_size)
                curve.append(rank_similarity(maps.saliency, randomised))
    return [torch.stack(curve, dim=1) for curve in curves]


def _run_layers(setup: PassSetup) -> dict[str, torch.nn.Module]:
    """The run's target layers; for a method without one (guided backprop), the layer the run is configured
    with, resolved as a layer method's run would resolve it."""
    if setup.layers:
        return dict(setup.layers)
    s, loaded = setup.settings, setup.loaded
    return choose_layers(loaded.model, s.target_layers, s.model, loaded.spec.size, setup.device, lambda _: None)


class RandomizationPass(MetricPass):
    metrics = ("randomization",)

    def __init__(self, setup: PassSetup) -> None:
        super().__init__(setup)
        settings = setup.settings
        self.mode = settings.randomization
        self.seed = settings.seed
        self.outputs = setup.outputs
        self.layers = _run_layers(setup)
        self.plan = plan_randomization(
            setup.loaded.model,
            self.layers,
            setup.loaded.spec.size,
            setup.device,
            settings.seed,
            cascade=self.mode == "cascade",
        )

    def manifest(self) -> dict[str, Any]:
        weights = self.plan.weights
        return {
            "randomization": {
                "mode": self.mode,
                "seed": self.seed,
                "seed_rule": "torch.manual_seed(seed + 1) before each module's reset_parameters()",
                "target_layers": list(self.layers),
                "head": weights.names[0],
                "blocks": self.plan.step_names,
                "steps": weights.names,
                "kept": weights.kept,
            }
        }

    def measure(self, ctx: BatchContext, layers: Sequence[LayerMaps]) -> None:
        curves = randomization_curves(ctx.explain, ctx.x, ctx.result.targets, layers, self.plan.weights)
        for maps, curve in zip(layers, curves, strict=True):
            head = curve[:, 0].tolist()
            maps.put("randomization", [None if v != v else v for v in head])  # NaN: a constant original map
            if self.mode == "cascade" and self.outputs is not None:
                self._curve_files(ctx, maps, curve.float().cpu().numpy())

    def _curve_files(self, ctx: BatchContext, maps: LayerMaps, curves: np.ndarray) -> None:
        assert self.outputs is not None
        for k, (rel, cls) in enumerate(zip(maps.rels, maps.classes.tolist(), strict=True)):
            name = self.outputs.randomization_curve(rel, maps.name, int(cls))
            ctx.files.append((name, partial(encode_npy, curves[k])))
