"""gradcam-cli: batched Grad-CAM explanations for whole folders of images.

The package imports nothing heavy at import time so that `gradcam --help` answers instantly; the Python API
(`explain`, `Settings`) pulls in torch only when it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from gradcam_cli.pipeline import RunSummary

from gradcam_cli.config import Settings, load_settings
from gradcam_cli.errors import GradcamError

__all__ = ["GradcamError", "Settings", "__version__", "explain", "load_settings"]


def explain(inputs: Any, out: Any, settings: Settings | None = None, **overrides: Any) -> RunSummary:
    """Explain every image under `inputs` into the folder `out`; see `gradcam_cli.pipeline.explain`."""
    from gradcam_cli.pipeline import explain as _explain

    base = settings if settings is not None else Settings()
    return _explain(inputs, out, base.replace(**overrides) if overrides else base)
