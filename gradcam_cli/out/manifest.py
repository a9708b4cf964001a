"""run.json: what a run was (model, settings, inputs) and how it went (status, counts, times).

`Manifest` is its only writer. It is written when a run starts (status `running`), again when OUT has been
prepared, and at the end, also when the run was interrupted or failed, so a folder always says what made it.
`gradcam audit`, `report` and `--resume` read it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gradcam_cli import __version__
from gradcam_cli.out.files import write_json


def now() -> str:
    """The current UTC time as run.json holds it (seconds, ISO 8601)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def timing(seconds: float, done: int, stages: Mapping[str, float]) -> dict[str, Any]:
    """run.json's time fields: wall time, images per second, and both per stage."""
    return {
        "wall_seconds": round(seconds, 3),
        "images_per_second": round(done / seconds, 3) if seconds > 0 else None,
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "stage_images_per_second": {k: round(done / v, 2) for k, v in stages.items() if v > 0},
    }


class Manifest:
    """The run.json of one run; `fields` describe the run (see `run.plan.RunPlan.describe`)."""

    def __init__(self, path: Path, fields: Mapping[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"tool": "gradcam-cli", "version": __version__, "status": "running"}
        self.data["started"] = now()
        self.data.update(fields)

    def update(self, **values: Any) -> None:
        self.data.update(values)

    def write(self) -> None:
        write_json(self.path, self.data)

    def close(self, status: str, **values: Any) -> None:
        """The run's end: its status (`complete`, `interrupted`, `incomplete`, ...), when, and its results."""
        self.data.update(status=status, finished=now())
        self.data.update(values)
        self.write()
