"""Faithfulness: each generated caption parsed and compared with the reference attributes, field by
field, beside the majority-class baseline (definitions in ``hemcap.metrics``' docstring)."""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from hemcap.captions import parse
from hemcap.metrics.predictions import PredictionsError, check_attribute_rows
from hemcap.schema import Schema, get_schema

OMITTED, CONTRADICTED = "(omitted)", "(contradicted)"
FIELD_METRICS = ("accuracy", "stated_accuracy", "coverage", "contradiction_rate", "macro_f1")


def faithfulness_metrics(
    captions: Sequence[str | Mapping],
    reference_attributes: Sequence[Mapping[str, str]],
    schema: str | Schema = "wbcatt",
    *,
    baseline_attributes: Sequence[Mapping[str, str]] | None = None,
    human_ceiling: Mapping | None = None,
) -> dict:
    """Per-field faithfulness of ``captions`` to ``reference_attributes`` (see module docstring).

    ``captions`` are generated captions, or their `parse` results when already at hand.
    ``baseline_attributes``: training-split labels for the majority-class baseline (default: the
    references themselves). ``human_ceiling``: `human_agreement`'s result.
    """
    schema = get_schema(schema)
    if len(captions) != len(reference_attributes):
        raise PredictionsError(f"{len(captions)} captions but {len(reference_attributes)} reference attribute rows")
    if not captions:
        raise PredictionsError("no captions to score")
    check_attribute_rows(reference_attributes, schema, "reference attributes", first_line=0)
    if baseline_attributes is not None:
        check_attribute_rows(baseline_attributes, schema, "baseline labels", first_line=0)
    parsed = [c if isinstance(c, Mapping) else parse(c or "", schema) for c in captions]
    baseline_rows = baseline_attributes or reference_attributes
    fields = {}
    for name in schema.field_names:
        truth = [row[name] for row in reference_attributes]
        fields[name] = field_scores(name, truth, parsed, schema.values(name))
        fields[name] |= majority_baseline([row[name] for row in baseline_rows], truth, schema.values(name))
        fields[name]["human_ceiling"] = (human_ceiling or {}).get("fields", {}).get(name)
    return {
        "fields": fields,
        "attribute_mean": _mean_over(fields, schema.attribute_names),
        "attributes": list(schema.attribute_names),
        "targets": list(schema.targets),
        "n": len(captions),
        "baseline_source": "training labels" if baseline_attributes else "references (no training labels given)",
        "human_ceiling_source": (human_ceiling or {}).get("source"),
    }


def field_scores(name: str, truth: Sequence[str], parsed: Sequence[Mapping], values: Sequence[str]) -> dict:
    """Accuracy, stated accuracy, coverage, contradiction rate, macro-F1 and confusion for one field."""
    predicted = [predicted_label(p, name) for p in parsed]
    n = len(truth)
    correct = sum(t == p for t, p in zip(truth, predicted))
    mentioned = sum(p != OMITTED for p in predicted)
    matrix = confusion_matrix(truth, predicted, values)
    return {
        "accuracy": correct / n,
        "stated_accuracy": correct / mentioned if mentioned else None,
        "coverage": mentioned / n,
        "contradiction_rate": predicted.count(CONTRADICTED) / n,
        "macro_f1": macro_f1(matrix),
        "n": n,
        "n_mentioned": mentioned,
        "n_correct": correct,
        "confusion": {"values": list(values), "columns": [*values, OMITTED, CONTRADICTED], "matrix": matrix.tolist()},
    }


def predicted_label(parsed: Mapping, name: str) -> str:
    """What a parsed caption states for field ``name``: its value, ``(contradicted)`` or ``(omitted)``."""
    if parsed.get(name) is not None:
        return parsed[name]
    return CONTRADICTED if name in getattr(parsed, "contradictions", {}) else OMITTED


def confusion_matrix(truth: Sequence[str], predicted: Sequence[str], values: Sequence[str]) -> np.ndarray:
    """Counts: rows are ``values`` (true), columns ``values`` then omitted then contradicted."""
    columns = {v: i for i, v in enumerate([*values, OMITTED, CONTRADICTED])}
    rows = {v: i for i, v in enumerate(values)}
    matrix = np.zeros((len(values), len(columns)), dtype=np.int64)
    for t, p in zip(truth, predicted):
        matrix[rows[t], columns[p]] += 1
    return matrix


def macro_f1(matrix: np.ndarray) -> float:
    """Mean F1 over values that occur as truth or prediction (sklearn's macro average over those).

    ``matrix`` is a `confusion_matrix`: its extra columns count as misses of the row's value.
    """
    k = matrix.shape[0]
    tp = np.diag(matrix[:, :k]).astype(float)
    true_count = matrix.sum(axis=1)
    predicted_count = matrix[:, :k].sum(axis=0)
    present = (true_count + predicted_count) > 0
    if not present.any():
        return 0.0
    f1 = 2 * tp[present] / (true_count[present] + predicted_count[present])
    return float(f1.mean())


def majority_baseline(baseline_labels: Sequence[str], truth: Sequence[str], values: Sequence[str]) -> dict:
    """Always answering the most frequent baseline label: its value, accuracy and macro-F1 on ``truth``."""
    counts = Counter(baseline_labels)
    # Ties go to schema order, so the baseline does not depend on row order.
    value = max(values, key=lambda v: (counts[v], -values.index(v)))
    matrix = confusion_matrix(truth, [value] * len(truth), values)
    return {
        "majority_value": value,
        "majority_accuracy": sum(t == value for t in truth) / len(truth),
        "majority_macro_f1": macro_f1(matrix),
    }


def _mean_over(fields: Mapping[str, Mapping], names: Sequence[str]) -> dict:
    keys = (*FIELD_METRICS, "majority_accuracy", "majority_macro_f1", "human_ceiling")
    mean = {}
    for key in keys:
        values = [fields[n][key] for n in names if fields[n].get(key) is not None]
        mean[key] = float(np.mean(values)) if len(values) == len(names) and values else None
    return mean
