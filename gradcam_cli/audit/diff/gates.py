"""The gates of `gradcam diff` (and of `explain --compare-to`): which keys there are and the number each reads.

`--fail-under spearman=0.8` / `ssim=...` / `iou=...` (higher is better) and `--fail-over flips=2%` /
`shift=0.1` (lower is better). A similarity key may name its statistic, `STAT:KEY` with STAT one of
`mean` (the default), `median`, `p10` or `p90` (`p10:spearman=0.5`: nine pairs in ten at least 0.5).
`flips` is the share of images whose top-1 class changed; `shift` the peak shift as a fraction of the
image diagonal. No torch, no config: config validates these keys at start-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SIMILARITIES_UNDER: tuple[str, ...] = ("spearman", "ssim", "iou")
SIMILARITIES_OVER: tuple[str, ...] = ("shift",)
STATS: tuple[str, ...] = ("mean", "median", "p10", "p90")
FLIPS = "flips"
# `shift` reads the summary's `peak_shift` (a fraction of the diagonal)
SUMMARY_KEY = {"spearman": "spearman", "ssim": "ssim", "iou": "iou", "shift": "peak_shift"}


def _with_stats(keys: tuple[str, ...]) -> tuple[str, ...]:
    return keys + tuple(f"{stat}:{key}" for key in keys for stat in STATS)


DIFF_GATES_UNDER: tuple[str, ...] = _with_stats(SIMILARITIES_UNDER)
DIFF_GATES_OVER: tuple[str, ...] = (FLIPS, *_with_stats(SIMILARITIES_OVER))
DIFF_GATE_KEYS: frozenset[str] = frozenset(DIFF_GATES_UNDER + DIFF_GATES_OVER)


def diff_gate_value(summary: Mapping[str, Any], key: str) -> float | None:
    """The diff.json number a gate compares (None when nothing was measured: the gate then fails)."""
    if key == FLIPS:
        return summary["flips"]["rate"]
    stat, _, name = key.rpartition(":")
    return summary["similarity"][SUMMARY_KEY[name]].get(stat or "mean")
