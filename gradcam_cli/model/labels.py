"""Class names: from torchvision's weights, a labels file, or ImageNet's for 1000-class heads; and how a label
written by a person or a dataset (a folder name, a CSV cell) is matched to a class.

ImageNet-1k datasets name their classes in three ways: torchvision's short names (`tabby`), WordNet ids
(`n02123045`, the ILSVRC folder layout) and WordNet lemma lists (`tabby, tabby cat`). `imagenet_wordnet.tsv`
holds the id and the lemmas of each of the 1000 classes in class-index order (from the ILSVRC-2012 synset list),
so all three resolve for a model whose class names are ImageNet's.

No torch at import time (`imagenet_labels` imports torchvision when called).
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Sequence
from pathlib import Path

from gradcam_cli.errors import GradcamError

ANY_CLASS = -1  # the `*` label of annotations: whatever class is explained
# a model is taken for an ImageNet-1k classifier when this many of its 1000 names are ImageNet's (by first
# lemma): torchvision, timm and Hugging Face spell a few classes differently (`crane bird`, `maillot tank suit`)
IMAGENET_MATCH = 990


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names from torchvision's weights metadata (shipped in the wheel, no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


@functools.lru_cache(maxsize=1)
def imagenet_wordnet() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The 1000 ImageNet-1k classes in index order as (WordNet id, lemmas): ('n02123045', ('tabby', 'tabby cat'))."""
    text = (Path(__file__).with_name("imagenet_wordnet.tsv")).read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        wnid, _, lemmas = line.partition("\t")
        rows.append((wnid, tuple(part.strip() for part in lemmas.split(",") if part.strip())))
    return tuple(rows)


def is_imagenet(labels: Sequence[str]) -> bool:
    """Whether these class names are ImageNet-1k's, in its order (compared by each name's first lemma)."""
    if len(labels) != 1000:
        return False
    same = sum(
        _first_lemma(name) == normalized_label(lemmas[0])
        for name, (_, lemmas) in zip(labels, imagenet_wordnet(), strict=True)
        if lemmas
    )
    return same >= IMAGENET_MATCH


def _first_lemma(name: str) -> str:
    return normalized_label(name.split(",")[0])


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
    """A label (index, name, or `*`) -> class index, against the model's class names.

    Names compare case-insensitively with `_` as a space (`tiger_cat` is `tiger cat`). A comma-separated
    WordNet lemma list (`tabby, tabby cat`) matches by its first lemma, on either side. For an ImageNet-1k
    model, WordNet ids (`n02123045`) and the first lemma of each class match too; the model's own names win.
    Later lemmas are not matched: among them are common words (`sub` is a submarine) that would turn an
    ordinary folder name into a class.
    """

    def __init__(self, labels: Sequence[str]) -> None:
        self.count = len(labels)
        self.by_name: dict[str, int] = {}
        for i, name in enumerate(labels):
            self.by_name.setdefault(normalized_label(name), i)
        for i, name in enumerate(labels):
            self.by_name.setdefault(_first_lemma(name), i)
        self.aliases: dict[str, int] = {}
        if is_imagenet(labels):
            for i, (wnid, lemmas) in enumerate(imagenet_wordnet()):
                self.aliases[wnid] = i
                if lemmas:
                    self.aliases.setdefault(normalized_label(lemmas[0]), i)

    def __call__(self, label: str, where: str) -> int:
        text = label.strip()
        if text == "*":
            return ANY_CLASS
        if text.isdigit():
            index = int(text)
            if self.count and index >= self.count:
                raise GradcamError(f"{where}: class index {index} is out of range (the model has {self.count})")
            return index
        found = self.find(text)
        if found is None:
            near = difflib.get_close_matches(normalized_label(text), list(self.by_name), n=3)
            hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise GradcamError(f"{where}: label '{text}' is not one of the model's classes{hint}")
        return found

    def find(self, text: str) -> int | None:
        """The class a name, WordNet id or lemma list names, or None (indexes are not names here)."""
        key = normalized_label(text)
        for candidate in (key, _first_lemma(text)):
            found = self.by_name.get(candidate)
            if found is None:
                found = self.aliases.get(candidate)
            if found is not None:
                return found
        return None

    @property
    def knows_wordnet(self) -> bool:
        """Whether WordNet ids resolve (the model is an ImageNet-1k classifier)."""
        return bool(self.aliases)

    def resolve_optional(self, label: str) -> int | None:
        try:
            return self(label, "")
        except GradcamError:
            return None


def normalized_label(name: str) -> str:
    """How labels are compared: case-insensitive, `_` as a space, runs of spaces as one."""
    return " ".join(name.replace("_", " ").lower().split())
