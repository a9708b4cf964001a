"""Which classes each image's maps explain: `--target pred | label | topk:K | INDEX | NAME`, as a (B, T) tensor.

All slots of a batch come from one forward (the logits) and one batched backward; `pred` and `topk:K` may
name the same class twice, which the renderer writes once.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
from torch import Tensor

from gradcam_cli.errors import GradcamError


class TargetSelector:
    """The `targets` settings, resolved against the model's class names once; called per batch on its logits."""

    def __init__(self, targets: Sequence[str], labels: Sequence[str]) -> None:
        self.items: list[tuple[str, int]] = []
        lowered = {name.lower(): i for i, name in enumerate(labels)}
        for item in targets:
            if item == "pred":
                self.items.append(("pred", 1))
            elif item == "label":
                self.items.append(("label", 1))
            elif item.startswith("topk:"):
                self.items.append(("topk", int(item.split(":")[1])))
            elif item.isdigit():
                self.items.append(("index", int(item)))
            elif item.lower() in lowered:
                self.items.append(("index", lowered[item.lower()]))
            else:
                near = difflib.get_close_matches(item, list(labels), n=3)
                hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
                raise GradcamError(
                    f"--target '{item}': not 'pred', 'label', 'topk:K', a class index or a class name{hint}"
                )
        self.slots = sum(k if kind == "topk" else 1 for kind, k in self.items)
        self.uses_label = any(kind == "label" for kind, _ in self.items)

    def __call__(self, logits: Tensor, truth: Tensor | None = None) -> Tensor:
        """(B, T) classes; `truth` (B,) is each image's true class for `label` slots (-1, or None: unknown, so
        the prediction stands in; such images become error rows)."""
        n, classes = logits.shape
        cols = []
        for kind, k in self.items:
            if kind == "pred":
                cols.append(logits.argmax(dim=1, keepdim=True))
            elif kind == "label":
                pred = logits.argmax(dim=1, keepdim=True)
                known = truth.view(-1, 1).to(logits.device) if truth is not None else torch.full_like(pred, -1)
                if bool((known >= classes).any()):
                    raise GradcamError(f"--target label: a true class index is >= the model's {classes} classes")
                cols.append(torch.where(known >= 0, known, pred))
            elif kind == "topk":
                if k > classes:
                    raise GradcamError(f"--target topk:{k}: the model has only {classes} classes")
                cols.append(logits.topk(k, dim=1).indices)
            else:
                if k >= classes:
                    raise GradcamError(f"--target {k}: the model has only {classes} classes (0..{classes - 1})")
                cols.append(torch.full((n, 1), k, dtype=torch.long, device=logits.device))
        return torch.cat(cols, dim=1)
