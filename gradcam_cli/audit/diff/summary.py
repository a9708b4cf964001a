"""diff.csv's rows and diff.json: counts, flips, the distribution of each similarity, per-class means, the least
similar pairs, and which settings of the two runs differ (so a reader knows what was compared)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from gradcam_cli import __version__
from gradcam_cli.audit.diff.pairs import COMPARED, STATUSES, Pair
from gradcam_cli.audit.numbers import rounded

DIFF_COLUMNS: tuple[str, ...] = (
    "path",
    "slot",
    "status",
    "layer_a",
    "layer_b",
    "target_a",
    "target_b",
    "pred_a",
    "pred_b",
    "flipped",
    "prob_a",
    "prob_b",
    "spearman",
    "ssim",
    "iou",
    "peak_shift_px",
    "peak_shift",
    "maps",
    "note",
)
MEASURES: tuple[str, ...] = ("spearman", "ssim", "iou", "peak_shift", "peak_shift_px")
# run.json keys that change what a map means: listed in diff.json when the two runs differ in them
SETTINGS: tuple[str, ...] = (
    "model",
    "weights",
    "weights_digest",
    "layers",
    "method",
    "method_options",
    "targets",
    "amp",
    "preprocessing",
    "channels_last",
    "device",
)


def _get(row: Mapping[str, str] | None, key: str) -> str:
    return "" if row is None else row.get(key, "")


def flipped(pair: Pair) -> bool | None:
    """Whether the top-1 class changed (None when either run has no prediction for the image)."""
    pa, pb = _get(pair.a, "pred_index"), _get(pair.b, "pred_index")
    return None if not pa or not pb else pa != pb


def csv_row(pair: Pair) -> list[str]:
    """A pair as diff.csv's values, in DIFF_COLUMNS order."""
    flip = flipped(pair)
    v = pair.values

    def number(key: str) -> str:
        return f"{v[key]:.6f}" if key in v else ""

    return [
        pair.path,
        str(pair.slot),
        pair.status,
        _get(pair.a, "layer"),
        _get(pair.b, "layer"),
        _get(pair.a, "target_label"),
        _get(pair.b, "target_label"),
        _get(pair.a, "pred_label"),
        _get(pair.b, "pred_label"),
        "" if flip is None else str(flip).lower(),
        _get(pair.a, "target_prob"),
        _get(pair.b, "target_prob"),
        number("spearman"),
        number("ssim"),
        number("iou"),
        f"{v['peak_shift_px']:.1f}" if "peak_shift_px" in v else "",
        number("peak_shift"),
        pair.source,
        pair.note or _get(pair.a, "error") or _get(pair.b, "error"),
    ]


def _percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile by linear interpolation between order statistics (NumPy's default method)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "mean": None, "median": None, "p10": None, "p90": None, "min": None, "max": None}
    return {
        "count": len(values),
        "mean": rounded(statistics.fmean(values)),
        "median": rounded(statistics.median(values)),
        "p10": rounded(_percentile(values, 10)),
        "p90": rounded(_percentile(values, 90)),
        "min": rounded(min(values)),
        "max": rounded(max(values)),
    }


def settings_compared(run_a: Mapping[str, Any], run_b: Mapping[str, Any]) -> dict[str, Any]:
    """{differ: {key: {a, b}}, same: [keys]} over the run.json keys that change what a map means."""
    differ = {k: {"a": run_a.get(k), "b": run_b.get(k)} for k in SETTINGS if run_a.get(k) != run_b.get(k)}
    return {"differ": differ, "same": [k for k in SETTINGS if k not in differ]}


def summarize_diff(
    pairs: Sequence[Pair],
    runs: tuple[Mapping[str, Any], Mapping[str, Any]],
    folders: tuple[str, str],
    top: float,
    worst: int,
) -> dict[str, Any]:
    """diff.json without its gates. Image-level numbers (flips) count each image once, by its first slot;
    similarities are over compared pairs that have them."""
    counts = Counter(p.status for p in pairs)
    compared = [p for p in pairs if p.status == COMPARED]
    return {
        "tool": "gradcam-cli",
        "version": __version__,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "a": folders[0],
        "b": folders[1],
        "top": top,
        "maps": dict(Counter(p.source or "none" for p in compared)),
        "counts": {
            "images": len({p.path for p in pairs}),
            "pairs": len(pairs),
            **{s: counts.get(s, 0) for s in STATUSES},
        },
        "flips": _flips([p for p in compared if p.slot == 0]),
        "similarity": {m: distribution([p.values[m] for p in compared if m in p.values]) for m in MEASURES},
        "per_class": _per_class(compared),
        "least_similar": _least_similar(compared, worst),
        "settings": settings_compared(*runs),
    }


def _by_class(pairs: Sequence[Pair], column: str) -> list[tuple[str, list[Pair]]]:
    """Pairs grouped by A's value of `column` (a class name), the groups in case-insensitive name order."""
    groups: dict[str, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(_get(p.a, column), []).append(p)
    return sorted(groups.items(), key=lambda kv: kv[0].lower())


def _flips(first: Sequence[Pair]) -> dict[str, Any]:
    """How many images changed their top-1 class, overall and by A's predicted class."""
    judged = [p for p in first if flipped(p) is not None]

    def block(ps: Sequence[Pair]) -> dict[str, Any]:
        n = sum(bool(flipped(p)) for p in ps)
        return {"images": len(ps), "flipped": n, "rate": rounded(n / len(ps)) if ps else None}

    per_class = [{"class": name, **block(ps)} for name, ps in _by_class(judged, "pred_label")]
    return {**block(judged), "per_class": per_class}


def _per_class(compared: Sequence[Pair]) -> list[dict[str, Any]]:
    """The mean of each measure by A's target class."""
    return [
        {
            "class": name,
            "pairs": len(ps),
            **{f"mean_{m}": _mean([p.values[m] for p in ps if m in p.values]) for m in MEASURES},
        }
        for name, ps in _by_class(compared, "target_label")
    ]


def _least_similar(compared: Sequence[Pair], worst: int) -> list[dict[str, Any]]:
    """The `worst` pairs with the lowest Spearman (SSIM where Spearman is undefined)."""
    measured = [p for p in compared if "spearman" in p.values or "ssim" in p.values]
    least = sorted(measured, key=lambda p: (p.values.get("spearman", p.values.get("ssim", 0.0)), p.path, p.slot))
    return [
        {
            "path": p.path,
            "slot": p.slot,
            "pred_a": _get(p.a, "pred_label"),
            "pred_b": _get(p.b, "pred_label"),
            **{m: rounded(p.values[m]) for m in MEASURES if m in p.values},
        }
        for p in least[:worst]
    ]


def _mean(values: Sequence[float]) -> float | None:
    return rounded(statistics.fmean(values)) if values else None
