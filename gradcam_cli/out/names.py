"""Every name in OUT, and which files one CSV row of a run has.

For `photos/cats/tom.jpg` the outputs are `heatmaps/cats/tom.jpg.png`, `overlays/cats/tom.jpg.jpg`,
`npy/cats/tom.jpg.npy` and, for the guided methods, `guided/cats/tom.jpg.png` (+ `.npy`): the input's relative
path and extension are kept and ours added, so `a.jpg` and `a.png` never collide. An image with several maps
tells them apart by a suffix before the added extension: `__<layer>` with several layers, then
`__<class index>` with several targets (`tom.jpg__layer4__281.png`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

PREDICTIONS = "predictions.csv"
RUN_JSON = "run.json"
SUMMARY = "summary.json"
REPORT = "report.html"
DIFF_CSV, DIFF_JSON, DIFF_REPORT = "diff.csv", "diff.json", "diff.html"  # in the DIFF_OUT of `gradcam diff`
THUMBNAILS = "thumbnails"
LOCK = ".gradcam.lock"  # held by a running explain (see out.lock); gone when it exits
HEATMAPS, OVERLAYS, NPY, GUIDED = "heatmaps", "overlays", "npy", "guided"
RANDOMIZATION = "randomization"  # the per-map curves of `--randomization cascade`
RANK_CSV = re.compile(r"^predictions\.rank(\d+)\.csv$")
SAVE_KINDS: tuple[str, ...] = ("heatmap", "overlay", "npy")


def rank_csv(rank: int) -> str:
    """The CSV rank `rank` of a torchrun job appends to until rank 0 merges them into predictions.csv."""
    return f"predictions.rank{rank}.csv"


def output_name(folder: str, rel: str, suffix: str, ext: str) -> str:
    """`heatmaps` + `cats/tom.jpg` + `__281` + `png` -> `heatmaps/cats/tom.jpg__281.png`."""
    return f"{folder}/{rel}{suffix}.{ext}"


def npy_for(row: Mapping[str, str]) -> str:
    """The npy/ file of a CSV row, derived from its heatmap or overlay name ("" when it has neither); whether
    the run saved npy/ at all is for the caller to check."""
    for column, folder in (("heatmap", HEATMAPS), ("overlay", OVERLAYS)):
        name = row.get(column, "")
        if name.startswith(folder + "/"):
            stem = name[len(folder) + 1 :].rsplit(".", 1)[0]
            return f"{NPY}/{stem}.npy"
    return ""


@dataclass(frozen=True)
class RowFiles:
    """The outputs of one row, relative to OUT; "" for a kind this run does not write."""

    heatmap: str = ""
    overlay: str = ""
    npy: str = ""
    guided: str = ""
    guided_npy: str = ""

    def all(self) -> list[str]:
        """Every file the row has, in the order they are checked and written."""
        return [f for f in (self.guided, self.guided_npy, self.heatmap, self.overlay, self.npy) if f]


@dataclass(frozen=True)
class OutputNames:
    """Which files each row of a run gets: from `--save`, the maps' names, several targets, a guided method."""

    save: tuple[str, ...]
    maps: tuple[str, ...]  # the CSV `layer` values: the layers, one fused map, or `input`
    multi_target: bool
    guided: bool

    def suffix(self, layer: str, target: int) -> str:
        """What tells one image's maps apart in their file names: `__<layer>`, then `__<class index>`."""
        return (f"__{layer}" if len(self.maps) > 1 else "") + (f"__{target}" if self.multi_target else "")

    def randomization_curve(self, rel: str, layer: str, target: int) -> str:
        """The cascade curve of one map: `randomization/cats/tom.jpg__281.npy`, suffixed as its npy/ file."""
        return output_name(RANDOMIZATION, rel, self.suffix(layer, target), "npy")

    def for_row(self, rel: str, layer: str, target: int) -> RowFiles:
        suffix = self.suffix(layer, target)
        npy = "npy" in self.save
        return RowFiles(
            heatmap=output_name(HEATMAPS, rel, suffix, "png") if "heatmap" in self.save else "",
            overlay=output_name(OVERLAYS, rel, suffix, "jpg") if "overlay" in self.save else "",
            npy=output_name(NPY, rel, suffix, "npy") if npy else "",
            guided=output_name(GUIDED, rel, suffix, "png") if self.guided else "",
            guided_npy=output_name(GUIDED, rel, suffix, "npy") if self.guided and npy else "",
        )
