"""Evaluation reports: ``metrics.json``, ``report.md`` and PNG plots, and side-by-side comparisons.

`write_report` turns `hemcap.metrics.score_predictions`' result into files a reader can check:
caption-quality table, per-attribute faithfulness table set beside the majority baseline and the
human ceiling, plots and example captions. `compare_reports` sets any number of such reports side
by side as HemBLIP's Tables 1 and 2 do (full vs LoRA, BLIP vs MedGemma, internal vs external test).
Every file is written atomically (temp file in the same folder, then rename).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from hemcap.fileio import atomic_path, write_text

CAPTION_COLUMNS = {
    "bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4",
    "cider_d": "CIDEr-D", "rouge_l": "ROUGE-L", "meteor": "METEOR",
    "bleu_hemblip": "BLEU (HemBLIP)", "bertscore_f1": "BERTScore F1",
}
FIELD_COLUMNS = {
    "accuracy": "accuracy", "stated_accuracy": "stated-only accuracy", "coverage": "coverage",
    "contradiction_rate": "contradictions", "macro_f1": "macro-F1",
    "majority_accuracy": "majority baseline", "human_ceiling": "human ceiling",
}
METRICS_FILE, REPORT_FILE, PLOTS_DIR = "metrics.json", "report.md", "plots"


class ReportError(ValueError):
    """A report folder that cannot be read (no metrics.json, unreadable JSON)."""


# ------------------------------------------------------------------------------ one report


def write_report(metrics: Mapping, out_dir: str | Path, *, plots: bool = True) -> Path:
    """Write metrics.json, report.md and (with ``plots``) PNGs under ``out_dir``; return out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_files = write_plots(metrics, out_dir / PLOTS_DIR) if plots else []
    write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    markdown = report_markdown(metrics, [p.relative_to(out_dir).as_posix() for p in plot_files])
    write_text(out_dir / REPORT_FILE, markdown)
    return out_dir


def read_metrics(report_dir: str | Path) -> dict:
    """The metrics.json of an eval report folder, with a clear error when there is none."""
    path = Path(report_dir) / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"{report_dir}: no {METRICS_FILE} (is it a `hemcap eval` or `hemcap score` report?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReportError(f"{path}: unreadable: {error}") from None


def report_markdown(metrics: Mapping, plot_files: Sequence[str] = ()) -> str:
    """The whole report.md text."""
    parts = [
        _header(metrics),
        "## Caption quality (COCO convention)\n\n" + _caption_table([metrics], [""]) + _caption_notes(metrics),
        "## Morphological faithfulness\n\n" + _faithfulness_section(metrics),
        _parser_section(metrics),
    ]
    if plot_files:
        parts.append("## Plots\n\n" + "\n".join(f"![{Path(p).stem}]({p})" for p in plot_files))
    parts.append(_examples_section(metrics.get("examples", {})))
    return "\n\n".join(parts).rstrip() + "\n"


def _header(metrics: Mapping) -> str:
    lines = [f"# Evaluation report: {_label(metrics, 'hemcap')}", ""]
    lines.append(f"- schema: `{metrics['schema']}`, {metrics['n']} captions")
    lines += [f"- {key}: `{value}`" for key, value in metrics.get("meta", {}).items()]
    return "\n".join(lines)


def _caption_notes(metrics: Mapping) -> str:
    caption = metrics["caption"]
    notes = [f"Tokenizer: {caption.get('tokenizer')}. BLEU, ROUGE-L and METEOR are fractions; "
             "CIDEr-D is on its usual 0-10 scale. BLEU (HemBLIP): NLTK sentence BLEU-4, smoothing method 4, "
             "averaged per caption."]
    notes += metrics.get("notes", [])
    return "\n\n" + "\n".join(f"- {n}" for n in notes)


def _faithfulness_section(metrics: Mapping) -> str:
    faith = metrics["faithfulness"]
    fields = faith["fields"]
    rows = [[f"`{n}`", *_field_cells(fields[n])] for n in faith["attributes"]]
    rows.append(["**mean (attributes)**", *_field_cells(faith["attribute_mean"])])
    header = ["attribute", *FIELD_COLUMNS.values(), "majority value"]
    targets = [[f"`{n}`", *_field_cells(fields[n])] for n in faith["targets"]]
    ceiling = "not computed (no re-annotation file given)"
    if metrics.get("human_ceiling"):
        ceiling = f"{metrics['human_ceiling']['source']} ({metrics['human_ceiling']['n_images']} images annotated twice)"
    return "\n".join([
        "Percentages. Accuracy counts an omitted or contradicted field as wrong (the main figure); "
        "stated-only accuracy counts only captions that mention the field (HemBLIP's convention).",
        "",
        _table(header, rows),
        "",
        "Targets, reported apart from the attribute mean:",
        "",
        _table(["target", *FIELD_COLUMNS.values(), "majority value"], targets),
        "",
        f"- majority baseline from: {faith['baseline_source']}",
        f"- human ceiling from: {ceiling}",
        _confidence_line(metrics.get("confidence") or {}),
    ]).rstrip()


def _confidence_line(confidence: Mapping) -> str:
    if not confidence.get("n"):
        return ""
    return (f"- confidence of stated fields ({confidence['n']} values): mean "
            f"{_number(confidence['mean_when_right'])} when right, {_number(confidence['mean_when_wrong'])} when wrong")


def _field_cells(values: Mapping) -> list[str]:
    cells = [_percent(values.get(key)) for key in FIELD_COLUMNS]
    return cells + [f"`{values['majority_value']}`" if values.get("majority_value") else ""]


def _parser_section(metrics: Mapping) -> str:
    parser = metrics.get("parser_on_references")
    if not parser:
        return "## Parser on the references\n\nnot computed"
    text = (f"## Parser on the references\n\n{_percent(parser['accuracy'])}% of {parser['n_captions']} "
            "reference captions parse back to exactly their reference attributes.")
    if parser["n_failures"]:
        text += (f"\n\n**Warning: {parser['n_failures']} reference captions do not parse back; the faithfulness "
                 "figures are not trustworthy until they do.** First failures:\n\n")
        text += "\n".join(f"- {f['caption']!r}: {f['wrong']}" for f in parser["failures"])
    return text


def _examples_section(examples: Mapping) -> str:
    parts = ["## Example captions"]
    for name, title in (("best", "Best"), ("worst", "Worst"), ("random", "Random sample")):
        parts.append(f"### {title}")
        for example in examples.get(name, []):
            parts.append(_example_markdown(example))
    return "\n\n".join(parts)


def _example_markdown(example: Mapping) -> str:
    errors = "; ".join(f"`{field}`: {e['predicted']} (true: {e['true']})" for field, e in example["errors"].items())
    return "\n".join([
        f"- **{example['id']}**: {_percent(example['fields_correct'])}% of fields right, "
        f"CIDEr-D {example['cider_d']:.3f}",
        f"  - generated: {example['caption'] or '(empty)'}",
        f"  - reference: {example['reference']}",
        f"  - errors: {errors or 'none'}",
    ])


# ----------------------------------------------------------------------------------- plots


def write_plots(metrics: Mapping, plots_dir: Path) -> list[Path]:
    """Per-attribute accuracy against baseline and ceiling, and a confusion matrix per field with
    more than two values. Returns the files written."""
    faith = metrics["faithfulness"]
    files = [_save(_accuracy_figure(faith), plots_dir / "attribute_accuracy.png")]
    for name in (*faith["attributes"], *faith["targets"]):
        confusion = faith["fields"][name]["confusion"]
        if len(confusion["values"]) > 2:
            files.append(_save(_confusion_figure(name, confusion), plots_dir / f"confusion_{name}.png"))
    return files


def _accuracy_figure(faith: Mapping):
    from matplotlib.figure import Figure

    names = [*faith["attributes"], *faith["targets"]]
    fields = faith["fields"]
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6.0, 0.8 * len(names) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [fields[n]["accuracy"] for n in names], 0.4, label="accuracy (omitted = wrong)")
    stated = [fields[n]["stated_accuracy"] or 0.0 for n in names]
    ax.bar(x + 0.2, stated, 0.4, label="stated-only accuracy", alpha=0.6)
    ax.scatter(x, [fields[n]["majority_accuracy"] for n in names], marker="_", s=400, c="k", label="majority baseline")
    ceiling = [fields[n].get("human_ceiling") for n in names]
    if any(c is not None for c in ceiling):
        ceiling = [np.nan if c is None else c for c in ceiling]
        ax.scatter(x, ceiling, marker="*", s=80, c="tab:red", label="human ceiling")
    ax.set_xticks(x, names, rotation=40, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of captions")
    ax.legend(loc="lower left", fontsize="small")
    return fig


def _confusion_figure(name: str, confusion: Mapping):
    from matplotlib.figure import Figure

    matrix = np.asarray(confusion["matrix"], dtype=float)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=(1.0 * matrix.shape[1] + 2.5, 0.7 * matrix.shape[0] + 2), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, int(count), ha="center", va="center", color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(matrix.shape[1]), confusion["columns"], rotation=40, ha="right")
    ax.set_yticks(range(matrix.shape[0]), confusion["values"])
    ax.set_xlabel("stated in caption")
    ax.set_ylabel("reference")
    ax.set_title(name)
    return fig


def _save(fig, path: Path) -> Path:
    """Save a figure as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


# ---------------------------------------------------------------------------- comparison


def compare_reports(
    report_dirs: Sequence[str | Path], out_dir: str | Path, labels: Sequence[str] | None = None
) -> Path:
    """Set eval reports side by side: comparison.md, comparison.csv and a grouped bar plot."""
    if not report_dirs:
        raise ReportError("no report folders to compare")
    if labels is not None and len(labels) != len(report_dirs):
        raise ReportError(f"{len(labels)} labels for {len(report_dirs)} reports")
    reports = [read_metrics(d) for d in report_dirs]
    labels = list(labels) if labels else _unique_labels(reports, report_dirs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = _save(_comparison_figure(reports, labels), out_dir / "comparison_accuracy.png")
    write_text(out_dir / "comparison.csv", comparison_csv(reports, labels, report_dirs))
    write_text(out_dir / "comparison.md", comparison_markdown(reports, labels, report_dirs, plot.name))
    return out_dir


def _label(metrics: Mapping, fallback: str) -> str:
    meta = metrics.get("meta", {})
    return str(meta.get("label") or meta.get("model") or fallback)


def _unique_labels(reports: Sequence[Mapping], dirs: Sequence[str | Path]) -> list[str]:
    labels = [_label(m, Path(d).resolve().name) for m, d in zip(reports, dirs)]
    for i, label in enumerate(labels):
        if labels.count(label) > 1:
            labels[i] = f"{label} ({Path(dirs[i]).resolve().parent.name}/{Path(dirs[i]).name})"
    return labels


def _field_names(reports: Sequence[Mapping], key: str) -> list[str]:
    names: list[str] = []
    for report in reports:
        names += [n for n in report["faithfulness"][key] if n not in names]
    return names


def comparison_markdown(reports, labels, dirs, plot_name: str | None = None) -> str:
    attributes, targets = _field_names(reports, "attributes"), _field_names(reports, "targets")
    sections = [
        "# Comparison of evaluation reports\n\n" + "\n".join(
            f"- **{label}**: `{d}` ({r['n']} captions, schema `{r['schema']}`)"
            for label, d, r in zip(labels, dirs, reports)
        ),
        "## Table 1: caption quality\n\n" + _caption_table(reports, labels),
    ]
    tables = (("a", "accuracy", "accuracy (omitted = wrong)"),
              ("b", "stated_accuracy", "stated-only accuracy (HemBLIP)"))
    for letter, key, title in tables:
        sections.append(f"## Table 2{letter}: attribute {title}, %\n\n"
                        + _attribute_table(reports, labels, attributes, targets, key))
    if plot_name:
        sections.append(f"![accuracy per attribute]({plot_name})")
    return "\n\n".join(sections) + "\n"


def _caption_table(reports: Sequence[Mapping], labels: Sequence[str]) -> str:
    keys = [k for k in CAPTION_COLUMNS if any(r["caption"].get(k) is not None for r in reports)]
    rows = [[label, *(_number(r["caption"].get(k)) for k in keys)] for label, r in zip(labels, reports)]
    if labels == [""]:
        return _table([CAPTION_COLUMNS[k] for k in keys], [row[1:] for row in rows])
    return _table(["report", *(CAPTION_COLUMNS[k] for k in keys)], rows)


def _attribute_table(reports, labels, attributes, targets, key: str) -> str:
    first = reports[0]["faithfulness"]

    def row(title: str, pick) -> list[str]:
        reference = pick(first)
        return [title, *(_percent(pick(r["faithfulness"]).get(key)) for r in reports),
                _percent(reference.get("majority_accuracy")), _percent(reference.get("human_ceiling"))]

    def field(name):
        return lambda faith: faith["fields"].get(name, {})

    rows = [row(f"`{n}`", field(n)) for n in attributes]
    rows.append(row("**mean (attributes)**", lambda faith: faith["attribute_mean"]))
    rows += [row(f"`{n}`", field(n)) for n in targets]
    return _table(["field", *labels, f"majority ({labels[0]})", f"human ({labels[0]})"], rows)


def comparison_csv(reports, labels, dirs) -> str:
    attributes, targets = _field_names(reports, "attributes"), _field_names(reports, "targets")
    header = ["label", "report", "schema", "n", *CAPTION_COLUMNS, "mean_accuracy", "mean_stated_accuracy",
              "mean_macro_f1"]
    header += [f"{n}_{k}" for n in (*attributes, *targets) for k in ("accuracy", "stated_accuracy", "macro_f1")]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for label, d, r in zip(labels, dirs, reports):
        faith = r["faithfulness"]
        values = [label, str(d), r["schema"], r["n"], *(r["caption"].get(k) for k in CAPTION_COLUMNS)]
        values += [faith["attribute_mean"].get(k) for k in ("accuracy", "stated_accuracy", "macro_f1")]
        values += [faith["fields"].get(n, {}).get(k) for n in (*attributes, *targets)
                   for k in ("accuracy", "stated_accuracy", "macro_f1")]
        writer.writerow(["" if v is None else v for v in values])
    return buffer.getvalue()


def _comparison_figure(reports: Sequence[Mapping], labels: Sequence[str]):
    from matplotlib.figure import Figure

    names = [*_field_names(reports, "attributes"), "mean", *_field_names(reports, "targets")]
    x = np.arange(len(names))
    width = 0.8 / len(reports)
    fig = Figure(figsize=(max(7.0, 0.9 * len(names) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, report) in enumerate(zip(labels, reports)):
        faith = report["faithfulness"]
        heights = [faith["attribute_mean"]["accuracy"] if n == "mean" else faith["fields"].get(n, {}).get("accuracy")
                   for n in names]
        ax.bar(x - 0.4 + width * (i + 0.5), [np.nan if h is None else h for h in heights], width, label=label)
    ax.set_xticks(x, names, rotation=40, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (omitted = wrong)")
    ax.legend(loc="lower left", fontsize="small")
    return fig


# ---------------------------------------------------------------------------------- format


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _number(value) -> str:
    return "—" if value is None else f"{value:.3f}"

