"""The explanation-quality metrics as one table: every `--metrics` name, the CSV columns it adds, which way is
better, the gate on it, its summary.json name. evaluate, summary, gates, config and report all read it.

No torch here: config validation and `gradcam audit` read it at start-up. The maths is in `measures`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MetricColumn:
    """One CSV column a metric adds.

    metric: the `--metrics` name that adds it; lower_is_better: which way is better (the worst images are the
    other end; its gate is `--fail-over` when lower is better, else `--fail-under`, on the summary's mean);
    gate: the gate's key; summary: its per-class key in summary.json; ranked: listed in summary.json's worst
    lists (not a 0/1 flag); annotated: needs --boxes/--masks; help: one line for docs and `--help`.
    """

    name: str
    metric: str
    lower_is_better: bool
    gate: str
    help: str
    summary: str = ""
    ranked: bool = True
    annotated: bool = False

    @property
    def summary_key(self) -> str:
        return self.summary or f"mean_{self.name}"


# in the order the columns are appended to predictions.csv (the order a user asks for them does not matter)
COLUMNS: tuple[MetricColumn, ...] = (
    MetricColumn(
        "deletion_auc",
        "deletion",
        True,
        "deletion",
        "area under the target probability as the most salient pixels are replaced by the baseline",
    ),
    MetricColumn(
        "insertion_auc",
        "insertion",
        False,
        "insertion",
        "area under the target probability as the most salient pixels are revealed on the baseline",
    ),
    MetricColumn(
        "avg_drop", "drop", True, "drop", "Average Drop %: how much the probability falls on the image x its map"
    ),
    MetricColumn(
        "increase",
        "drop",
        False,
        "increase",
        "Increase in Confidence: 1 when the image x its map scores higher than the image",
        ranked=False,
    ),
    MetricColumn(
        "pointing_hit",
        "pointing",
        False,
        "pointing",
        "pointing game: 1 when the map's peak is within 15 px of an annotated instance of the class",
        summary="pointing_hit_rate",
        annotated=True,
    ),
    MetricColumn(
        "energy_in_box",
        "energy",
        False,
        "energy",
        "energy-based pointing game: the share of the map inside the annotated region",
        annotated=True,
    ),
    MetricColumn(
        "randomization",
        "randomization",
        True,
        "randomization",
        "Spearman rank correlation of the map with the map once the layers after the target layer are "
        "re-initialised (Adebayo et al.): high means the map ignores what the model learned",
    ),
    MetricColumn(
        "random_logit",
        "random_logit",
        True,
        "random_logit",
        "SSIM of the map with the map of a random other class (Sixt et al.): high means it is not class-specific",
    ),
    MetricColumn(
        "max_sensitivity",
        "sensitivity",
        True,
        "sensitivity",
        "Max-Sensitivity (Yeh et al.): the largest relative change of the map under small uniform input noise",
    ),
    MetricColumn(
        "sparseness",
        "sparseness",
        False,
        "sparseness",
        "Gini index of the map (Chalasani et al.): 1 when one pixel holds all the evidence, 0 when it is flat",
    ),
    MetricColumn(
        "complexity",
        "complexity",
        True,
        "complexity",
        "entropy of the map taken as a distribution over pixels (Bhatt et al.): low means concentrated",
    ),
    MetricColumn(
        "road_morf",
        "road",
        True,
        "road_morf",
        "ROAD most-relevant-first (Rong et al.): mean change of the target probability when the top pixels are "
        "imputed away, over pytorch-grad-cam's percentiles",
    ),
    MetricColumn(
        "road_lerf",
        "road",
        False,
        "road_lerf",
        "ROAD least-relevant-first: mean change of the target probability when the least relevant pixels are "
        "imputed away",
    ),
    MetricColumn(
        "road_combined",
        "road",
        False,
        "road",
        "ROAD combined: (least-relevant-first - most-relevant-first) / 2, as pytorch-grad-cam's ROADCombined",
    ),
)
METRIC_NAMES: tuple[str, ...] = tuple(dict.fromkeys(c.metric for c in COLUMNS))
COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)  # in every predictions.csv, empty unless measured
ANNOTATED_METRICS: tuple[str, ...] = tuple(dict.fromkeys(c.metric for c in COLUMNS if c.annotated))
BY_COLUMN: dict[str, MetricColumn] = {c.name: c for c in COLUMNS}
BY_GATE: dict[str, MetricColumn] = {c.gate: c for c in COLUMNS}
ACCURACY = "accuracy"  # the one gate that is not on a metric: it needs ground truth
GATES_UNDER: tuple[str, ...] = (ACCURACY, *(c.gate for c in COLUMNS if not c.lower_is_better))
GATES_OVER: tuple[str, ...] = tuple(c.gate for c in COLUMNS if c.lower_is_better)
# gates on the largest gap between groups (--groups), always --fail-over: `gap:KEY` (over every attribute) or
# `gap:ATTRIBUTE:KEY`, KEY accuracy or any metric's gate key
GAP = "gap"
GAP_KEYS: tuple[str, ...] = (ACCURACY, *dict.fromkeys(c.gate for c in COLUMNS))
GATES_GAP: tuple[str, ...] = tuple(f"{GAP}:{k}" for k in GAP_KEYS)


def metric_columns(metrics: Iterable[str]) -> tuple[str, ...]:
    """The columns appended to predictions.csv for `metrics`, in table order whatever order they were asked in."""
    asked = set(metrics)
    return tuple(c.name for c in COLUMNS if c.metric in asked)


def columns_in(header: Iterable[str]) -> list[MetricColumn]:
    """The metric columns a predictions.csv header has, in table order."""
    present = set(header)
    return [c for c in COLUMNS if c.name in present]


def measured_header(header: Sequence[str], run: Mapping[str, Any]) -> list[str]:
    """The header without the metric columns the run did not measure (every run has them all, empty).

    What was measured is run.json's `audit.metrics`; a folder whose run.json does not say (an older version
    wrote only the asked-for columns) keeps its header as it is.
    """
    audit = run.get("audit")
    asked = audit.get("metrics") if isinstance(audit, Mapping) else None
    if not isinstance(asked, list):
        return list(header)
    return [name for name in header if name not in BY_COLUMN or BY_COLUMN[name].metric in asked]


def gap_gate(key: str) -> tuple[str | None, str] | None:
    """`gap:KEY` -> (None, KEY), `gap:ATTRIBUTE:KEY` -> (ATTRIBUTE, KEY); None when `key` is no gap gate."""
    parts = key.split(":")
    if parts[0] != GAP or len(parts) not in (2, 3) or parts[-1] not in GAP_KEYS or not parts[1].strip():
        return None
    return (parts[1].strip() if len(parts) == 3 else None, parts[-1])


def gap_column(key: str) -> str:
    """The summary name a gap gate's KEY compares: `accuracy`, or the metric column of that gate key."""
    return ACCURACY if key == ACCURACY else BY_GATE[key].name


def gate_hint(key: str) -> str:
    """What a run needs for gate `key` to be measurable: `--metrics X` (with --boxes/--masks)."""
    column = BY_GATE[key]
    return f"--metrics {column.metric}" + (" with --boxes/--masks" if column.annotated else "")
