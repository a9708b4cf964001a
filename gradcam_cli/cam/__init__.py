"""CAM: the engine (hooks, one forward, one batched backward), the method registry (`cam.methods`), targets
and fusion. `cam.methods` imports no torch; the rest does.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CamEngine", "CamResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gradcam_cli.cam import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
