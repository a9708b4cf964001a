"""What a run did: the tally one process keeps while it runs, and the summary `explain` returns."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from gradcam_cli.errors import ExitCode
from gradcam_cli.out.manifest import timing


@dataclass
class RunSummary:
    """What a run did; `exit_code` is what the CLI returns (0 all explained, 1 some images failed, 3 a gate)."""

    out: str
    total: int
    ok: int
    errors: int
    seconds: float
    images_per_second: float
    layers: list[str]
    stages: dict[str, float] = field(default_factory=dict)
    skipped: int = 0  # with --resume: images already explained by an earlier run (counted in `ok`)
    skipped_confident: int = 0  # with --only-below: images given a `skipped` row (their prediction only)
    audit: Any = None  # with --summary or gates: the `audit.AuditResult` written to summary.json
    diff: Any = None  # with --compare-to: the `DiffResult` written to OUT/diff
    ranks: int = 1  # processes that shared the run (torchrun)

    @property
    def exit_code(self) -> int:
        """3 when a --fail-under/--fail-over gate failed (it wins over 1), else 1 when images failed, else 0.
        With --compare-to, images that are in one run only do not change it: they are the diff's to report."""
        if self.audit is not None and self.audit.failed_gates:
            return ExitCode.GATE_FAILED
        if self.diff is not None and not all(g.passed for g in self.diff.gates):
            return ExitCode.GATE_FAILED
        return ExitCode.IMAGE_ERRORS if self.errors else ExitCode.OK


@dataclass
class Tally:
    """One process's counts (images, not rows), seconds per stage, and what run.json says about how the
    overlays were encoded and the JPEGs decoded (`notes`)."""

    ok: int = 0
    errors: int = 0
    skipped: int = 0  # --only-below
    stages: dict[str, float] = field(default_factory=lambda: {"decode_wait": 0.0, "compute": 0.0, "render": 0.0})
    notes: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t0

    def count_written(self, images: Mapping[str, int]) -> None:
        """The counts of the images the writer put on disk, by their first row's status (`OutputWriter.
        images_written`): counted from the CSV's side, a run stopped between explaining a batch and writing it
        never reports that batch as done."""
        self.ok, self.skipped = images.get("ok", 0), images.get("skipped", 0)
        self.errors = sum(n for status, n in images.items() if status not in ("ok", "skipped"))

    def stop_clock(self) -> None:
        self.seconds = time.perf_counter() - self.started

    @property
    def done(self) -> int:
        return self.ok + self.errors + self.skipped

    def timing(self) -> dict[str, Any]:
        return timing(self.seconds, self.done, self.stages)
