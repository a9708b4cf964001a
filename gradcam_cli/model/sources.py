"""Model sources behind a prefix: `timm:NAME` (a timm model) and `hf:PATH_OR_REPO_ID` (a Hugging Face
image classifier), next to torchvision names and `module:callable` factories.

A source turns its name into a `SourceModel`: the module, a description of its weights, its class names, its
own preprocessing as timm-style keys (`input_size`, `crop_pct`, `mean`, `std`, `interpolation`) and notes for
the user; `loading.load_model` applies the config's keys on top, as for every model. Both sources only read
local files: the Hugging Face cache, the torch hub cache, a folder, a checkpoint. No call that could reach the
network is made (`offline()` is held around the libraries' loaders as a second guard), because a run that
silently downloads gigabytes, or hangs on a firewalled machine, is worse than one line saying what is missing.

`timm:create_model` (and any other callable of the timm package) stays the factory spelling it always was:
the part after `timm:` is a model when timm's registry knows it, a factory when the timm module has that
attribute, and an error naming the nearest model names otherwise.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from gradcam_cli.config import Settings
from gradcam_cli.errors import GradcamError

EXTRAS = {"timm": "timm", "transformers": "hf"}  # package -> the gradcam-cli extra that installs it


@dataclass
class SourceModel:
    """What a model source built: the module (any mode), its weights as run.json records them, class names
    (empty: by index, or ImageNet's for 1000 classes), its own preprocessing (timm-style keys), notes."""

    model: nn.Module
    weights: str
    labels: list[str]
    cfg: Mapping[str, Any]
    notes: list[str] = field(default_factory=list)


def import_package(package: str, what: str) -> ModuleType:
    """Import an optional package (timm, transformers); missing is a usage error naming the extra."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:
        extra = EXTRAS.get(package, package)
        raise GradcamError(
            f'{what} needs the {package} package, which is not installed ({exc}); pip install "gradcam-cli[{extra}]"'
        ) from None


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it, read now (not at its import):
    $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "huggingface" / "hub"


def cached_hub_file(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    """The first of `filenames` of model repo `repo_id` in the local Hugging Face cache, or None.

    Reads the cache's own layout (`models--ORG--NAME/refs/main` names the snapshot that holds the files):
    huggingface_hub's `try_to_load_from_cache` does the same reading, without any request.
    """
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face's offline switches on for a loader call: the environment variables (read by libraries that
    look them up at call time) and huggingface_hub's constant (read at its import, so set directly)."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    constants: Any = None
    with contextlib.suppress(ImportError):  # timm without huggingface_hub: nothing to switch off there
        from huggingface_hub import constants
    previous = getattr(constants, "HF_HUB_OFFLINE", None)
    for key in keys:
        os.environ[key] = "1"
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = previous
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_external(name: str, settings: Settings) -> SourceModel | None:
    """The model of a `timm:NAME` or `hf:...` name; None for every other name (torchvision, factories)."""
    if name.startswith("hf:"):
        from gradcam_cli.model.hf_source import load_hf

        return _checked(load_hf(name.removeprefix("hf:"), settings))
    if not name.startswith("timm:"):
        return None
    rest = name.removeprefix("timm:")
    timm = import_package("timm", f"model '{name}'")
    if rest and timm.is_model(rest):
        from gradcam_cli.model.timm_source import load_timm

        return _checked(load_timm(rest, settings))
    if rest and hasattr(timm, rest.split(".")[0]):
        return None  # timm:create_model and other callables of the package: a factory, as before
    near = difflib.get_close_matches(rest, timm.list_models(), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(near)}?" if near else "; timm.list_models() lists them"
    raise GradcamError(f"model '{name}': timm has no model '{rest}'{hint}")


def _checked(source: SourceModel) -> SourceModel:
    """A note when the model asks for a resize filter that is not implemented (bilinear is used instead)."""
    from gradcam_cli.model.loading import INTERPOLATIONS

    asked = source.cfg.get("interpolation")
    if asked is not None and asked not in INTERPOLATIONS:
        source.notes.append(
            f"the model's preprocessing asks for {asked} resizing; resizing is {' or '.join(INTERPOLATIONS)} "
            "here, so bilinear is used"
        )
    return source
