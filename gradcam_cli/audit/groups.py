"""Groups of images for bias audits: which group each image is in, per attribute, and the per-group summary.

A groups source is either a CSV with a header `path,<attribute>...` (paths relative to the input folder, as in
predictions.csv; an image listed without a value for an attribute has no group for it) or `folders:N`, the N-th
folder of each image's relative path (N from 1; attribute `folderN`). An image with no group for an attribute
(not in the CSV, an empty cell, or fewer than N folders in its path) is counted under NO_GROUP: shown in the
summary, never silently dropped, but left out of the gaps (it is missing data, not a group).

The gap of a number between groups is max over groups of the group's mean minus the min over groups, over the
groups with at least `min_count` values of it (a group of one image makes any gap; the default is MIN_COUNT).
Accuracy is a mean too: of 1 (right) and 0 (wrong) over the group's images with known truth.

No torch here: `gradcam audit` and `report` read it.
"""

from __future__ import annotations

import csv
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcam_cli.audit.metrics import ACCURACY, MetricColumn
from gradcam_cli.audit.numbers import RowMeans, mean, rounded
from gradcam_cli.config import GROUP_FOLDERS_PATTERN
from gradcam_cli.config import GROUP_MIN_COUNT as MIN_COUNT
from gradcam_cli.errors import GradcamError

NO_GROUP = "(none)"  # the group of an image without a value for an attribute
NONE = "none"  # `--groups none`: no groups, even when run.json recorded some


@dataclass
class Groups:
    """Each image's group per attribute. `source` is what run.json records (a resolved CSV path or `folders:N`);
    `by_path` the CSV's table (a path without its extension matches too); `level` N of `folders:N`."""

    source: str
    attributes: tuple[str, ...]
    by_path: dict[str, dict[str, str]] = field(default_factory=dict)
    level: int | None = None

    def of(self, rel: str) -> dict[str, str]:
        """{attribute: group} of image `rel`; NO_GROUP where it has none."""
        if self.level is not None:
            folders = rel.split("/")[:-1]
            value = folders[self.level - 1] if len(folders) >= self.level else ""
            return {self.attributes[0]: value or NO_GROUP}
        found = self.by_path.get(rel)
        if found is None:
            found = self.by_path.get(posixpath.splitext(rel)[0], {})
        return {a: found.get(a) or NO_GROUP for a in self.attributes}

    def matched(self, rels: Iterable[str]) -> int:
        """How many of `rels` have a group for at least one attribute."""
        return sum(1 for rel in rels if any(v != NO_GROUP for v in self.of(rel).values()))


def groups_source(spec: str) -> str:
    """A `groups` setting as run.json records it: `folders:N` or `none` as they are, a file as an absolute path."""
    if GROUP_FOLDERS_PATTERN.match(spec) or spec == NONE:
        return spec
    return str(Path(spec).resolve())


def read_groups_csv(path: Path) -> tuple[tuple[str, ...], dict[str, dict[str, str]]]:
    """A `path,<attribute>...` CSV -> (attributes, {path: {attribute: value}}); the path without extension too."""
    flag = f"--groups {path}"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise GradcamError(f"{flag}: cannot read ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    if "path" not in header:
        raise GradcamError(f"{flag}: expected a header row path,<attribute>... (e.g. path,site,camera)")
    attributes = tuple(h for h in header if h and h != "path")
    if not attributes:
        raise GradcamError(f"{flag}: no attribute columns after path (e.g. path,site,camera)")
    if len(set(attributes)) != len(attributes):
        raise GradcamError(f"{flag}: an attribute column appears twice in the header")
    reader.fieldnames = header
    table: dict[str, dict[str, str]] = {}
    for line, row in enumerate(reader, start=2):
        rel = (row.get("path") or "").strip().replace("\\", "/")
        if not rel:
            raise GradcamError(f"{flag} line {line}: empty path")
        key = posixpath.normpath(rel.removeprefix("./"))
        values = {a: (row.get(a) or "").strip() for a in attributes}
        table[key] = values
        table.setdefault(posixpath.splitext(key)[0], values)
    return attributes, table


def resolve_groups(spec: str | None, rels: Sequence[str]) -> Groups | None:
    """A `groups` setting -> Groups over images `rels` (None for no setting or `none`).

    Raises GradcamError (exit 2) for a missing file, a CSV without `path` or attribute columns, and a CSV none
    of whose paths is an image of `rels`: each is a mistake that would make every group (none).
    """
    if spec is None or spec == NONE:
        return None
    folders = GROUP_FOLDERS_PATTERN.match(spec)
    if folders:
        level = int(folders.group(1))
        return Groups(source=spec, attributes=(f"folder{level}",), level=level)
    if spec.startswith("folders:"):
        raise GradcamError(f"--groups {spec}: expected folders:N with N a folder level from 1, or a CSV file")
    path = Path(spec)
    if not path.is_file():
        raise GradcamError(f"--groups {spec}: no such file (expected a CSV of path,<attribute>... or folders:N)")
    attributes, table = read_groups_csv(path)
    groups = Groups(source=str(path.resolve()), attributes=attributes, by_path=table)
    if rels and groups.matched(rels) == 0:
        raise GradcamError(
            f"--groups {spec}: none of its paths matches an image (paths are relative to the INPUT folder, "
            "as in predictions.csv)"
        )
    return groups


# ------------------------------------------------------------------------------------------------ the summary


@dataclass
class _Tally:
    """What one group collects: its images, right/wrong of those with truth, and its rows' means."""

    means: RowMeans
    images: int = 0
    judged: list[float] = field(default_factory=list)


def gap(means: Mapping[str, tuple[float | None, int]], min_count: int) -> dict[str, Any] | None:
    """The largest difference between two groups' means: {gap, low, high, groups}, or None with < 2 groups.

    `means` maps group -> (its mean, how many values it is over); NO_GROUP and groups with fewer than
    `min_count` values take no part. low/high name the groups with the smallest and largest mean (in order of
    mean, then name: a tie for the smallest goes to the first name, for the largest to the last, so they are
    two groups even when every mean is equal), so the gap is high's value minus low's (the means as
    summary.json writes them: the gap is exactly the difference of the two numbers shown), never negative.
    """
    eligible = sorted(
        (m, name) for name, (m, n) in means.items() if name != NO_GROUP and m is not None and n >= min_count
    )
    if len(eligible) < 2:
        return None
    (low, low_name), (high, high_name) = eligible[0], eligible[-1]
    return {
        "gap": rounded(high - low),
        "low": {"group": low_name, "value": low},
        "high": {"group": high_name, "value": high},
        "groups": len(eligible),
    }


def _tallies(
    attribute: str,
    groups: Groups,
    first: Mapping[str, Mapping[str, str]],
    ok_rows: Sequence[Mapping[str, str]],
    truth_of: Mapping[str, tuple[str, bool]],
    metric_cols: Sequence[MetricColumn],
) -> dict[str, _Tally]:
    """Per group of `attribute`: images counted once (first row), metric values and target probs over ok rows."""
    tallies: dict[str, _Tally] = {}

    def tally(rel: str) -> _Tally:
        name = groups.of(rel)[attribute]
        return tallies.setdefault(name, _Tally(RowMeans(metric_cols)))

    for rel in first:
        t = tally(rel)
        t.images += 1
        if rel in truth_of:
            t.judged.append(1.0 if truth_of[rel][1] else 0.0)
    for row in ok_rows:
        tally(row.get("path", "")).means.add(row)
    return tallies


def _attribute_block(
    tallies: Mapping[str, _Tally], metric_cols: Sequence[MetricColumn], truth_known: bool, min_count: int
) -> dict[str, Any]:
    """One attribute: a list of its groups (by name, NO_GROUP last) and per number the gap between groups."""
    entries = []
    for name in sorted(tallies, key=lambda g: (g == NO_GROUP, g.lower(), g)):
        t = tallies[name]
        entry: dict[str, Any] = {"group": name, "images": t.images}
        if truth_known:
            entry.update(truth_images=len(t.judged), accuracy=mean(t.judged))
        entry.update(t.means.entry())
        entries.append(entry)
    gaps: dict[str, Any] = {}
    if truth_known:
        gaps[ACCURACY] = gap({g: (mean(t.judged), len(t.judged)) for g, t in tallies.items()}, min_count)
    for c in metric_cols:
        values = {g: t.means.values[c.name] for g, t in tallies.items()}
        gaps[c.name] = gap({g: (mean(v), len(v)) for g, v in values.items()}, min_count)
    return {"groups": entries, "gaps": gaps}


def groups_summary(
    groups: Groups,
    first: Mapping[str, Mapping[str, str]],
    ok_rows: Sequence[Mapping[str, str]],
    truth_of: Mapping[str, tuple[str, bool]],
    metric_cols: Sequence[MetricColumn],
    truth_known: bool,
    min_count: int = MIN_COUNT,
) -> dict[str, Any]:
    """summary.json's `groups` block: per attribute its groups and gaps, and per number its largest gap over
    every attribute (`largest_gaps`, what a `gap:KEY` gate compares)."""
    attributes = {}
    for a in groups.attributes:
        tallies = _tallies(a, groups, first, ok_rows, truth_of, metric_cols)
        attributes[a] = _attribute_block(tallies, metric_cols, truth_known, min_count)
    largest: dict[str, Any] = {}
    for a, block in attributes.items():
        for key, found in block["gaps"].items():
            best = largest.get(key)
            if found is not None and (best is None or found["gap"] > best["gap"]):
                largest[key] = {"attribute": a, **found}
            largest.setdefault(key, None)
    return {
        "source": groups.source,
        "no_group": NO_GROUP,
        "min_count": min_count,
        "attributes": attributes,
        "largest_gaps": largest,
    }
