"""Morphological faithfulness of generated captions, as a local `evaluate` module.

    import evaluate
    faith = evaluate.load("eval/metrics/hemcap_faithfulness")  # config_name="leukemiaattri" for LLD
    faith.compute(predictions=["Band neutrophil, large and round, ..."], references=["Neutrophil, ..."])

Each caption is parsed with `hemcap.captions.parse` and compared field by field with the
reference attributes (parsed from the reference captions, or given as ``reference_attributes``).
Wraps `hemcap.metrics.faithfulness_metrics`; definitions are in that module's docstring. Needs
hemcap installed.
"""

import datasets
import evaluate

from hemcap.captions import parse
from hemcap.metrics import faithfulness_metrics, human_agreement, read_label_rows
from hemcap.schema import get_schema

_KWARGS_DESCRIPTION = """
Args:
    predictions: generated captions, one string per image ("" = nothing stated).
    references: one reference caption per image; its parse gives the reference attributes.
    reference_attributes: optional list of dicts (field -> value) used instead of parsing references.
    schema: schema name or YAML path (default: the config name, or "wbcatt").
    baseline_labels: training labels for the majority baseline (list of dicts, CSV or dataset folder).
    reannotations: second-annotator CSV for the human ceiling (WBCAtt layout).
Returns:
    accuracy, stated_accuracy, coverage, contradiction_rate, macro_f1 (means over attributes),
    <target>_accuracy for each target (e.g. cell_type_accuracy), and `fields` with every
    per-field figure, majority baseline, human ceiling and confusion matrix.
"""


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class HemcapFaithfulness(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Tsutsui, Pang, Wen: WBCAtt, NeurIPS 2023 Datasets and Benchmarks.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, reference_attributes=None, schema=None,
                 baseline_labels=None, reannotations=None):
        schema = get_schema(schema or (self.config_name if self.config_name != "default" else "wbcatt"))
        truth = reference_attributes or [_reference_attributes(r, i, schema) for i, r in enumerate(references)]
        if isinstance(baseline_labels, str):
            baseline_labels = read_label_rows(baseline_labels, schema)
        ceiling = human_agreement(reannotations, schema=schema) if reannotations else None
        result = faithfulness_metrics(predictions, truth, schema, baseline_attributes=baseline_labels,
                                      human_ceiling=ceiling)
        summary = {k: v for k, v in result["attribute_mean"].items()}
        summary |= {f"{t}_accuracy": result["fields"][t]["accuracy"] for t in result["targets"]}
        return summary | {"fields": result["fields"], "baseline_source": result["baseline_source"]}


def _reference_attributes(caption: str, index: int, schema) -> dict:
    parsed = parse(caption, schema)
    missing = [name for name, value in parsed.items() if value is None]
    if missing:
        raise ValueError(f"references[{index}] does not state {', '.join(missing)}; "
                         "pass reference_attributes=[{field: value}, ...] instead")
    return dict(parsed)
