"""Audit an explain output folder: summary.json (counts, accuracy, confusions, per-class means, worst images,
with --groups the same per group and the gaps between groups) and its gates. Reads only what `explain`
wrote (predictions.csv, run.json) plus ground truth; never torch.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gradcam_cli import __version__
from gradcam_cli.audit.diff.gates import DIFF_GATE_KEYS
from gradcam_cli.audit.gates import Gate, GateResult, check_gates, gates_from
from gradcam_cli.audit.groups import MIN_COUNT, Groups, groups_summary, resolve_groups
from gradcam_cli.audit.metrics import ACCURACY, MetricColumn, columns_in, gap_gate, measured_header
from gradcam_cli.audit.numbers import RowMeans, number, rounded
from gradcam_cli.audit.truth import Truth, resolve_truth
from gradcam_cli.config import Settings
from gradcam_cli.errors import ExitCode, GradcamError
from gradcam_cli.model.labels import LabelResolver, normalized_label
from gradcam_cli.out import names
from gradcam_cli.out.files import write_json
from gradcam_cli.out.folder import OutputFolder

CONFUSIONS = 10


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
            return ExitCode.GATE_FAILED
        return ExitCode.IMAGE_ERRORS if self.errors else ExitCode.OK


def _stats(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "mean": None, "median": None, "min": None, "max": None}
    return {
        "count": len(values),
        "mean": rounded(statistics.fmean(values)),
        "median": rounded(statistics.median(values)),
        "min": rounded(min(values)),
        "max": rounded(max(values)),
    }


def summarize(
    header: Sequence[str],
    rows: Sequence[Mapping[str, str]],
    truth: Truth,
    labels: Sequence[str] = (),
    worst: int = 10,
    run: Mapping[str, Any] | None = None,
    groups: Groups | None = None,
    group_min_count: int = MIN_COUNT,
) -> dict[str, Any]:
    """The summary of an output folder's rows; pure (no files), so tests and `report` can call it directly.

    Image-level numbers (counts, accuracy) count each path once (its first row: several targets or layers give
    several rows with the same prediction); metric numbers are over rows (each map is one measurement).
    Accuracy counts `ok` and `skipped` rows (both carry the prediction); `error` rows have none. With `groups`,
    the `groups` block holds the same per group and the gaps between groups (`audit.groups.groups_summary`;
    a group needs `group_min_count` values of a number to take part in its gap); else it is null.
    """
    metric_cols = columns_in(header)
    first: dict[str, Mapping[str, str]] = {}
    for row in rows:
        first.setdefault(row.get("path", ""), row)
    status_counts = Counter(row.get("status", "") for row in first.values())
    truth_block, truth_of = _ground_truth(first, truth, labels)
    ok_rows = [r for r in rows if r.get("status") == "ok"]
    values = {c.name: [(r, v) for r in ok_rows if (v := number(r.get(c.name))) is not None] for c in metric_cols}
    pointing = values.get("pointing_hit", [])
    hits = sum(1 for _, v in pointing if v >= 0.5)
    has_pointing = any(c.name == "pointing_hit" for c in metric_cols)
    return {
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
        "metrics": {c.name: _stats([v for _, v in values[c.name]]) for c in metric_cols},
        "pointing": (
            {"hits": hits, "annotated": len(pointing), "hit_rate": rounded(hits / len(pointing)) if pointing else None}
            if has_pointing
            else None
        ),
        "per_class": _per_class(ok_rows, truth_of, metric_cols, truth.known),
        "worst": _worst(values, metric_cols, worst),
        "groups": (
            groups_summary(groups, first, ok_rows, truth_of, metric_cols, truth.known, group_min_count)
            if groups is not None
            else None
        ),
    }


def _ground_truth(
    first: Mapping[str, Mapping[str, str]], truth: Truth, labels: Sequence[str]
) -> tuple[dict[str, Any], dict[str, tuple[str, bool]]]:
    """summary.json's ground_truth block (accuracy, the most frequent confusions) and, per image path with a
    prediction and a known truth, (its true class name, whether the prediction is right)."""
    block: dict[str, Any] = {"source": truth.source}
    truth_of: dict[str, tuple[str, bool]] = {}
    if not truth.known:
        block.update(images=0, reason=truth.reason or "no ground truth")
        return block, truth_of
    resolver = LabelResolver(labels) if labels else None
    confusions: Counter[tuple[str, str]] = Counter()
    unmatched: Counter[str] = Counter()
    unlabelled = 0
    for rel, row in first.items():
        if row.get("status") not in ("ok", "skipped") or row.get("pred_index", "") == "":
            continue
        label = truth.label_for(rel)
        if label is None:
            unlabelled += 1
            continue
        judged = _judge(label, row, resolver, labels)
        if judged is None:  # a label that names no class of this model: only this image is without truth
            unmatched[label] += 1
            continue
        name, correct = judged
        truth_of[rel] = (name, correct)
        if not correct:
            confusions[(name, row.get("pred_label", ""))] += 1
    if unlabelled:
        block["without_label"] = unlabelled
    if unmatched:
        block["unmatched"] = {"images": sum(unmatched.values()), "labels": sorted(unmatched)[:CONFUSIONS]}
    correct_n = sum(1 for _, ok in truth_of.values() if ok)
    block.update(
        images=len(truth_of),
        correct=correct_n,
        accuracy=rounded(correct_n / len(truth_of)) if truth_of else None,
        top_confusions=[
            {"truth": t, "predicted": p, "count": n}
            for (t, p), n in sorted(confusions.items(), key=lambda kv: (-kv[1], kv[0]))[:CONFUSIONS]
        ],
    )
    return block, truth_of


def _per_class(
    ok_rows: Sequence[Mapping[str, str]],
    truth_of: Mapping[str, tuple[str, bool]],
    metric_cols: Sequence[MetricColumn],
    truth_known: bool,
) -> list[dict[str, Any]]:
    """One entry per class: `ok` rows grouped by the explained (target) class, truth images by their true class."""
    per_class: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return per_class.setdefault(name, {"rows": 0, "means": RowMeans(metric_cols), "truth_images": 0, "correct": 0})

    for r in ok_rows:
        e = entry(r.get("target_label", ""))
        e["rows"] += 1
        e["means"].add(r)
    for name, correct in truth_of.values():
        e = entry(name)
        e["truth_images"] += 1
        e["correct"] += int(correct)
    classes = []
    for name in sorted(per_class, key=str.lower):
        e = per_class[name]
        out: dict[str, Any] = {"class": name, "rows": e["rows"], **e["means"].entry()}
        if truth_known:
            n = e["truth_images"]
            out["truth_images"] = n
            out["accuracy"] = rounded(e["correct"] / n) if n else None
        classes.append(out)
    return classes


def _worst(
    values: Mapping[str, list[tuple[Mapping[str, str], float]]], metric_cols: Sequence[MetricColumn], worst: int
) -> dict[str, list[dict[str, Any]]]:
    """Per ranked metric column, the `worst` rows at its bad end (the pointing game: its misses)."""
    block: dict[str, list[dict[str, Any]]] = {}
    for c in metric_cols:
        if not c.ranked:
            continue
        sign = -1.0 if c.lower_is_better else 1.0
        ranked = sorted(values[c.name], key=lambda rv: (sign * rv[1], rv[0].get("path", "")))
        if c.name == "pointing_hit":
            ranked = [rv for rv in ranked if rv[1] == 0]
        block[c.name] = [
            {
                "path": r.get("path", ""),
                "target_label": r.get("target_label", ""),
                "layer": r.get("layer", ""),
                "value": rounded(v),
                "overlay": r.get("overlay", ""),
            }
            for r, v in ranked[:worst]
        ]
    return block


def _judge(
    label: str, row: Mapping[str, str], resolver: LabelResolver | None, labels: Sequence[str]
) -> tuple[str, bool] | None:
    """(truth class name, prediction correct?) for a label that is a class name, index, WordNet id or lemma list;
    None when the model has class names and the label is none of them. A model without class names is judged
    by the label's text against the predicted label or index."""
    if resolver is None:
        norm = normalized_label(label)
        return label, norm == normalized_label(row.get("pred_label", "")) or label == row.get("pred_index", "")
    index = resolver.resolve_optional(label)
    if index is None or index < 0:
        return None
    name = labels[index] if index < len(labels) else str(index)
    return name, str(index) == row.get("pred_index", "")


def audit(
    out: str | Path,
    truth: str | Truth = "auto",
    worst: int = 10,
    gates: Sequence[Gate] = (),
    labels: Sequence[str] | None = None,
    write: bool = True,
    groups: str | Groups | None = None,
    group_min_count: int | None = None,
) -> AuditResult:
    """Summarise the explain output folder `out` into `out/summary.json` and check `gates`.

    `labels` default to the class names recorded in run.json; `truth` is a `truth` setting or a resolved Truth;
    `groups` a `groups` setting (a CSV, `folders:N`, `none`) or resolved Groups, by default what run.json
    recorded (a run's groups are audited the way it was made); `group_min_count` too (else MIN_COUNT).
    """
    folder = OutputFolder(out)
    header, rows, run = folder.read()
    header = measured_header(header, run)
    class_names = list(labels) if labels is not None else [str(x) for x in run.get("labels") or []]
    if isinstance(truth, str):
        roots = [str(r) for r in run.get("input_roots") or []]
        truth = resolve_truth(truth, roots, class_names, (r["path"] for r in rows))
    groups = groups_for(groups, run, [r["path"] for r in rows])
    min_count = group_min_count or recorded_min_count(run)
    summary = summarize(header, rows, truth, class_names, worst, run, groups, min_count)
    results = check_gates(summary, header, gates)
    summary["gates"] = [g.to_json() for g in results]
    summary["passed"] = all(g.passed for g in results)
    path = None
    if write:
        path = folder.file(names.SUMMARY)
        write_json(path, summary)
    return AuditResult(summary=summary, gates=results, path=path, errors=summary["counts"]["error"])


def recorded_groups(run: Mapping[str, Any]) -> str | None:
    """The groups source run.json's `audit` block recorded (None for a run without --groups)."""
    audit_block = run.get("audit")
    found = audit_block.get("groups") if isinstance(audit_block, Mapping) else None
    return found if isinstance(found, str) else None


def groups_for(groups: str | Groups | None, run: Mapping[str, Any], rels: Sequence[str]) -> Groups | None:
    """The groups of an audit or report: `groups` as given, else the source run.json recorded (a problem with
    that one says where it came from, and how to choose another)."""
    if isinstance(groups, Groups):
        return groups
    if groups is not None:
        return resolve_groups(groups, rels)
    try:
        return resolve_groups(recorded_groups(run), rels)
    except GradcamError as exc:
        raise GradcamError(f"{exc}; it is the one run.json recorded: pass --groups FILE, folders:N or none") from None


def recorded_min_count(run: Mapping[str, Any]) -> int:
    """The group_min_count run.json's `audit` block recorded, else MIN_COUNT."""
    audit_block = run.get("audit")
    found = audit_block.get("group_min_count") if isinstance(audit_block, Mapping) else None
    return found if isinstance(found, int) and not isinstance(found, bool) and found > 0 else MIN_COUNT


def _gap_lines(summary: Mapping[str, Any]) -> list[str]:
    """One line per number with a gap between groups: its largest gap and the two groups it lies between."""
    block = summary.get("groups") or {}
    lines = []
    for key, found in (block.get("largest_gaps") or {}).items():
        if found:
            low, high = found["low"], found["high"]
            lines.append(
                f"largest {key} gap {found['gap']:.4f} by {found['attribute']}: {low['group']} {low['value']:.4f} "
                f"vs {high['group']} {high['value']:.4f}"
            )
    return lines


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
    lines.extend(_gap_lines(s))
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
    groups: Groups | None = None
    group_min_count: int = MIN_COUNT

    def run(self, out: str | Path) -> AuditResult:
        groups = self.groups if self.groups is not None else "none"
        return audit(
            out,
            truth=self.truth,
            worst=self.worst,
            gates=self.gates,
            labels=self.labels,
            groups=groups,
            group_min_count=self.group_min_count,
        )


def prepare_audit(
    settings: Settings, input_roots: Sequence[str], labels: Sequence[str], rels: Iterable[str]
) -> AuditPlan | None:
    """An AuditPlan when `settings` ask for a summary or a gate, else None.

    --groups is read and checked against the images `rels` here in any case, before the run: a groups file
    that matches no image is a usage error whether the summary is made now or by a later `gradcam audit`."""
    rels = list(rels)
    groups = resolve_groups(settings.groups, rels)
    fail_under = [(k, v) for k, v in settings.fail_under if k not in DIFF_GATE_KEYS]  # the diff checks its own
    fail_over = [(k, v) for k, v in settings.fail_over if k not in DIFF_GATE_KEYS]
    if not (settings.summary or fail_under or fail_over):
        return None
    truth = resolve_truth(settings.truth, input_roots, labels, rels)
    for flag, key in [("--fail-under", k) for k, _ in fail_under] + [("--fail-over", k) for k, _ in fail_over]:
        inner = gap_gate(key)
        if (inner[1] if inner else key) == ACCURACY and not truth.known:
            raise GradcamError(
                f"{flag} {key}=...: no ground truth (put a labels.csv of path,label in the input folder, "
                "name the folders after the classes with --truth folders, or pass --truth FILE)"
            )
    gates = gates_from(fail_under, fail_over)
    return AuditPlan(truth, gates, settings.worst, list(labels), groups, settings.group_min_count)
