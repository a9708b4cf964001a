"""The Python API: what the CLI calls, and what notebooks and scripts call.

    from gradcam_cli.api import audit, explain, layers, models, report

`explain` and `layers` need torch (imported when they run); `audit` and `report` read an output folder and
`models` a table, and never import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcam_cli.config import Settings, load_settings
from gradcam_cli.errors import GradcamError

if TYPE_CHECKING:
    from gradcam_cli.model.catalog import ZooModel
    from gradcam_cli.model.layers import LayerInfo
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


def models(pattern: str | None = None) -> list[ZooModel]:
    """The torchvision classifiers `gradcam models` lists, filtered by `pattern` (a substring, or a glob such as
    'vit_*'); a pattern that matches none is a usage error. Read from a table, so no torch is imported."""
    import fnmatch

    from gradcam_cli.model.catalog import zoo

    rows = zoo()
    if pattern:
        glob = any(c in pattern for c in "*?[")
        rows = [m for m in rows if (fnmatch.fnmatch(m.name, pattern) if glob else pattern in m.name)]
        if not rows:
            raise GradcamError(f"no torchvision classification model matches '{pattern}' (`gradcam models` lists all)")
    return rows


@dataclass(frozen=True)
class LayerReport:
    """What `gradcam layers` shows: the model as built, its modules as one dummy forward saw them, the pick."""

    model: str
    input_size: tuple[int, int]
    layers: list[LayerInfo]
    auto_detected: str  # the layer a run without --layer uses: the family default when there is one
    family_config: str | None
    family_default: str | None = None  # why, when `auto_detected` is a timm / Hugging Face family's layer


def layers(model: str, config: str | Path | None = None, input_size: int | None = None) -> LayerReport:
    """`model`'s modules with their output shapes for a dummy input (random weights) and the layer a run would
    use (auto-detected, or a timm / Hugging Face family's default); `config` for model_kwargs, num_classes or
    input_size of a factory."""
    settings = load_settings(config, model=model, weights="none", input_size=input_size)  # before torch loads
    from gradcam_cli.model.catalog import family_config
    from gradcam_cli.model.layers import family_layer, inspect_layers
    from gradcam_cli.model.loading import load_model

    loaded = load_model(settings)
    infos, pick = inspect_layers(loaded.model, loaded.spec.size)
    family = family_config(model) if ":" not in model else None
    default = family_layer(loaded.model, loaded.spec.size)
    if default is None:
        return LayerReport(loaded.name, loaded.spec.size, infos, pick, family)
    return LayerReport(loaded.name, loaded.spec.size, infos, default[0], family, default[1])


def __getattr__(name: str) -> Any:
    """`audit(out, truth, worst, gates, labels, write, groups, group_min_count) -> AuditResult`
    (gradcam_cli.audit.summary.audit) and `report(out, truth, title, thumb_size, low_confidence, log, threads,
    groups) -> Path` (gradcam_cli.audit.report.report) and
    `diff(a, b, out, top, gates, report, worst, threads, log) -> DiffResult` (gradcam_cli.audit.diff.compare.diff),
    imported on first use so that `gradcam --help` does not pay for them. None of them imports torch."""
    if name == "audit":
        from gradcam_cli.audit.summary import audit

        return audit
    if name == "report":
        from gradcam_cli.audit.report import report

        return report
    if name == "diff":
        from gradcam_cli.audit.diff.compare import diff

        return diff
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
