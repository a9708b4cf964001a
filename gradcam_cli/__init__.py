"""gradcam-cli: batched Grad-CAM explanations for whole folders of images.

The package imports nothing heavy at import time so that `gradcam --help` answers instantly; `explain` pulls
in torch only when it runs. The Python API is in `gradcam_cli.api` (explain, audit, report).
"""

from __future__ import annotations

__version__ = "0.1.0"

from gradcam_cli.api import explain
from gradcam_cli.config import Settings, load_settings
from gradcam_cli.errors import GradcamError

__all__ = ["GradcamError", "Settings", "__version__", "explain", "load_settings"]
