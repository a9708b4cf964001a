"""Reading an output folder back, as a user's script would: shared by the tests that run `explain`."""

from __future__ import annotations

import csv
from pathlib import Path


def rows_of(out: Path) -> list[dict[str, str]]:
    """OUT/predictions.csv as dicts of strings, decoded as strict UTF-8 (the file must always be valid UTF-8)."""
    with open(out / "predictions.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))
