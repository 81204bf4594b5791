"""How well cell types come out on a lab's own labelled smears, end to end (detector, crops,
captioner, parser): ``hemcap eval-smears DIR --labels CSV --model M --out OUT``.

The labels are a CSV, one row per labelled white cell, either

- ``image,cell_type``: every cell found on that image is of that type (BCCD gives its types so:
  one white cell per smear), or
- ``image,cell_type,x0,y0,x1,y1``: the cell's box in pixels; each labelled box is matched to the
  detected cell overlapping it most (IoU >= 0.5), and a box no detection matches counts as
  ``missed``.

``image`` is the file name (folders ignored); cell types are the model schema's values, in any
case. Scored per labelled cell: accuracy, balanced accuracy (mean recall over the types present,
so a constant answer scores 1 / types), recall per type and the confusion table, with the
caption naming no type counted as ``unclassified``.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from hemcap.smear.detect import Box
from hemcap.smear.report import UNCLASSIFIED, SmearReport

MISSED = "missed"  # a labelled box no detected cell matched
MATCH_IOU = 0.5


@dataclass(frozen=True)
class TypeLabel:
    """One labelled white cell: its type (a schema value) and, when given, its box."""

    cell_type: str
    box: Box | None = None


def read_type_labels(path: str | Path, cell_types: Sequence[str]) -> dict[str, list[TypeLabel]]:
    """Image file name -> its labelled cells; every problem in the file reported at once (row, value)."""
    path = Path(path)
    canonical = {name.lower(): name for name in cell_types}
    labels: dict[str, list[TypeLabel]] = {}
    problems: list[str] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"image", "cell_type"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: needs columns image and cell_type (and x0,y0,x1,y1 for boxes); "
                             f"missing {sorted(missing)}")
        for number, row in enumerate(reader, 2):
            label = _label(row, canonical, f"{path}, row {number}", problems)
            if label:
                labels.setdefault(Path(row["image"].strip()).name, []).append(label)
    if problems:
        raise ValueError("; ".join(problems))
    return labels


def _label(row: dict, canonical: dict[str, str], where: str, problems: list[str]) -> TypeLabel | None:
    cell_type = canonical.get((row.get("cell_type") or "").strip().lower())
    if cell_type is None:
        problems.append(f"{where}: cell type {row.get('cell_type')!r} is not one of {sorted(canonical.values())}")
        return None
    corners = [row.get(k) for k in ("x0", "y0", "x1", "y1")]
    if not any(c not in (None, "") for c in corners):
        return TypeLabel(cell_type)
    try:
        x0, y0, x1, y1 = (float(c) for c in corners)
    except (TypeError, ValueError):
        problems.append(f"{where}: box {corners} is not four numbers")
        return None
    if not (x1 > x0 and y1 > y0):
        problems.append(f"{where}: box {corners} has no area (x1 > x0 and y1 > y0 needed)")
        return None
    return TypeLabel(cell_type, (x0, y0, x1, y1))


def labelled_pairs(report: SmearReport, labels: Sequence[TypeLabel]) -> list[tuple[str, str]]:
    """(labelled type, type the report gives) per labelled cell of one image."""
    if all(label.box is None for label in labels):
        types = {label.cell_type for label in labels}
        if len(types) > 1:
            raise ValueError(f"{report.image}: image-level labels of several types {sorted(types)}: give boxes")
        return [(labels[0].cell_type, report.cell_type(cell)) for cell in report.cells]
    return _matched(report, [label for label in labels if label.box is not None])


def _matched(report: SmearReport, labels: Sequence[TypeLabel]) -> list[tuple[str, str]]:
    """Greedy one-to-one matching, best overlaps first."""
    overlaps = sorted(((_iou(label.box, cell.box), i, j) for i, label in enumerate(labels)
                       for j, cell in enumerate(report.cells) if cell.box), reverse=True)
    predicted: dict[int, str] = {}
    used: set[int] = set()
    for iou, i, j in overlaps:
        if iou >= MATCH_IOU and i not in predicted and j not in used:
            predicted[i] = report.cell_type(report.cells[j])
            used.add(j)
    return [(label.cell_type, predicted.get(i, MISSED)) for i, label in enumerate(labels)]


def _iou(a: Box, b: Box) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(pairs: Iterable[tuple[str, str]]) -> dict:
    """Accuracy, balanced accuracy, recall per labelled type and the confusion table of (true, predicted) pairs."""
    pairs = list(pairs)
    confusion: dict[str, Counter] = {}
    for true, predicted in pairs:
        confusion.setdefault(true, Counter())[predicted] += 1
    recall = {true: row[true] / sum(row.values()) for true, row in sorted(confusion.items())}
    correct = sum(true == predicted for true, predicted in pairs)
    return {"cells": len(pairs), "accuracy": correct / len(pairs) if pairs else math.nan,
            "balanced_accuracy": sum(recall.values()) / len(recall) if recall else math.nan,
            "recall": recall, "confusion": {true: dict(row) for true, row in sorted(confusion.items())},
            "missed": sum(predicted == MISSED for _, predicted in pairs)}


def confusion_lines(scores: dict, cell_types: Sequence[str]) -> list[str]:
    """The confusion table in Markdown: a row per labelled type, a column per answer."""
    answers = [*cell_types, UNCLASSIFIED, MISSED]
    used = [a for a in answers if any(a in row for row in scores["confusion"].values())]
    lines = [f"| labelled \\ given | {' | '.join(used)} | recall |", "|---" * (len(used) + 2) + "|"]
    for true, row in scores["confusion"].items():
        counts = " | ".join(str(row.get(answer, 0)) for answer in used)
        lines.append(f"| {true} | {counts} | {scores['recall'][true]:.1%} |")
    return lines


def evaluate_smears(paths: Iterable[str | Path], labels_path: str | Path, out_dir: str | Path, pipeline,
                    overwrite: bool = False) -> dict:
    """Report on every image (``process_images``: ``<out>/reports``, resumable), score the labelled
    ones, write ``<out>/cell_types.json`` and return the scores with the images left unscored."""
    from hemcap.fileio import write_json
    from hemcap.smear.batch import process_images
    from hemcap.smear.report import read_report

    out_dir = Path(out_dir)
    labels = read_type_labels(labels_path, pipeline.cell_types)
    summary = process_images(paths, out_dir / "reports", pipeline, kind="smear", overwrite=overwrite)
    pairs, reported = [], {Path(row["image"]).name: row for row in summary["per_image"]}
    for name in sorted(set(reported) & set(labels)):
        pairs += labelled_pairs(read_report(out_dir / "reports" / reported[name]["report"]), labels[name])
    scores = {**score(pairs), "images": len(set(reported) & set(labels)),
              "unlabelled_images": sorted(set(reported) - set(labels)),
              "labels_without_image": sorted(set(labels) - set(reported)), "problems": summary["problems"]}
    write_json(out_dir / "cell_types.json", scores)
    return scores
