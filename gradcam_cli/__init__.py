"""gradcam-cli: batched Grad-CAM explanations for whole folders of images.

The package imports nothing heavy at import time so that `gradcam --help` answers instantly; `explain` pulls
in torch only when it runs. The Python API is in `gradcam_cli.api` (explain, audit, report, diff);
`gradcam_cli.diff(a, b)` compares two explain output folders.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from gradcam_cli.api import explain
from gradcam_cli.config import Settings, load_settings
from gradcam_cli.errors import GradcamError

__all__ = ["GradcamError", "Settings", "__version__", "diff", "explain", "load_settings"]


def __getattr__(name: str) -> Any:
    """`diff` is imported on first use (it reads files only, but `gradcam --help` need not load it)."""
    if name == "diff":
        from gradcam_cli.audit.diff.compare import diff

        return diff
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
