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
from gradcam_cli.errors import MachineFault
from gradcam_cli.out.files import atomic_write, json_bytes, overwrite_in_place, write_json

ROOM = 8192  # bytes run.json keeps free while a run goes: more than its final fields add (counts, times, reason)


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

    def __init__(self, path: Path, fields: Mapping[str, Any], fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync  # --fsync: each write reaches the disk before the run goes on
        self.written = False  # whether this run's run.json is in OUT (then it must end with how the run ended)
        self.data: dict[str, Any] = {"tool": "gradcam-cli", "version": __version__, "status": "running"}
        self.data["started"] = now()
        self.data.update(fields)

    def update(self, **values: Any) -> None:
        self.data.update(values)

    def write(self) -> None:
        """While the run goes, the file ends in `ROOM` bytes of blank space (valid JSON whitespace): the blocks
        that let `close` rewrite it in place on a disk that has filled up meanwhile."""
        if self.data.get("status") == "running":
            data = json_bytes(self.data)
            atomic_write(self.path, data[:-1] + b" " * ROOM + b"\n", self.fsync)
        else:
            write_json(self.path, self.data, self.fsync)
        self.written = True

    def close(self, status: str, **values: Any) -> None:
        """The run's end: its status (`complete`, `interrupted`, `stopped`, `incomplete`, ...), when, and its
        results. On a full disk, where no temporary file can be made, run.json is rewritten in the blocks it
        already has when the new text fits them; otherwise the `MachineFault` is raised."""
        self.data.update(status=status, finished=now())
        self.data.update(values)
        try:
            self.write()
        except MachineFault:
            if not overwrite_in_place(self.path, json_bytes(self.data)):
                raise
