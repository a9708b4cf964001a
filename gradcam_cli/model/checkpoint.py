"""Checkpoints: a state dict saved by training code, loaded into the model that `--model` built.

Read with `weights_only=True` (tensors and plain containers only: no pickled code runs), and key names are
adapted the way training code commonly saves them (DataParallel's `module.`, Lightning's `model.`,
torch.compile's `_orig_mod.`, a `state_dict` entry); every adaptation is reported back as a note, never done
silently, and anything that does not fit says which keys or shapes differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradcam_cli.errors import GradcamError

CHECKPOINT_ENTRIES = ("state_dict", "model_state_dict", "model")  # where trainers nest the state dict
KEY_PREFIXES = ("module.", "model.", "_orig_mod.")  # DataParallel/DDP, Lightning and wrappers, torch.compile


def _strip_prefixes(state: dict[str, Any], expected: set[str], notes: list[str], where: str) -> dict[str, Any]:
    """Drop known key prefixes (also stacked: `module.model.`) from keys that then name a model entry.

    A key is only renamed when the stripped name exists in the model and the original does not, so a model
    whose own submodule is called `model` keeps its keys, and keys that match nothing keep the name the
    checkpoint gave them (which is what the mismatch error should show).
    """
    renamed: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for key, value in state.items():
        name = key
        dropped: list[str] = []
        while name not in expected:
            prefix = next((p for p in KEY_PREFIXES if name.startswith(p)), None)
            if prefix is None:
                break
            name, dropped = name[len(prefix) :], [*dropped, prefix]
        if name in expected and dropped and name not in state:
            for prefix in dropped:
                counts[prefix] = counts.get(prefix, 0) + 1
            renamed[name] = value
        else:
            renamed[key] = value
    for prefix, count in counts.items():
        notes.append(f"{where}: stripped the '{prefix}' prefix from {count} key{'s' if count != 1 else ''}")
    return renamed


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def load_checkpoint(model: nn.Module, path: Path) -> list[str]:
    """Load a state dict saved with torch.save; only tensors and plain containers are unpickled.

    Returns notes on what was adapted (the entry the weights sat under, stripped key prefixes).
    """
    where = f"weights {path}"
    if not path.is_file():
        raise GradcamError(
            f"{where}: no such file (and not 'none', 'DEFAULT' or a weights name; a relative path in a config is "
            "relative to the config file)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GradcamError(
            f"{where}: not a loadable state dict (read with weights_only=True, which refuses pickled objects "
            f"such as a whole nn.Module; save model.state_dict() instead): {first[:160]}"
        ) from None
    notes: list[str] = []
    for key in CHECKPOINT_ENTRIES:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            notes.append(f"{where}: using the state dict under the checkpoint's '{key}' entry")
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise GradcamError(f"{where}: expected a state dict (parameter name -> tensor), got {type(obj).__name__}")
    model_state = model.state_dict()
    expected = set(model_state)
    state = _strip_prefixes(dict(obj), expected, notes, where)
    # BatchNorm's step counter is not a weight; old checkpoints and some exporters leave it out
    missing = sorted(k for k in expected - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {_few(unexpected)})")
        raise GradcamError(f"{where}: keys do not match the model: {'; '.join(parts)}")
    wrong = [k for k in model_state if k in state and state[k].shape != model_state[k].shape]
    if wrong:
        shown = ", ".join(
            f"{k} (checkpoint {'x'.join(map(str, state[k].shape))}, model {'x'.join(map(str, model_state[k].shape))})"
            for k in wrong[:3]
        )
        hint = ""
        classes = num_outputs(model)
        for k in wrong:
            if classes is not None and model_state[k].dim() >= 1 and model_state[k].shape[0] == classes:
                hint = f"; if it was fine-tuned for {state[k].shape[0]} classes, set num_classes: {state[k].shape[0]}"
                break
        raise GradcamError(f"{where}: {len(wrong)} tensor shape(s) differ from the model: {shown}{hint}")
    model.load_state_dict(state, strict=False)
    return notes


def num_outputs(model: nn.Module) -> int | None:
    """Classes of the classifier: the last Linear or 1x1 Conv2d registered (used to default the labels)."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module.out_features
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
            last = module.out_channels
    return last


def state_digest(model: nn.Module) -> str:
    """A fingerprint of the model's weights: BLAKE2b-128 over every parameter and buffer (name, dtype, shape,
    bytes), in state-dict order. Two runs with the same digest explained the same weights, whatever file or
    factory they came from; `gradcam diff` reports when they differ (retrained, pruned, re-exported)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: hash its bits
            t = t.view(torch.int16)
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
