"""CI gates: `--fail-under KEY=V` (higher is better) and `--fail-over KEY=V` (lower is better) on a summary.

KEY is `accuracy` or a metric's gate key (`metrics.COLUMNS`), compared on the summary's mean of that column
(the pointing game: its hit rate). A gate on a metric the folder has no column for, or on accuracy without
ground truth, is a usage error (exit 2); a gate whose column has no values (no annotated image of an
explained class, say) fails: a gate that cannot be measured must not pass.

`--fail-over gap:KEY=V` compares the largest gap between groups (summary.json's `groups.largest_gaps`, over
every attribute; `gap:ATTRIBUTE:KEY` that attribute's) of accuracy or a metric's mean: one group's mean minus
another's (see `audit.groups`). Without groups it is a usage error; without two groups to compare it fails.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradcam_cli.audit.metrics import ACCURACY, BY_GATE, gap_column, gap_gate, gate_hint
from gradcam_cli.audit.numbers import rounded
from gradcam_cli.errors import GradcamError


@dataclass(frozen=True)
class Gate:
    """One CI gate: `key` compared with `threshold`; op `>=` (fail under) or `<=` (fail over)."""

    key: str
    op: str
    threshold: float

    @property
    def flag(self) -> str:
        return f"--fail-{'under' if self.op == '>=' else 'over'} {self.key}={self.threshold:g}"


@dataclass
class GateResult:
    gate: Gate
    value: float | None
    passed: bool
    detail: str = ""  # where the value comes from, when the key alone does not say (a gap: which groups)

    @property
    def margin(self) -> float | None:
        """How far inside (positive) or outside (negative) the limit the value is."""
        if self.value is None:
            return None
        return self.value - self.gate.threshold if self.gate.op == ">=" else self.gate.threshold - self.value

    def message(self) -> str:
        g = self.gate
        detail = f" {self.detail}" if self.detail else ""
        if self.value is None:
            return f"gate failed: {g.key} has no values to check{detail} ({g.flag})"
        if self.passed:
            return f"gate passed: {g.key} = {self.value:.4f}{detail} ({g.flag})"
        side = "below the minimum" if g.op == ">=" else "above the maximum"
        return (
            f"gate failed: {g.key} = {self.value:.4f}{detail}, {side} {g.threshold:g} by {abs(self.margin or 0):.4f} "
            f"({g.flag})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate.flag,
            "key": self.gate.key,
            "op": self.gate.op,
            "threshold": self.gate.threshold,
            "value": rounded(self.value),
            "passed": self.passed,
            "margin": rounded(self.margin),
            **({"detail": self.detail} if self.detail else {}),
        }


def gates_from(fail_under: Iterable[tuple[str, float]], fail_over: Iterable[tuple[str, float]]) -> list[Gate]:
    """Validated (key, value) pairs (Settings.fail_under/fail_over) -> gates, under first."""
    return [Gate(k, ">=", v) for k, v in fail_under] + [Gate(k, "<=", v) for k, v in fail_over]


def gate_value(summary: Mapping[str, Any], key: str) -> float | None:
    """The summary number a gate compares: accuracy, pointing hit rate, or the mean of a metric column."""
    if key == ACCURACY:
        return summary["ground_truth"].get("accuracy")
    if key == "pointing":
        return (summary.get("pointing") or {}).get("hit_rate")
    stats = summary["metrics"].get(BY_GATE[key].name) or {}
    return stats.get("mean")


def gap_value(summary: Mapping[str, Any], key: str) -> tuple[float | None, str]:
    """A gap gate's value and which groups it lies between ("(site: b 0.3333 .. a 1.0000)")."""
    parsed = gap_gate(key)
    assert parsed is not None
    attribute, inner = parsed
    block = summary["groups"]
    column = gap_column(inner)
    if attribute is None:
        found = block["largest_gaps"].get(column)
        attribute = found["attribute"] if found else None
    else:
        attribute = next(a for a in block["attributes"] if a.lower() == attribute.lower())
        found = block["attributes"][attribute]["gaps"].get(column)
    if not found:
        return None, f"(fewer than 2 groups with {block['min_count']}+ values of {column})"
    low, high = found["low"], found["high"]
    return found["gap"], f"({attribute}: {low['group']} {low['value']:.4f} .. {high['group']} {high['value']:.4f})"


def _check_measurable(summary: Mapping[str, Any], header: Sequence[str], gate: Gate) -> None:
    """Raise (exit 2) for a gate the folder cannot answer: no column, no ground truth, no groups."""
    parsed = gap_gate(gate.key)
    key = parsed[1] if parsed else gate.key
    if parsed:
        block = summary.get("groups")
        if not block:
            raise GradcamError(f"{gate.flag}: no groups to compare (pass --groups FILE or --groups folders:N)")
        attribute = parsed[0]
        if attribute is not None and attribute.lower() not in {a.lower() for a in block["attributes"]}:
            raise GradcamError(
                f"{gate.flag}: no attribute '{attribute}' in --groups (it has {', '.join(block['attributes'])})"
            )
    if key != ACCURACY and BY_GATE[key].name not in header:
        raise GradcamError(
            f"{gate.flag}: predictions.csv has no {BY_GATE[key].name} column (run explain with {gate_hint(key)})"
        )
    if key == ACCURACY and not summary["ground_truth"].get("source"):
        raise GradcamError(
            f"{gate.flag}: no ground truth (a labels.csv of path,label in the input folder, --truth folders "
            "or --truth FILE)"
        )


def check_gates(summary: Mapping[str, Any], header: Sequence[str], gates: Sequence[Gate]) -> list[GateResult]:
    """Evaluate gates; a gate on a column the folder does not have (or accuracy without truth, or a gap without
    groups) raises (exit 2)."""
    results = []
    for gate in gates:
        _check_measurable(summary, header, gate)
        value, detail = gap_value(summary, gate.key) if gap_gate(gate.key) else (gate_value(summary, gate.key), "")
        passed = value is not None and (value >= gate.threshold if gate.op == ">=" else value <= gate.threshold)
        results.append(GateResult(gate, value, passed, detail))
    return results
