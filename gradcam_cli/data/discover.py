"""Which images a run explains: files and folders walked in sorted order, sampled and limited.

Paths are named relative to the INPUT root they were found under; that relative path names the image's
outputs and its CSV row, so it must be unique and stable across runs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gradcam_cli.errors import GradcamError

# .gif is included: animated GIFs are common in scraped datasets and are explained by their first frame
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class ImageFile:
    """An input image: where to read it and the relative path that names its outputs and CSV row.

    `error` is set for an entry that is known to be unreadable before any decoding (a folder that cannot be
    listed): it still gets its row, so nothing under INPUT is skipped silently.
    """

    path: Path
    rel: str
    error: str | None = None


def _walk(root: Path, skip: set[Path], unlistable: list[tuple[Path, str]]) -> Iterator[Path]:
    """Every image file under root, following directory symlinks but never the same directory twice."""
    seen: set[tuple[int, int]] = set()

    def failed(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else root
        unlistable.append((where, f"cannot list folder: {exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=failed):
        here = Path(dirpath)
        try:
            st = here.stat()
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen or here.resolve() in skip:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for name in sorted(filenames):
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield here / name


def discover(
    inputs: Sequence[str | os.PathLike[str]], exclude: Sequence[str | os.PathLike[str]] = ()
) -> list[ImageFile]:
    """Files and folders -> sorted image files with relative paths; folders in `exclude` (OUT) are skipped.

    Paths are relative to the INPUT root they were found under (a file given directly is named by its file
    name). When two roots yield the same relative path, the later one is prefixed with its root's name (a
    file's parent folder name) so their outputs never overwrite each other. A sub-folder that cannot be
    listed becomes an entry with `error` set (`rel` ends with '/'); an INPUT that cannot be listed at all is
    a usage error.
    """
    skip = {Path(p).resolve() for p in exclude}
    found: list[ImageFile] = []
    taken: set[str] = set()
    for root_index, raw in enumerate(inputs):
        root = Path(raw)
        if not root.exists():
            raise GradcamError(f"input not found: {root}")
        items: list[tuple[Path, str, str | None]]
        if root.is_dir():
            if root.resolve() in skip:
                raise GradcamError(f"input {root} is the output folder (-o); write the outputs somewhere else")
            unlistable: list[tuple[Path, str]] = []
            items = [(p, p.relative_to(root).as_posix(), None) for p in _walk(root, skip, unlistable)]
            for folder, message in unlistable:
                if folder == root:
                    raise GradcamError(f"input {root}: {message}")
                items.append((folder, folder.relative_to(root).as_posix() + "/", message))
            items.sort(key=lambda item: item[1])
            prefix = root.resolve().name
        else:
            items = [(root, root.name, None)]
            prefix = root.resolve().parent.name
        prefix = prefix or f"input{root_index}"
        for path, rel, error in items:
            name = rel
            if name in taken:
                name = f"{prefix}/{rel}"
                n = 2
                while name in taken:
                    name, n = f"{prefix}-{n}/{rel}", n + 1
            taken.add(name)
            found.append(ImageFile(path=path, rel=name, error=error))
    return found


def in_sample(rel: str, rate: float) -> bool:
    """Deterministic sampling by path: the first 8 bytes of sha256(rel) as a fraction of 2^64, kept when < rate.

    The same path is always in or out for a given rate, on every machine and run, and a higher rate keeps a
    superset of a lower rate's images.
    """
    digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < rate


def select_files(
    inputs: Sequence[str | os.PathLike[str]],
    exclude: Path,
    sample_rate: float | None = None,
    limit: int | None = None,
) -> list[ImageFile]:
    """The images of a run: `discover`, then `--sample-rate`, then `--limit`; none at all is a usage error."""
    files = discover(inputs, exclude=[exclude])
    if sample_rate is not None:
        found = len(files)
        files = [f for f in files if in_sample(f.rel, sample_rate)]
        if found and not files:
            raise GradcamError(f"--sample-rate {sample_rate:g} keeps none of the {found} images found")
    if limit is not None:
        files = files[:limit]
    if not files:
        raise GradcamError("no images found in " + ", ".join(str(p) for p in inputs))
    return files
