"""The rank CSVs of a torchrun job and their merge into predictions.csv, in input order.

Each rank appends its own rows to `predictions.rank<k>.csv`; rank 0 merges them at the end. A job that
stopped before its merge leaves them behind: the next run into OUT merges them in with --resume (their rows
are work done) or removes them (a fresh run).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gradcam_cli.out import names
from gradcam_cli.out.files import atomic_write
from gradcam_cli.out.table import csv_bytes, iter_rows

HEADER_EXPECTED = "the predictions.csv header; remove it or use another -o"


def rank_csvs(out: Path) -> list[Path]:
    """The predictions.rank<k>.csv files in OUT, by rank."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := names.RANK_CSV.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def fold_rank_csvs(out: Path, order: Callable[[], Sequence[str]], keep: bool, columns: Sequence[str]) -> int:
    """Before a run into OUT: rank CSVs an earlier job left are merged into predictions.csv when resuming
    (`keep`; `order()` gives the input order), else removed as stale. Returns how many there were."""
    found = rank_csvs(out)
    if found and keep:
        merge_csvs(out, order(), columns)  # removes them once merged
    else:
        for path in found:
            path.unlink(missing_ok=True)
    return len(found)


@dataclass
class MergeCounts:
    """Images (not rows) in the merged CSV: at least one row `error`; else all `ok`; else `skipped` (--only-below)."""

    ok: int = 0
    error: int = 0
    skipped: int = 0
    rows: int = 0

    @property
    def images(self) -> int:
        return self.ok + self.error + self.skipped


class _Unsorted(Exception):
    pass


def merge_csvs(out: Path, order: Sequence[str], columns: Sequence[str]) -> MergeCounts:
    """predictions.csv (the rows kept from before this run) + every rank CSV -> predictions.csv.

    Rows come out in input order (`order`: the CSV paths as the run saw them; rows of other paths go last),
    an image's rows stay together in their order, and an image found in several files keeps only the rows of
    the newest (a rank CSV over predictions.csv, a higher rank over a lower). The new file replaces the old
    atomically; the rank CSVs are removed after. Each file is already in input order (rows are appended batch
    by batch), so this streams; a file that is not falls back to sorting in memory.
    """
    ranks = rank_csvs(out)
    merged = out / names.PREDICTIONS
    sources = ([merged] if merged.is_file() else []) + ranks
    index = {rel: i for i, rel in enumerate(order)}
    try:
        counts = _merge(merged, sources, index, tuple(columns), streaming=True)
    except _Unsorted:
        counts = _merge(merged, sources, index, tuple(columns), streaming=False)
    for path in ranks:
        path.unlink(missing_ok=True)
    return counts


def _merge(
    target: Path, sources: Sequence[Path], index: Mapping[str, int], columns: tuple[str, ...], streaming: bool
) -> MergeCounts:
    extra: dict[str, int] = {}

    def key_of(path: str) -> int:
        if path in index:
            return index[path]
        return extra.setdefault(path, len(index) + len(extra))

    def keyed(priority: int, path: Path) -> Iterator[tuple[int, int, list[str]]]:
        last = -1
        for row in iter_rows(path, columns, HEADER_EXPECTED):
            key = key_of(row[0])
            if streaming and key < last:
                raise _Unsorted
            last = key
            yield key, priority, row

    streams = [keyed(p, path) for p, path in enumerate(sources)]
    if streaming:
        merged: Iterator[tuple[int, int, list[str]]] = heapq.merge(*streams, key=lambda t: t[0])
    else:
        merged = iter(sorted((t for s in streams for t in s), key=lambda t: t[0]))
    counts = MergeCounts()
    status = columns.index("status")

    def fill(fh: BinaryIO) -> None:
        fh.write(csv_bytes((), columns, header=True))
        group: list[tuple[int, int, list[str]]] = []

        def flush() -> None:
            if not group:
                return
            newest = max(p for _, p, _ in group)
            rows = [r for _, p, r in group if p == newest]
            if any(r[status] == "error" for r in rows):
                counts.error += 1
            elif all(r[status] == "ok" for r in rows):
                counts.ok += 1
            else:
                counts.skipped += 1
            counts.rows += len(rows)
            fh.write(csv_bytes(rows, columns))
            group.clear()

        for item in merged:
            if group and group[0][0] != item[0]:
                flush()
            group.append(item)
        flush()

    atomic_write(target, fill)
    return counts
