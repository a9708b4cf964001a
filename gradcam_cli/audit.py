"""Audit an explain output folder: summary.json (counts, accuracy, confusions, per-class means, worst images)
and CI gates. Reads only what `explain` wrote (predictions.csv, run.json) plus ground truth; never torch.

Ground truth (`truth`): `auto` (default) uses a `labels.csv` (columns `path,label`, paths relative to that
folder) found in an input folder, else the images' parent-folder names when every image sits in a folder named
after one of the model's classes (ImageFolder layout); `folders` forces the folder names; `none` turns it off;
any other value is a CSV file of `path,label`. A label is a class name or index.

Gates: `fail_under` keys are higher-is-better (accuracy, pointing hit rate, mean energy-in-box, mean insertion
AUC, increase-in-confidence rate), `fail_over` keys lower-is-better (mean deletion AUC, Average Drop %). A gate
on a metric the folder has no column for is a usage error (exit 2); a gate whose metric has a column but no
values (no annotated image of an explained class, say) fails: a gate that cannot be measured must not pass.
"""

from __future__ import annotations

import csv
import json
import math
import posixpath
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gradcam_cli import __version__
from gradcam_cli.annotations import LabelResolver
from gradcam_cli.config import Settings
from gradcam_cli.errors import GradcamError
from gradcam_cli.sinks import atomic_write, read_manifest, read_predictions

# column -> True when lower values are better (the worst images are the highest)
METRIC_DIRECTIONS: dict[str, bool] = {
    "deletion_auc": True,
    "insertion_auc": False,
    "avg_drop": True,
    "increase": False,
    "pointing_hit": False,
    "energy_in_box": False,
}
# gate key -> where its value comes from in the summary, and the column it needs
GATE_SOURCES: dict[str, str | None] = {
    "accuracy": None,
    "pointing": "pointing_hit",
    "energy": "energy_in_box",
    "insertion": "insertion_auc",
    "increase": "increase",
    "deletion": "deletion_auc",
    "drop": "avg_drop",
}
GATE_HINTS = {
    "pointing": "--metrics pointing with --boxes/--masks",
    "energy": "--metrics energy with --boxes/--masks",
    "insertion": "--metrics insertion",
    "increase": "--metrics drop",
    "deletion": "--metrics deletion",
    "drop": "--metrics drop",
}
SUMMARY_NAME = "summary.json"
CONFUSIONS = 10


# ------------------------------------------------------------------------------------------------- truth


@dataclass
class Truth:
    """Ground-truth labels by image path; `source` says where they came from (None: not known)."""

    source: str | None = None
    by_path: dict[str, str] = field(default_factory=dict)
    folders: bool = False

    @property
    def known(self) -> bool:
        return self.source is not None

    def label_for(self, rel: str) -> str | None:
        if self.folders:
            parent = posixpath.basename(posixpath.dirname(rel))
            return parent or None
        found = self.by_path.get(rel)
        if found is None:
            found = self.by_path.get(posixpath.splitext(rel)[0])
        return found


def read_truth_csv(path: Path) -> dict[str, str]:
    """`path,label` CSV (header required) -> {path: label}; the path without its extension matches too."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise GradcamError(f"--truth {path}: cannot read ({exc})") from None
    reader = csv.DictReader(text.splitlines())
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if "path" not in header or "label" not in header:
        raise GradcamError(f"--truth {path}: expected a header row with columns path,label")
    reader.fieldnames = header
    table: dict[str, str] = {}
    for line, row in enumerate(reader, start=2):
        rel, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not rel or not label:
            raise GradcamError(f"--truth {path} line {line}: empty path or label")
        key = posixpath.normpath(rel.replace("\\", "/"))
        table[key] = label
        table.setdefault(posixpath.splitext(key)[0], label)
    return table


def resolve_truth(spec: str, input_roots: Sequence[str], labels: Sequence[str], rels: Iterable[str] = ()) -> Truth:
    """`truth` setting -> Truth. See the module docstring for `auto`; `rels` are the image paths (for `auto`)."""
    if spec == "none":
        return Truth()
    if spec == "folders":
        return Truth(source="folders", folders=True)
    if spec != "auto":
        path = Path(spec)
        if not path.is_file():
            raise GradcamError(f"--truth {spec}: not auto, folders, none or an existing CSV file of path,label")
        return Truth(source=str(path), by_path=read_truth_csv(path))
    for root in input_roots:
        candidate = Path(root) / "labels.csv"
        if Path(root).is_dir() and candidate.is_file():
            return Truth(source=str(candidate), by_path=read_truth_csv(candidate))
    parents = {posixpath.basename(posixpath.dirname(rel)) for rel in rels}
    if parents and "" not in parents and labels:
        resolver = LabelResolver(labels)
        if all(resolver.resolve_optional(name) is not None and not name.isdigit() for name in parents):
            return Truth(source="folders", folders=True)
    return Truth()


# ------------------------------------------------------------------------------------------------- gates


@dataclass(frozen=True)
class Gate:
    """One CI gate: `key` compared with `threshold`; op `>=` (fail under) or `<=` (fail over)."""

    key: str
    op: str
    threshold: float

    @property
    def flag(self) -> str:
        return f"--fail-{'under' if self.op == '>=' else 'over'} {self.key}={self.threshold:g}"


@dataclass
class GateResult:
    gate: Gate
    value: float | None
    passed: bool

    @property
    def margin(self) -> float | None:
        """How far inside (positive) or outside (negative) the limit the value is."""
        if self.value is None:
            return None
        return self.value - self.gate.threshold if self.gate.op == ">=" else self.gate.threshold - self.value

    def message(self) -> str:
        g = self.gate
        if self.value is None:
            return f"gate failed: {g.key} has no values to check ({g.flag})"
        if self.passed:
            return f"gate passed: {g.key} = {self.value:.4f} ({g.flag})"
        side = "below the minimum" if g.op == ">=" else "above the maximum"
        return (
            f"gate failed: {g.key} = {self.value:.4f}, {side} {g.threshold:g} by {abs(self.margin or 0):.4f} ({g.flag})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "gate": self.gate.flag,
            "key": self.gate.key,
            "op": self.gate.op,
            "threshold": self.gate.threshold,
            "value": _round(self.value),
            "passed": self.passed,
            "margin": _round(self.margin),
        }


def gates_from(fail_under: Iterable[tuple[str, float]], fail_over: Iterable[tuple[str, float]]) -> list[Gate]:
    """Validated (key, value) pairs (config.Settings.fail_under/fail_over) -> gates, under first."""
    return [Gate(k, ">=", v) for k, v in fail_under] + [Gate(k, "<=", v) for k, v in fail_over]


# ----------------------------------------------------------------------------------------------- summary


@dataclass
class AuditResult:
    """The summary (as written to summary.json), the gate results, and where it was written."""

    summary: dict[str, Any]
    gates: list[GateResult]
    path: Path | None = None
    errors: int = 0

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    @property
    def exit_code(self) -> int:
        """3 when a gate failed (it wins), else 1 when the folder has error rows, else 0."""
        if self.failed_gates:
            return 3
        return 1 if self.errors else 0


def _float(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _stats(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "mean": None, "median": None, "min": None, "max": None}
    return {
        "count": len(values),
        "mean": _round(statistics.fmean(values)),
        "median": _round(statistics.median(values)),
        "min": _round(min(values)),
        "max": _round(max(values)),
    }


def _mean(values: Sequence[float]) -> float | None:
    return _round(statistics.fmean(values)) if values else None


def summarize(
    header: Sequence[str],
    rows: Sequence[Mapping[str, str]],
    truth: Truth,
    labels: Sequence[str] = (),
    worst: int = 10,
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary of an output folder's rows; pure (no files), so tests and `report` can call it directly.

    Image-level numbers (counts, accuracy) count each path once (its first row: several targets or layers give
    several rows with the same prediction); metric numbers are over rows (each map is one measurement).
    Accuracy counts `ok` and `skipped` rows (both carry the prediction); `error` rows have none.
    """
    metric_cols = [c for c in METRIC_DIRECTIONS if c in header]
    resolver = LabelResolver(labels) if labels else None
    first: dict[str, Mapping[str, str]] = {}
    status_counts: Counter[str] = Counter()
    for row in rows:
        if row.get("path", "") not in first:
            first[row.get("path", "")] = row
            status_counts[row.get("status", "")] += 1

    # ground truth: accuracy and the most frequent confusions
    truth_block: dict[str, Any] = {"source": truth.source}
    truth_of: dict[str, tuple[str, bool]] = {}  # path -> (truth class name, correct)
    if truth.known:
        confusions: Counter[tuple[str, str]] = Counter()
        for rel, row in first.items():
            if row.get("status") not in ("ok", "skipped") or row.get("pred_index", "") == "":
                continue
            label = truth.label_for(rel)
            if label is None:
                continue
            name, correct = _judge(label, row, resolver, labels)
            truth_of[rel] = (name, correct)
            if not correct:
                confusions[(name, row.get("pred_label", ""))] += 1
        correct_n = sum(1 for _, ok in truth_of.values() if ok)
        truth_block.update(
            images=len(truth_of),
            correct=correct_n,
            accuracy=_round(correct_n / len(truth_of)) if truth_of else None,
            top_confusions=[
                {"truth": t, "predicted": p, "count": n}
                for (t, p), n in sorted(confusions.items(), key=lambda kv: (-kv[1], kv[0]))[:CONFUSIONS]
            ],
        )

    ok_rows = [r for r in rows if r.get("status") == "ok"]
    values = {col: [(r, v) for r in ok_rows if (v := _float(r.get(col))) is not None] for col in metric_cols}

    # per class: rows grouped by the explained (target) class; truth images grouped by their true class
    per_class: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return per_class.setdefault(name, {"class": name, "rows": 0, "_probs": [], **{c: [] for c in metric_cols}})

    for r in ok_rows:
        e = entry(r.get("target_label", ""))
        e["rows"] += 1
        if (p := _float(r.get("target_prob"))) is not None:
            e["_probs"].append(p)
        for col in metric_cols:
            if (v := _float(r.get(col))) is not None:
                e[col].append(v)
    for name, correct in truth_of.values():
        e = entry(name)
        e["truth_images"] = e.get("truth_images", 0) + 1
        e["correct"] = e.get("correct", 0) + int(correct)
    classes = []
    for name in sorted(per_class, key=str.lower):
        e = per_class[name]
        out: dict[str, Any] = {"class": name, "rows": e["rows"], "mean_target_prob": _mean(e["_probs"])}
        for col in metric_cols:
            out[f"mean_{col}" if col != "pointing_hit" else "pointing_hit_rate"] = _mean(e[col])
            out[f"count_{col}"] = len(e[col])
        if truth.known:
            n = e.get("truth_images", 0)
            out["truth_images"] = n
            out["accuracy"] = _round(e.get("correct", 0) / n) if n else None
        classes.append(out)

    worst_block: dict[str, list[dict[str, Any]]] = {}
    for col in metric_cols:
        if col == "increase":
            continue  # a 0/1 flag: "worst" would be an arbitrary list of zeros
        lower_better = METRIC_DIRECTIONS[col]
        ranked = sorted(values[col], key=lambda rv: ((-rv[1] if lower_better else rv[1]), rv[0].get("path", "")))
        if col == "pointing_hit":
            ranked = [rv for rv in ranked if rv[1] == 0]
        worst_block[col] = [
            {
                "path": r.get("path", ""),
                "target_label": r.get("target_label", ""),
                "layer": r.get("layer", ""),
                "value": _round(v),
                "overlay": r.get("overlay", ""),
            }
            for r, v in ranked[:worst]
        ]

    pointing = values.get("pointing_hit", [])
    hits = sum(1 for _, v in pointing if v >= 0.5)
    summary: dict[str, Any] = {
        "tool": "gradcam-cli",
        "version": __version__,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {k: run.get(k) for k in ("model", "weights", "layers", "method", "targets", "audit")} if run else {},
        "counts": {
            "images": len(first),
            "rows": len(rows),
            "ok": status_counts.get("ok", 0),
            "error": status_counts.get("error", 0),
            "skipped": status_counts.get("skipped", 0),
        },
        "ground_truth": truth_block,
        "metrics": {col: _stats([v for _, v in values[col]]) for col in metric_cols},
        "pointing": (
            {"hits": hits, "annotated": len(pointing), "hit_rate": _round(hits / len(pointing)) if pointing else None}
            if "pointing_hit" in metric_cols
            else None
        ),
        "per_class": classes,
        "worst": worst_block,
    }
    return summary


def _judge(
    label: str, row: Mapping[str, str], resolver: LabelResolver | None, labels: Sequence[str]
) -> tuple[str, bool]:
    """(truth class name, prediction correct?) for a label that is a class name or index."""
    index = resolver.resolve_optional(label) if resolver is not None else None
    if index is not None and index >= 0:
        name = labels[index] if index < len(labels) else str(index)
        return name, str(index) == row.get("pred_index", "")
    norm = " ".join(label.replace("_", " ").lower().split())
    pred = " ".join(row.get("pred_label", "").replace("_", " ").lower().split())
    return label, norm == pred or label == row.get("pred_index", "")


def gate_value(summary: Mapping[str, Any], key: str) -> float | None:
    """The summary number a gate compares: accuracy, pointing hit rate, or the mean of a metric column."""
    if key == "accuracy":
        return summary["ground_truth"].get("accuracy")
    if key == "pointing":
        return (summary.get("pointing") or {}).get("hit_rate")
    column = GATE_SOURCES[key]
    stats = summary["metrics"].get(column) or {}
    return stats.get("mean")


def check_gates(summary: Mapping[str, Any], header: Sequence[str], gates: Sequence[Gate]) -> list[GateResult]:
    """Evaluate gates; a gate on a column the folder does not have (or accuracy without truth) raises (exit 2)."""
    results = []
    for gate in gates:
        column = GATE_SOURCES[gate.key]
        if column is not None and column not in header:
            raise GradcamError(
                f"{gate.flag}: predictions.csv has no {column} column (run explain with {GATE_HINTS[gate.key]})"
            )
        if gate.key == "accuracy" and not summary["ground_truth"].get("source"):
            raise GradcamError(
                f"{gate.flag}: no ground truth (a labels.csv of path,label in the input folder, --truth folders "
                "or --truth FILE)"
            )
        value = gate_value(summary, gate.key)
        passed = value is not None and (value >= gate.threshold if gate.op == ">=" else value <= gate.threshold)
        results.append(GateResult(gate, value, passed))
    return results


def load_folder(out_dir: Path) -> tuple[list[str], list[dict[str, str]], dict[str, Any]]:
    """(CSV header, rows, run.json) of an explain output folder; a folder that is not one is a usage error."""
    if not out_dir.is_dir():
        raise GradcamError(f"{out_dir}: no such folder")
    if not (out_dir / "predictions.csv").is_file():
        raise GradcamError(f"{out_dir}: no predictions.csv here; is it the -o folder of `gradcam explain`?")
    try:
        header, rows = read_predictions(out_dir)
    except (OSError, csv.Error) as exc:
        raise GradcamError(f"{out_dir / 'predictions.csv'}: cannot read ({exc})") from None
    if "path" not in header or "status" not in header:
        raise GradcamError(f"{out_dir / 'predictions.csv'}: not a gradcam predictions file (no path/status columns)")
    return header, rows, read_manifest(out_dir)


def audit(
    out: str | Path,
    truth: str | Truth = "auto",
    worst: int = 10,
    gates: Sequence[Gate] = (),
    labels: Sequence[str] | None = None,
    write: bool = True,
) -> AuditResult:
    """Summarise the explain output folder `out` into `out/summary.json` and check `gates`.

    `labels` default to the class names recorded in run.json; `truth` is a `truth` setting or a resolved Truth.
    """
    out_dir = Path(out)
    header, rows, run = load_folder(out_dir)
    names = list(labels) if labels is not None else [str(x) for x in run.get("labels") or []]
    if isinstance(truth, str):
        truth = resolve_truth(truth, [str(r) for r in run.get("input_roots") or []], names, (r["path"] for r in rows))
    summary = summarize(header, rows, truth, names, worst, run)
    results = check_gates(summary, header, gates)
    summary["gates"] = [g.to_json() for g in results]
    summary["passed"] = all(g.passed for g in results)
    path = None
    if write:
        path = out_dir / SUMMARY_NAME
        atomic_write(path, (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return AuditResult(summary=summary, gates=results, path=path, errors=summary["counts"]["error"])


def summary_lines(result: AuditResult) -> list[str]:
    """A few human lines for the terminal: counts, accuracy, pointing, metric means."""
    s = result.summary
    c = s["counts"]
    lines = [f"{c['images']} images: {c['ok']} ok, {c['error']} failed, {c['skipped']} skipped ({c['rows']} rows)"]
    gt = s["ground_truth"]
    if gt.get("source"):
        acc = gt.get("accuracy")
        shown = "n/a" if acc is None else f"{acc:.4f}"
        lines.append(f"accuracy {shown} ({gt['correct']}/{gt['images']}, ground truth: {gt['source']})")
        for conf in gt.get("top_confusions", [])[:3]:
            lines.append(f"  confused {conf['truth']} -> {conf['predicted']}: {conf['count']}")
    if s.get("pointing"):
        p = s["pointing"]
        rate = "n/a" if p["hit_rate"] is None else f"{p['hit_rate']:.4f}"
        lines.append(f"pointing hit rate {rate} ({p['hits']}/{p['annotated']} annotated maps)")
    for col, st in s["metrics"].items():
        if col != "pointing_hit" and st["count"]:
            lines.append(f"{col} mean {st['mean']:.4f} (median {st['median']:.4f}, {st['count']} maps)")
    if result.path is not None:
        lines.append(f"summary -> {result.path}")
    return lines


@dataclass
class AuditPlan:
    """What `explain --summary` (or a gate) will audit once the run is done; made before the run so that a gate
    that cannot be evaluated (accuracy without ground truth) stops it before any work."""

    truth: Truth
    gates: list[Gate]
    worst: int
    labels: list[str]

    def run(self, out: str | Path) -> AuditResult:
        return audit(out, truth=self.truth, worst=self.worst, gates=self.gates, labels=self.labels)


def prepare_audit(
    settings: Settings, input_roots: Sequence[str], labels: Sequence[str], files: Iterable[Any]
) -> AuditPlan | None:
    """An AuditPlan when `settings` ask for a summary or a gate, else None. `files` have a `.rel`."""
    if not (settings.summary or settings.fail_under or settings.fail_over):
        return None
    truth = resolve_truth(settings.truth, input_roots, labels, (f.rel for f in files))
    if any(key == "accuracy" for key, _ in settings.fail_under) and not truth.known:
        raise GradcamError(
            "--fail-under accuracy=...: no ground truth (put a labels.csv of path,label in the input folder, "
            "name the folders after the classes with --truth folders, or pass --truth FILE)"
        )
    return AuditPlan(truth, gates_from(settings.fail_under, settings.fail_over), settings.worst, list(labels))
