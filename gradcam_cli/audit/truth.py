"""Ground truth: each image's true class, for `--target label`, the CSV's true_* columns and the summary.

`truth` is `auto` (default: a `labels.csv` of `path,label`, paths relative to that folder, found in an input
folder; else the images' parent-folder names when at least half of those folders name one of the model's
classes, the ImageFolder layout), `folders` (the folder names, always), `none`, or a CSV file of
`path,label`. A label is a class name, index, WordNet id or lemma list (see `model.labels.LabelResolver`);
a label that names no class leaves only its own image without truth. No torch here: `gradcam audit` reads it.
"""

from __future__ import annotations

import csv
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gradcam_cli.errors import GradcamError
from gradcam_cli.model.labels import LabelResolver


@dataclass
class Truth:
    """Ground-truth labels by image path; `source` says where they came from (None: not known, and `reason` why)."""

    source: str | None = None
    by_path: dict[str, str] = field(default_factory=dict)
    folders: bool = False
    reason: str = ""

    @property
    def known(self) -> bool:
        return self.source is not None

    def label_for(self, rel: str) -> str | None:
        if self.folders:
            parent = posixpath.basename(posixpath.dirname(rel))
            return parent or None
        found = self.by_path.get(rel)
        if found is None:
            found = self.by_path.get(posixpath.splitext(rel)[0])
        return found


def read_truth_csv(path: Path) -> dict[str, str]:
    """`path,label` CSV (header required) -> {path: label}; the path without its extension matches too."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise GradcamError(f"--truth {path}: cannot read ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if "path" not in header or "label" not in header:
        raise GradcamError(f"--truth {path}: expected a header row with columns path,label")
    reader.fieldnames = header
    table: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel or not label:
            raise GradcamError(f"--truth {path} line {line}: empty path or label")
        key = posixpath.normpath(rel.replace("\\", "/"))
        table[key] = label
        table.setdefault(posixpath.splitext(key)[0], label)
    return table


def resolve_truth(spec: str, input_roots: Sequence[str], labels: Sequence[str], rels: Iterable[str] = ()) -> Truth:
    """`truth` setting -> Truth. See the module docstring for `auto`; `rels` are the image paths (for `auto`)."""
    if spec == "none":
        return Truth(reason="--truth none")
    if spec == "folders":
        return Truth(source="folders", folders=True)
    if spec != "auto":
        path = Path(spec)
        if not path.is_file():
            raise GradcamError(f"--truth {spec}: not auto, folders, none or an existing CSV file of path,label")
        return Truth(source=str(path), by_path=read_truth_csv(path))
    for root in input_roots:
        candidate = Path(root) / "labels.csv"
        if Path(root).is_dir() and candidate.is_file():
            return Truth(source=str(candidate), by_path=read_truth_csv(candidate))
    return _folder_truth(list(rels), labels, input_roots)


def _folder_truth(rels: Sequence[str], labels: Sequence[str], input_roots: Sequence[str]) -> Truth:
    """`auto` without a labels.csv: the parent-folder names, when at least half of those folders name a class.

    Half, not all: one folder that is no class (a stray `misc/`, a spelling this model does not use) must not
    take the truth of every other image away; its images alone stay without truth (and say why).
    """
    where = ", ".join(str(r) for r in input_roots) or "the inputs"
    if not rels:
        return Truth(reason="no images")
    parents = sorted({posixpath.basename(posixpath.dirname(rel)) for rel in rels})
    if parents == [""]:
        return Truth(reason=f"no labels.csv in {where} and the images are not in class-named folders")
    if not labels:
        return Truth(reason="the model has no class names to match folder names against (config key 'labels')")
    resolver = LabelResolver(labels)
    named = [p for p in parents if p and not p.isdigit() and resolver.find(p) is not None]
    if named and 2 * len(named) >= len(parents):
        return Truth(source="folders", folders=True)
    kinds = "a class name or WordNet id" if resolver.knows_wordnet else "a class name"
    shown = ", ".join(repr(p) for p in parents[:3]) + (", ..." if len(parents) > 3 else "")
    if not named:
        reason = f"no labels.csv in {where}; {len(parents)} folder(s) ({shown}), none is {kinds} of this model"
    else:
        reason = (
            f"no labels.csv in {where}; only {len(named)} of {len(parents)} folders ({shown}) are {kinds} of this "
            "model (--truth folders uses them anyway)"
        )
    return Truth(reason=reason)


@dataclass(frozen=True)
class ImageTruth:
    """Each image's true class index (None: unknown, and why) for one run; `source` as in run.json."""

    source: str
    index: dict[str, int | None]
    why: dict[str, str]

    def known(self) -> int:
        return sum(i is not None for i in self.index.values())


def image_truth(
    truth_setting: str,
    roots: Sequence[str],
    labels: Sequence[str],
    rels: Sequence[str],
    needs_truth: bool,
    log: Callable[[str], None],
) -> ImageTruth | None:
    """Each image's true class index from the `truth` setting, as `gradcam audit` reads it; None when unknown.

    `--target label` (`needs_truth`) requires it: with `truth: auto` and no labels.csv in an input folder, the
    parent folder names are used (ImageFolder layout), and an image whose label is not a class gets a reason
    (its row is an error). Only `truth: auto` without `--target label` lets a run go on when the labels.csv it
    found cannot be read (the columns stay empty; a message says why).
    """
    if needs_truth and truth_setting == "none":
        raise GradcamError("--target label: needs ground truth, but --truth is none")
    try:
        truth = resolve_truth(truth_setting, roots, labels, rels)
    except GradcamError as exc:
        if truth_setting != "auto" or needs_truth:
            raise
        log(f"ground truth not used (true_index, true_label, correct stay empty): {exc}")
        return None
    if not truth.known and needs_truth:
        truth = resolve_truth("folders", roots, labels, rels)
    if not truth.known:
        if truth_setting == "auto":
            log(f"no ground truth (true_index, true_label, correct stay empty): {truth.reason}")
        return None
    resolver = LabelResolver(labels)
    index: dict[str, int | None] = {}
    why: dict[str, str] = {}
    for rel in rels:
        label = truth.label_for(rel)
        found = resolver.resolve_optional(label) if label else None
        index[rel] = found if found is not None and found >= 0 else None
        if label is None:
            why[rel] = f"no ground-truth label for it in {truth.source}"
        elif index[rel] is None:
            why[rel] = f"ground-truth label '{label}' is not one of the model's classes"
    if needs_truth and not any(i is not None for i in index.values()):
        first = next(w for w in why.values() if w)
        raise GradcamError(f"--target label: no image has a ground-truth class ({truth.source}: {first})")
    assert truth.source is not None
    return ImageTruth(truth.source, index, why)
