"""Class names: from torchvision's weights, a labels file, or ImageNet's for 1000-class heads.

No torch at import time (`imagenet_labels` imports torchvision when called).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path

from gradcam_cli.errors import GradcamError

ANY_CLASS = -1  # the `*` label of annotations: whatever class is explained


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names from torchvision's weights metadata (shipped in the wheel, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def read_labels(path: str | Path) -> list[str]:
    """One name per line, or a JSON list (or {"0": name, ...} mapping)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GradcamError(f"config key 'labels': cannot read {p}: {exc}") from None
    if p.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GradcamError(f"config key 'labels': {p} is not valid JSON ({exc.msg})") from None
        if isinstance(data, list) and all(isinstance(x, str) for x in data):
            return data
        if isinstance(data, dict):
            try:
                return [str(data[k]) for k in sorted(data, key=lambda k: int(k))]
            except ValueError:
                pass
        raise GradcamError(f"config key 'labels': {p} must hold a JSON list of names or an index->name mapping")
    return [line.strip() for line in text.splitlines() if line.strip()]


def label_of(labels: Sequence[str], index: int) -> str:
    """The class name, or the index as text when the model has more classes than names."""
    return labels[index] if 0 <= index < len(labels) else str(index)


class LabelResolver:
    """A label (index, name, or `*`) -> class index, against the model's class names; case-insensitive names,
    and `_` matches a space (`tiger_cat` is `tiger cat`)."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.count = len(labels)
        self.by_name: dict[str, int] = {}
        for i, name in enumerate(labels):
            self.by_name.setdefault(normalized_label(name), i)

    def __call__(self, label: str, where: str) -> int:
        text = label.strip()
        if text == "*":
            return ANY_CLASS
        if text.isdigit():
            index = int(text)
            if self.count and index >= self.count:
                raise GradcamError(f"{where}: class index {index} is out of range (the model has {self.count})")
            return index
        found = self.by_name.get(normalized_label(text))
        if found is None:
            near = difflib.get_close_matches(normalized_label(text), list(self.by_name), n=3)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise GradcamError(f"{where}: label '{text}' is not one of the model's classes{hint}")
        return found

    def resolve_optional(self, label: str) -> int | None:
        try:
            return self(label, "")
        except GradcamError:
            return None


def normalized_label(name: str) -> str:
    """How labels are compared: case-insensitive, `_` as a space, runs of spaces as one."""
    return " ".join(name.replace("_", " ").lower().split())
