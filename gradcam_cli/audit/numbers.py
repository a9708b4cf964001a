"""How the audit reads and writes numbers: a CSV cell as a float, summary.json's rounding, and the means of a set
of rows (a class, a group) that per_class and groups both report. No torch."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradcam_cli.audit.metrics import MetricColumn


def number(text: str | None) -> float | None:
    """A CSV cell as a finite float, or None (empty, not a number, or not finite)."""
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def rounded(value: float | None, digits: int = 6) -> float | None:
    """How summary.json writes a number."""
    return None if value is None else round(value, digits)


def mean(values: Sequence[float]) -> float | None:
    """The rounded mean, or None for no values."""
    return rounded(statistics.fmean(values)) if values else None


@dataclass
class RowMeans:
    """The target probabilities and metric values of a set of `ok` rows, collected for their means."""

    columns: Sequence[MetricColumn]
    probs: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = {c.name: [] for c in self.columns}

    def add(self, row: Mapping[str, str]) -> None:
        if (p := number(row.get("target_prob"))) is not None:
            self.probs.append(p)
        for c in self.columns:
            if (v := number(row.get(c.name))) is not None:
                self.values[c.name].append(v)

    def entry(self) -> dict[str, Any]:
        """`mean_target_prob`, then per metric column its mean (under its summary key) and `count_<column>`."""
        out: dict[str, Any] = {"mean_target_prob": mean(self.probs)}
        for c in self.columns:
            out[c.summary_key] = mean(self.values[c.name])
            out[f"count_{c.name}"] = len(self.values[c.name])
        return out
