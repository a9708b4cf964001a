"""CI gates: `--fail-under KEY=V` (higher is better) and `--fail-over KEY=V` (lower is better) on a summary.

KEY is `accuracy` or a metric's gate key (`metrics.COLUMNS`), compared on the summary's mean of that column
(the pointing game: its hit rate). A gate on a metric the folder has no column for, or on accuracy without
ground truth, is a usage error (exit 2); a gate whose column has no values (no annotated image of an
explained class, say) fails: a gate that cannot be measured must not pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradcam_cli.audit.metrics import ACCURACY, BY_GATE, gate_hint
from gradcam_cli.errors import GradcamError


def rounded(value: float | None, digits: int = 6) -> float | None:
    """How summary.json writes a number."""
    return None if value is None else round(value, digits)


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

    @property
    def margin(self) -> float | None:
        """How far inside (positive) or outside (negative) the limit the value is."""
        if self.value is None:
            return None
        return self.value - self.gate.threshold if self.gate.op == ">=" else self.gate.threshold - self.value

    def message(self) -> str:
        g = self.gate
        if self.value is None:
            return f"gate failed: {g.key} has no values to check ({g.flag})"
        if self.passed:
            return f"gate passed: {g.key} = {self.value:.4f} ({g.flag})"
        side = "below the minimum" if g.op == ">=" else "above the maximum"
        return (
            f"gate failed: {g.key} = {self.value:.4f}, {side} {g.threshold:g} by {abs(self.margin or 0):.4f} ({g.flag})"
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


def check_gates(summary: Mapping[str, Any], header: Sequence[str], gates: Sequence[Gate]) -> list[GateResult]:
    """Evaluate gates; a gate on a column the folder does not have (or accuracy without truth) raises (exit 2)."""
    results = []
    for gate in gates:
        if gate.key != ACCURACY and BY_GATE[gate.key].name not in header:
            raise GradcamError(
                f"{gate.flag}: predictions.csv has no {BY_GATE[gate.key].name} column "
                f"(run explain with {gate_hint(gate.key)})"
            )
        if gate.key == ACCURACY and not summary["ground_truth"].get("source"):
            raise GradcamError(
                f"{gate.flag}: no ground truth (a labels.csv of path,label in the input folder, --truth folders "
                "or --truth FILE)"
            )
        value = gate_value(summary, gate.key)
        passed = value is not None and (value >= gate.threshold if gate.op == ">=" else value <= gate.threshold)
        results.append(GateResult(gate, value, passed))
    return results
