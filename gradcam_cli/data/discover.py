"""Which images a run explains: files and folders walked in sorted order, files listed in a file (`--files-from`),
sampled and limited.

Paths are named relative to the INPUT root they were found under (a listed file: relative to the list's
folder); that relative path names the image's outputs and its CSV row, so it must be unique and stable across
runs.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import sys
from collections.abc import Collection, Iterator, Sequence
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


def _walk(root: Path, skip: Collection[Path], unlistable: list[tuple[Path, str]]) -> Iterator[Path]:
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
    inputs: Sequence[str | os.PathLike[str]],
    exclude: Sequence[str | os.PathLike[str]] = (),
    files_from: str | None = None,
) -> list[ImageFile]:
    """Files and folders -> sorted image files with relative paths; folders in `exclude` (OUT) are skipped.

    Paths are relative to the INPUT root they were found under (a file given directly is named by its file
    name). When two roots yield the same relative path, the later one is prefixed with its root's name (a
    file's parent folder name) so their outputs never overwrite each other. A sub-folder that cannot be
    listed becomes an entry with `error` set (`rel` ends with '/'); an INPUT that cannot be listed at all is
    a usage error. The images `files_from` lists follow those of `inputs`.
    """
    skip = {Path(p).resolve() for p in exclude}
    found = _discover_inputs(inputs, skip)
    if files_from is not None:
        found.extend(listed(files_from, {f.rel for f in found}, skip))
    return found


def _discover_inputs(inputs: Sequence[str | os.PathLike[str]], skip: set[Path]) -> list[ImageFile]:
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
            found.append(ImageFile(path=path, rel=_unique(rel, prefix, taken), error=error))
    return found


def _unique(rel: str, prefix: str, taken: set[str]) -> str:
    """`rel`, or `prefix/rel` (then `prefix-2/rel`, ...) when another input already named an image so."""
    name = rel
    if name in taken:
        name = f"{prefix}/{rel}"
        n = 2
        while name in taken:
            name, n = f"{prefix}-{n}/{rel}", n + 1
    taken.add(name)
    return name


def read_file_list(spec: str) -> tuple[Path, list[tuple[int, str]]]:
    """`--files-from FILE` (`-`: standard input) -> (the folder its paths are relative to, [(line, path)]).

    One path per line; blank lines and lines starting with `#` are skipped, as are repeats of a path. Relative
    paths are relative to the list's folder (to the current folder for standard input), as in rsync's
    --files-from and tar's -T: the list stays valid wherever the job runs.
    """
    if spec == "-":
        base, text = Path.cwd(), sys.stdin.read()
    else:
        path = Path(spec)
        try:
            text = path.read_bytes().decode("utf-8", "surrogateescape")
        except OSError as exc:
            raise GradcamError(f"--files-from {spec}: cannot read it ({exc.strerror or exc})") from None
        base = path.parent
    entries: list[tuple[int, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.strip()
        if entry and not entry.startswith("#") and entry not in seen:
            seen.add(entry)
            entries.append((number, entry))
    return base, entries


def listed(spec: str, taken: set[str], skip: Collection[Path] = ()) -> list[ImageFile]:
    """The images `--files-from spec` names, in list order; a missing or unreadable entry becomes an entry with
    `error` set (its own error row), never a stop. A listed folder is walked like an INPUT folder."""
    base, entries = read_file_list(spec)
    where = "standard input" if spec == "-" else spec
    found: list[ImageFile] = []
    for number, entry in entries:
        path = Path(entry) if Path(entry).is_absolute() else base / entry
        try:
            rel = path.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:  # outside the list's folder: named by its file name, as a file given directly
            rel = path.name
        prefix = path.resolve().parent.name or "listed"
        if path.is_dir():
            unlistable: list[tuple[Path, str]] = []
            for image in _walk(path, skip, unlistable):
                inner = posixpath.normpath(f"{rel}/{image.relative_to(path).as_posix()}")
                found.append(ImageFile(path=image, rel=_unique(inner, prefix, taken)))
            for folder, message in unlistable:
                found.append(ImageFile(path=folder, rel=_unique(f"{rel}/{folder.name}/", prefix, taken), error=message))
            continue
        error = None if path.is_file() else f"file not found ({where} line {number})"
        found.append(ImageFile(path=path, rel=_unique(rel, prefix, taken), error=error))
    return found


def list_base(spec: str) -> Path:
    """The folder the paths of `--files-from spec` are relative to: the list's folder, or the current one."""
    return Path.cwd() if spec == "-" else Path(spec).parent


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
    files_from: str | None = None,
) -> list[ImageFile]:
    """The images of a run: `discover`, then `--sample-rate`, then `--limit`; none at all is a usage error."""
    if not inputs and files_from is None:
        raise GradcamError("nothing to explain: give INPUTS (files or folders) or --files-from FILE")
    files = discover(inputs, exclude=[exclude], files_from=files_from)
    if sample_rate is not None:
        found = len(files)
        files = [f for f in files if in_sample(f.rel, sample_rate)]
        if found and not files:
            raise GradcamError(f"--sample-rate {sample_rate:g} keeps none of the {found} images found")
    if limit is not None:
        files = files[:limit]
    if not files:
        named = [str(p) for p in inputs] + ([f"--files-from {files_from}"] if files_from is not None else [])
        raise GradcamError("no images found in " + ", ".join(named))
    return files
