"""The Python API: what the CLI calls, and what notebooks and scripts call.

    from gradcam_cli.api import audit, explain, report

`explain` needs torch (imported when it runs); `audit` and `report` read an output folder and never import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcam_cli.config import Settings

if TYPE_CHECKING:
    from gradcam_cli.audit.gates import Gate
    from gradcam_cli.audit.summary import AuditResult
    from gradcam_cli.audit.truth import Truth
    from gradcam_cli.run.tally import RunSummary

LogFn = Callable[[str], None]


def explain(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    settings: Settings | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    log: LogFn | None = None,
    on_start: Callable[[int], None] | None = None,
    **overrides: Any,
) -> RunSummary:
    """Explain every image under `inputs` (folders walked recursively, or files) into the folder `out`.

    `settings` (default `Settings()`) with `overrides` applied as if they were flags (`workers=0`). Returns a
    `RunSummary` whose `exit_code` is what the CLI returns; with --summary or a gate its `audit` holds the
    `AuditResult`. Per-image problems become error rows; a problem with the call raises GradcamError.
    """
    from gradcam_cli.run.explain import explain as run_explain

    base = settings if settings is not None else Settings()
    return run_explain(
        inputs, out, base.replace(**overrides) if overrides else base, progress=progress, log=log, on_start=on_start
    )


def audit(
    out: str | Path,
    truth: str | Truth = "auto",
    worst: int = 10,
    gates: Sequence[Gate] = (),
    labels: Sequence[str] | None = None,
    write: bool = True,
) -> AuditResult:
    """Summarise the explain output folder `out` into `out/summary.json` and check `gates` (see `audit.gates`)."""
    from gradcam_cli.audit.summary import audit as run_audit

    return run_audit(out, truth=truth, worst=worst, gates=gates, labels=labels, write=write)


def report(
    out: str | Path,
    truth: str | Truth = "auto",
    title: str | None = None,
    thumb_size: int = 256,
    low_confidence: float = 0.5,
    log: LogFn | None = None,
) -> Path:
    """Write `out/report.html`, a self-contained page for the explain output folder `out`; returns its path."""
    from gradcam_cli.audit.report import build_report

    return build_report(out, truth=truth, title=title, thumb_size=thumb_size, low_confidence=low_confidence, log=log)
