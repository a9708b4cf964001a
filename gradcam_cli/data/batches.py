"""Batches: a DataLoader whose workers decode images in parallel with compute, and the batches it yields.

Workers return uint8 tensors (4x smaller than float to pass between processes); the float conversion and
normalisation happen on the compute device. A file that fails to decode becomes an error entry of its batch,
never an exception: one bad image must not stop a run. At most workers * 2 batches are decoded ahead of the
model, so memory does not grow with the folder.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from gradcam_cli.config import DEFAULT_MAX_PIXELS
from gradcam_cli.data.decode import (
    Encoded,
    decode_rgb,
    input_geometry,
    model_input,
    oriented_size,
    probe_jpeg,
    rgb_tensor,
)
from gradcam_cli.data.discover import ImageFile
from gradcam_cli.errors import one_line
from gradcam_cli.model.loading import InputSpec


@dataclass
class Sample:
    """One decoded image (or the reason it could not be decoded); `index` and `rel` say which file it is."""

    index: int
    rel: str
    error: str | None = None
    input: torch.Tensor | None = None  # (3, h, w) uint8
    original: torch.Tensor | None = None  # (H, W, 3) uint8, only when an overlay is wanted
    size: tuple[int, int] = (0, 0)  # (H, W) of the original
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    encoded: Encoded | None = None  # instead of `input`/`original` when the device decodes it


class ImageDataset(torch.utils.data.Dataset[Sample]):
    """Decodes file i into a `Sample`; runs inside DataLoader workers."""

    def __init__(
        self,
        files: Sequence[ImageFile],
        spec: InputSpec,
        keep_original: bool,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device_decode: bool = False,
    ) -> None:
        self.files = list(files)
        self.spec = spec
        self.keep_original = keep_original
        self.max_pixels = max_pixels
        self.device_decode = device_decode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Sample:
        file = self.files[index]
        if file.error is not None:
            return Sample(index, file.rel, file.error)
        if self.device_decode:
            probed = probe_jpeg(file.path, self.max_pixels)
            if probed is not None:
                encoded, width, height = probed
                size = oriented_size(width, height, encoded.orientation)
                box = input_geometry(size[1], size[0], self.spec).box
                return Sample(index, file.rel, None, size=size, box=box, encoded=encoded)
        try:
            img = decode_rgb(file.path, self.max_pixels)
            arr, box = model_input(img, self.spec)
            original = rgb_tensor(img) if self.keep_original else None
            return Sample(index, file.rel, None, torch.from_numpy(arr), original, (img.height, img.width), box)
        except Exception as exc:
            return Sample(index, file.rel, one_line(exc))


@dataclass
class Batch:
    """The good samples of a batch stacked for the model, plus the failures, in input order.

    Per-image lists are parallel to `indices` (the images' positions in the loader's file list) and `rels`
    (their relative paths); `errors` holds (index, rel, reason) of the images that could not be decoded.
    """

    indices: list[int] = field(default_factory=list)
    rels: list[str] = field(default_factory=list)
    inputs: torch.Tensor | None = None  # (B, 3, h, w) uint8; None while `encoded` holds undecoded JPEGs
    originals: list[torch.Tensor | None] = field(default_factory=list)
    encoded: list[Encoded | None] = field(default_factory=list)  # per image: bytes for the device, or None
    sizes: list[tuple[int, int]] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)

    parts: list[torch.Tensor | None] = field(default_factory=list)  # per image (3, h, w) inputs, before stacking

    def pin_memory(self) -> Batch:
        if self.inputs is not None:
            self.inputs = self.inputs.pin_memory()
        return self


def collate(samples: list[Sample]) -> Batch:
    """Samples -> one Batch: the decoded inputs stacked, the failures set aside."""
    batch = Batch()
    good = []
    for s in samples:
        if s.error is not None:
            batch.errors.append((s.index, s.rel, s.error))
            continue
        good.append(s.input)
        batch.indices.append(s.index)
        batch.rels.append(s.rel)
        batch.originals.append(s.original)
        batch.encoded.append(s.encoded)
        batch.sizes.append(s.size)
        batch.boxes.append(s.box)
    if good and all(t is not None for t in good):
        batch.inputs = torch.stack(good)  # type: ignore[arg-type]
    elif good:  # some are bytes for the device: keep the decoded ones per image until it has decoded the rest
        batch.parts = good
    return batch


def make_loader(
    files: Sequence[ImageFile],
    spec: InputSpec,
    batch_size: int,
    workers: int,
    keep_original: bool,
    pin: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    device_decode: bool = False,
) -> torch.utils.data.DataLoader[Sample]:
    """Ordered, bounded streaming: at most workers*2 batches are decoded ahead of the model."""
    return torch.utils.data.DataLoader(
        ImageDataset(files, spec, keep_original, max_pixels, device_decode),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )


def subset_batch(batch: Batch, keep: list[int]) -> Batch:
    """The batch restricted to positions `keep` (in order): the input tensor and every per-image list.

    Written against the dataclass fields so that fields added to `Batch` later are carried along.
    """
    if len(keep) == len(batch.indices):
        return batch
    changes: dict[str, Any] = {}
    n = len(batch.indices)
    for f in fields(batch):
        value = getattr(batch, f.name)
        if f.name == "inputs":
            changes[f.name] = value[keep] if keep and value is not None else None
        elif f.name != "errors" and isinstance(value, list) and len(value) == n:
            changes[f.name] = [value[i] for i in keep]
    return replace(batch, **changes)


def _only(samples: list[Sample]) -> Sample:
    return samples[0]


class WorkerLost(Exception):
    """A decode worker died (killed by a signal, or exited) while holding batch `batch` (None: unknown)."""

    def __init__(self, batch: int | None, signal_name: str) -> None:
        super().__init__(f"decode worker killed by {signal_name}")
        self.batch, self.signal_name = batch, signal_name


def _signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


@contextmanager
def _quiet_sigchld() -> Iterator[None]:
    """PyTorch's SIGCHLD handler raises in the main thread wherever it happens to be (in the model, in the
    writer) when a worker dies; here the loader's own liveness check finds the death instead, where the lost
    batch is waited for, so that it can be told apart and retried. Torch's handler is installed first (it is
    once per process), so that it is the one restored afterwards, for any other loader of the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with suppress(Exception):
        torch.utils.data._utils.signal_handling._set_SIGCHLD_handler()
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL if previous is None else previous)


_END = object()
WORKER_DEATH_ERRORS = (RuntimeError, OSError, EOFError)  # a dead worker's queue or shared tensor, as seen here


class SurvivingLoader:
    """`make_loader`'s batches, in order, surviving decode workers that die (the OOM killer, a decoder that
    crashes on a hostile file).

    When a worker dies, the batches it held are lost with the loader; the loader is started again after the
    last batch handed out, and the batch the dead worker was decoding is decoded again one image per fresh
    worker process. An image whose worker dies again becomes an error entry naming the signal (the file is
    what kills it); the others are decoded as usual (the death was not theirs, e.g. an OOM kill). `lost` lists
    what happened, for run.json. Memory stays that of one loader: the dead one is shut down first.
    """

    def __init__(self, files: Sequence[ImageFile], batch_size: int, workers: int, **loader_args: Any) -> None:
        self.files, self.batch_size, self.workers = files, batch_size, workers
        self.loader_args = loader_args
        self.lost: list[dict[str, Any]] = []

    def _loader(self, start: int, stop: int, batch_size: int, workers: int, single: bool = False) -> Any:
        """Over images start..stop-1 only, their indices those of the whole list; `single`: one Sample each."""
        loader = make_loader(self.files, batch_size=batch_size, workers=workers, **self.loader_args)
        return torch.utils.data.DataLoader(
            loader.dataset,
            batch_size=batch_size,
            sampler=range(start, stop),
            num_workers=workers,
            collate_fn=_only if single else loader.collate_fn,
            pin_memory=loader.pin_memory,
            prefetch_factor=loader.prefetch_factor,
        )

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self.workers == 0:  # decoding in this process: nothing to survive
            yield from self._loader(0, len(self.files), self.batch_size, 0)
            return
        position, total, suspect = 0, len(self), None
        while position < total:
            if position == suspect:
                yield self._isolated(position)
                position, suspect = position + 1, None
                continue
            stop = total if suspect is None else suspect
            try:
                for batch in self._run(position, stop):
                    yield batch
                    position += 1
            except WorkerLost as lost:
                self.lost.append({"signal": lost.signal_name, "batch": position if lost.batch is None else lost.batch})
                suspect = position if lost.batch is None else lost.batch

    def _run(self, first: int, stop: int) -> Iterator[Batch]:
        """Batches first..stop-1 from one loader; a dead worker raises `WorkerLost` naming its batch."""
        size = self.batch_size
        with _quiet_sigchld():
            iterator = iter(self._loader(first * size, min(stop * size, len(self.files)), size, self.workers))
            try:
                while (batch := self._next(iterator, first)) is not _END:
                    yield batch
            finally:
                _shut_down(iterator)

    def _next(self, iterator: Any, first: int) -> Any:
        try:
            return next(iterator, _END)
        except WORKER_DEATH_ERRORS as exc:
            raise self._lost(iterator, first, exc) from None

    @staticmethod
    def _lost(iterator: Any, first: int, exc: Exception) -> Exception:
        """The batch a dead worker was decoding, or `exc` when no worker died. A worker decodes its batches in
        turn, so it is the oldest of its batches whose result never arrived (results already queued are
        drained first); when that is not known exactly, the one named is decoded image by image for nothing."""
        workers = list(getattr(iterator, "_workers", []))
        dead: dict[int, Any] = {}
        for _ in range(20):  # a reset connection can be seen a moment before the worker's exit is
            dead = {i: w for i, w in enumerate(workers) if not w.is_alive()}
            if dead or not workers:
                break
            time.sleep(0.05)
        if not dead:
            return exc
        tasks = getattr(iterator, "_task_info", {})
        arrived = set()
        with suppress(Exception):
            while True:
                idx, _data = iterator._data_queue.get(timeout=0.05)
                arrived.add(idx)
        pending = sorted(
            idx for idx, info in tasks.items() if len(info) == 1 and info[0] in dead and idx not in arrived
        )
        worker = dead[tasks[pending[0]][0]] if pending else next(iter(dead.values()))
        return WorkerLost(first + pending[0] if pending else None, _signal_name(worker.exitcode))

    def _isolated(self, position: int) -> Batch:
        """Batch `position` decoded one image per fresh worker: an image whose worker dies is an error entry."""
        samples = []
        for index in range(position * self.batch_size, min((position + 1) * self.batch_size, len(self.files))):
            try:
                samples.extend(self._run_one(index))
            except WorkerLost as lost:
                message = f"decode worker killed by {lost.signal_name} while decoding this file"
                samples.append(Sample(index, self.files[index].rel, message))
                self.lost[-1].setdefault("files", []).append(self.files[index].rel)
        return collate(samples)

    def _run_one(self, index: int) -> list[Sample]:
        with _quiet_sigchld():
            iterator = iter(self._loader(index, index + 1, 1, 1, single=True))
            try:
                return [self._next(iterator, index)]
            finally:
                _shut_down(iterator)


def _shut_down(iterator: Any) -> None:
    """Stop a loader's workers now (not whenever the iterator is collected): one loader's memory at a time."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
