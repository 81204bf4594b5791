"""Every metric of a predictions file or list: caption quality, faithfulness with its baseline and
ceiling, the parser on the references, what the confidences mean, and example captions."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from hemcap.captions import parse
from hemcap.metrics.baselines import human_agreement, parser_accuracy, read_label_rows
from hemcap.metrics.captions import caption_metrics
from hemcap.metrics.faithfulness import faithfulness_metrics, predicted_label
from hemcap.metrics.predictions import check_predictions, read_predictions
from hemcap.schema import Schema


def score_predictions(path: str | Path, **options) -> dict:
    """Every metric from a predictions.jsonl file alone; ``options`` as for `score_records`
    (baseline labels, re-annotations for the human ceiling, METEOR, BERTScore, examples)."""
    return score_records(read_predictions(path, options.get("schema")), meta={"predictions": str(path)}, **options)


def score_records(
    records: Sequence[Mapping],
    *,
    baseline_labels: str | Path | Sequence[Mapping] | None = None,
    reannotations: str | Path | None = None,
    meteor: bool | None = None,
    bertscore_model: str | Path | None = None,
    n_examples: int = 5,
    seed: int = 0,
    meta: Mapping | None = None,
    schema: Schema | None = None,
) -> dict:
    """`score_predictions` for records already in memory (checked here too); ``schema`` when the
    records name one that is not shipped (a lab's own)."""
    schema = check_predictions(list(enumerate(records, start=1)), source="predictions", schema=schema)
    if isinstance(baseline_labels, (str, Path)):
        baseline_labels = read_label_rows(baseline_labels, schema)
    ceiling = human_agreement(reannotations, schema=schema) if reannotations else None
    captions = [r["caption"] for r in records]
    references = [r["references"] for r in records]
    truth = [r["reference_attributes"] for r in records]
    caption = caption_metrics(captions, references, meteor=meteor, bertscore_model=bertscore_model,
                              with_per_caption=True)
    per_caption = caption.pop("per_caption")
    parsed = [parse(c, schema) for c in captions]
    faith = faithfulness_metrics(parsed, truth, schema, baseline_attributes=baseline_labels, human_ceiling=ceiling)
    if baseline_labels is not None:
        faith["baseline_source"] = f"training labels ({len(baseline_labels)} rows)"
    notes = caption["notes"] + _stale_attribute_notes(records, parsed)
    return {
        "schema": schema.name,
        "n": len(records),
        "meta": dict(meta or {}),
        "caption": caption,
        "faithfulness": faith,
        "human_ceiling": ceiling,
        "parser_on_references": parser_accuracy(references, truth, schema),
        "confidence": confidence_summary(records, parsed),
        "examples": select_examples(records, parsed, per_caption["cider_d"], n_examples, seed),
        "notes": notes,
    }


def confidence_summary(records: Sequence[Mapping], parsed: Sequence[Mapping]) -> dict:
    """Mean confidence of the stated fields that are right and of those that are wrong.

    A captioner whose confidences mean something scores the wrong ones lower.
    """
    right, wrong = [], []
    for record, attributes in zip(records, parsed):
        for field, confidence in record["confidences"].items():
            if confidence is not None and attributes.get(field) is not None:
                correct = attributes[field] == record["reference_attributes"][field]
                (right if correct else wrong).append(float(confidence))
    return {
        "n": len(right) + len(wrong),
        "mean_when_right": float(np.mean(right)) if right else None,
        "mean_when_wrong": float(np.mean(wrong)) if wrong else None,
    }


def _stale_attribute_notes(records: Sequence[Mapping], parsed: Sequence[Mapping]) -> list[str]:
    def stated(attributes: Mapping) -> dict:
        return {k: v for k, v in attributes.items() if v is not None}

    stale = [r["id"] for r, p in zip(records, parsed) if stated(r["attributes"]) != stated(p)]
    if not stale:
        return []
    return [f"{len(stale)} line(s) store attributes that differ from parse(caption) (e.g. {stale[:3]}); "
            "metrics use parse(caption)"]


def select_examples(records, parsed, cider_each: Sequence[float], k: int, seed: int) -> dict:
    """The ``k`` best and worst captions (share of fields right, then CIDEr-D) and ``k`` at random."""
    scored = [_example(r, p, c) for r, p, c in zip(records, parsed, cider_each)]
    order = sorted(range(len(scored)), key=lambda i: (scored[i]["fields_correct"], scored[i]["cider_d"]))
    worst = order[:k]
    best = [i for i in reversed(order[-k:]) if i not in worst]
    rest = [i for i in range(len(scored)) if i not in set(best) | set(worst)]
    sample = sorted(random.Random(seed).sample(rest, min(k, len(rest))))
    return {name: [scored[i] for i in idx] for name, idx in (("best", best), ("worst", worst), ("random", sample))}


def _example(record: Mapping, parsed: Mapping, cider: float) -> dict:
    truth = record["reference_attributes"]
    errors = {n: {"predicted": predicted_label(parsed, n), "true": truth[n]} for n in parsed if parsed[n] != truth[n]}
    return {
        "id": record["id"],
        "caption": record["caption"],
        "reference": record["references"][0],
        "fields_correct": 1 - len(errors) / len(parsed),
        "cider_d": float(cider),
        "errors": errors,
    }
