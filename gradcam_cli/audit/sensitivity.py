"""Max-Sensitivity: how much a map changes when the input is nudged by a little uniform noise.

Yeh et al., "On the (In)fidelity and Sensitivity of Explanations", NeurIPS 2019; Quantus `MaxSensitivity`.
For an image x (in [0, 1] pixel units) and the map m(x) of a fixed target class, with N = --sensitivity-samples
and r = --sensitivity-radius:

    u_s ~ U[-r, r] independently per pixel and channel, s = 1..N
    max_sensitivity = max_s ||m(x + u_s) - m(x)||_F / ||m(x)||_F

Lower is better: a map that moves a lot under noise the eye cannot see explains the noise as much as the image.
Details that change the number, and why they are what they are:

- m is the map users see, at the model-input size, min-max normalised to [0, 1] (`LayerMaps.saliency`,
  `measures.input_maps` for the noisy maps), so that the ratio is free of the CAM's arbitrary scale. Dividing
  by ||m(x)||_F (Quantus' default `norm_denominator`, where Yeh et al. leave the change unscaled) makes the value
  a relative change of the map, comparable across images and models.
- The noise is drawn in pixel units and mapped into the model's normalised space: the model sees
  x_norm + u_s / std, per channel (normalisation is affine per channel, so this is exactly (x + u_s - mean) / std).
- Noisy pixels are not clipped to [0, 1], as in Yeh et al.'s ball and Quantus' default perturbation
  (`batch_uniform_noise`, which does not clip): so every pixel gets the same noise distribution, whatever the
  image's exposure. Clipping would shrink the perturbation of saturated pixels and make the value depend on how
  many there are.
- The target classes are those of the unperturbed image (`CamResult.targets`), fixed: the metric measures the
  map of one class, not a prediction that flips under noise.
- The noise of an image comes from its own generator on the CPU, seeded with the 8-byte blake2b digest of
  "<--seed>:<image path>" (little-endian, top bit cleared): the same image gets the same draws whatever the
  batch size, the order of the files, the rank or the compute device.
- An all-zero map (a constant CAM, `input_maps`) has no relative change: its cell is left empty.

Cost: N extra forward + backward passes of the batch through the engine (the run's method, with its hooks), so
about N times the explanation itself, whatever that costs: a method that makes passes of its own (Score-CAM's
masked forwards) makes them N more times.
Memory stays flat in N: only the running maximum per map is kept, never the N noisy maps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gradcam_cli.audit import measures as M
from gradcam_cli.audit.batch_maps import BatchContext, LayerMaps, MetricPass, PassSetup
from gradcam_cli.cam.engine import CamResult

SEED_RULE = "a torch CPU generator per image, seeded with blake2b('<seed>:<path>', 8 bytes), little-endian, top bit 0"


def image_seed(seed: int, rel: str) -> int:
    """The noise seed of the image at path `rel`: stable across runs, batch sizes and processes (not `hash`)."""
    digest = hashlib.blake2b(f"{seed}:{rel}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def noise_generators(seed: int, rels: Sequence[str]) -> list[torch.Generator]:
    """One CPU generator per image of a batch, in batch order."""
    return [torch.Generator().manual_seed(image_seed(seed, rel)) for rel in rels]


def draw_noise(generators: Sequence[torch.Generator], shape: tuple[int, int, int], radius: float) -> Tensor:
    """(B, *shape) noise U[-radius, radius] in pixel units, image b from generators[b] (its next draw).

    Drawn on the CPU, image by image, so that an image's draws do not depend on its batch or the device.
    """
    return torch.stack([(torch.rand(shape, generator=g) * 2.0 - 1.0) * radius for g in generators])


def relative_change(noisy: Tensor, reference: Tensor, reference_norm: Tensor) -> Tensor:
    """(m, h, w) maps against (m, h, w) reference maps with their (m,) Frobenius norms -> (m,)
    ||noisy - reference||_F / ||reference||_F, in float64 (NaN where the reference norm is 0)."""
    diff = torch.linalg.vector_norm((noisy.double() - reference.double()).flatten(1), dim=1)
    return diff / torch.where(reference_norm > 0, reference_norm, torch.full_like(reference_norm, torch.nan))


class SensitivityPass(MetricPass):
    metrics = ("sensitivity",)

    def __init__(self, setup: PassSetup) -> None:
        super().__init__(setup)
        settings = setup.settings
        self.samples = settings.sensitivity_samples
        self.radius = settings.sensitivity_radius
        self.seed = settings.seed
        self.std = torch.tensor(setup.loaded.spec.std, dtype=torch.float32, device=setup.device).view(1, 3, 1, 1)

    def manifest(self) -> dict[str, Any]:
        return {
            "sensitivity": {
                "samples": self.samples,
                "radius": self.radius,
                "noise": "uniform in [-radius, radius] per pixel and channel, in [0, 1] pixel units, not clipped",
                "seed": SEED_RULE,
            }
        }

    def measure(self, ctx: BatchContext, layers: Sequence[LayerMaps]) -> None:
        """N re-explanations of the whole batch on noisy inputs, each map's running maximum of the relative
        change (`relative_change`), written as `max_sensitivity` (empty for an all-zero map)."""
        generators = noise_generators(self.seed, ctx.batch.rels)
        norms = [torch.linalg.vector_norm(maps.saliency.double().flatten(1), dim=1) for maps in layers]
        worst = [torch.zeros_like(n) for n in norms]
        shape = (int(ctx.x.shape[1]), int(ctx.x.shape[2]), int(ctx.x.shape[3]))
        for _ in range(self.samples):
            noise = draw_noise(generators, shape, self.radius).to(ctx.x.device)
            noisy_x = ctx.x + (noise / self.std).to(ctx.x.dtype)
            result = ctx.explain(noisy_x, ctx.result.targets)
            for k, maps in enumerate(layers):
                worst[k] = torch.fmax(worst[k], relative_change(self._maps(maps, result), maps.saliency, norms[k]))
        for maps, norm, value in zip(layers, norms, worst, strict=True):
            cells = zip(value.tolist(), norm.tolist(), strict=True)
            maps.put("max_sensitivity", [v if n > 0 else None for v, n in cells])

    @staticmethod
    def _maps(maps: LayerMaps, result: CamResult) -> Tensor:
        """The set's maps in a re-explained result, as `LayerMaps.saliency` makes them: (m, h, w) in [0, 1]."""
        return M.input_maps(maps.pick(result), maps.input_size)
