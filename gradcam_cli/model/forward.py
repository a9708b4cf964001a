"""How a model is run: on which device, under which autocast, what its logits are, and halving on OOM."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from gradcam_cli.errors import GradcamError

R = TypeVar("R")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """auto -> CUDA when present, else CPU; an explicit device that is absent is a usage error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise GradcamError(f"--device {spec}: CUDA is not available on this machine (use cpu or auto)")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise GradcamError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
    if spec == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise GradcamError("--device mps: MPS is not available on this machine (use cpu or auto)")
    return torch.device(spec)


@contextlib.contextmanager
def autocast(device: torch.device, amp: str) -> Iterator[None]:
    """`--amp bf16|fp16`: autocast on `device`; `none`: as it is."""
    if amp == "none":
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp]):
            yield


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast gives `device`'s ops at this point (`--amp`), or None where autocast is off.

    A method's own passes (Score-CAM's masked inputs, Ablation-CAM's head) run under what the batch's forward
    ran under, though the CAM maths between them is float32: so they are read here and restored around each pass.
    """
    kind = device.type
    try:
        on, dtype = torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError):  # torch < 2.4: one pair of functions per device kind
        cpu = kind == "cpu"
        on = torch.is_autocast_cpu_enabled() if cpu else torch.is_autocast_enabled()
        dtype = torch.get_autocast_cpu_dtype() if cpu else torch.get_autocast_gpu_dtype()
    return dtype if on else None


@contextlib.contextmanager
def autocast_as(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Autocast on `device` with `dtype` (what `autocast_dtype` read), or off when it is None."""
    with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
        yield


def logits_of(output: object) -> Tensor:
    """Models return a tensor, a tuple (aux heads), a mapping or an object with `.logits`: the main logits."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping):
        for key in ("logits", "out"):
            if isinstance(output.get(key), Tensor):
                return output[key]
    raise GradcamError(f"the model returned {type(output).__name__}; expected a logits tensor")


def split_on_oom(
    run: Callable[[Tensor, int, int], R], x: Tensor, join: Callable[[Sequence[R]], R], start: int = 0
) -> R:
    """`run(x, start, stop)` on the batch `x` (rows start..stop of the caller's batch), halving it and joining
    the halves' results when the device runs out of memory; no row is dropped, one row that does not fit
    raises.

    The retry runs after the `except` block, not inside it: while a handler runs, the exception's traceback
    keeps the failed attempt's frames, and with them its activations, alive on the device.
    """
    try:
        return run(x, start, start + x.shape[0])
    except torch.cuda.OutOfMemoryError:
        if x.shape[0] == 1:
            raise
    if x.device.type == "cuda":
        torch.cuda.empty_cache()
    half = x.shape[0] // 2
    return join([split_on_oom(run, x[:half], join, start), split_on_oom(run, x[half:], join, start + half)])
