"""Auditing explanations: ground truth, metric columns, summary.json, CI gates and the HTML report.

`from gradcam_cli.audit import audit, Gate` works without torch (imported on first use, so that config
validation can read `audit.metrics` at start-up); `evaluate` and `measures`, the metric passes that run during
`explain`, need torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AuditResult", "Gate", "GateResult", "audit"]


def __getattr__(name: str) -> Any:
    if name in ("Gate", "GateResult"):
        from gradcam_cli.audit import gates

        return getattr(gates, name)
    if name in ("audit", "AuditResult"):
        from gradcam_cli.audit import summary

        return getattr(summary, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
