"""A smear report as a reviewer reads it: tables with the doubtful attributes marked, the report
as JSON and CSV files, and the figures of the model that wrote it.

The demo (``demo/app.py``) shows these; they are plain rows and files, so a script or another
front end can use them too. Field names and values come from the schema and the report, never
from here.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

RESEARCH_NOTE = ("Research use only, not for diagnosis: hemcap is not a medical device and has not been "
                 "validated clinically. Every caption is a model's guess; check it against the cell.")
NOT_STATED = "—"  # the caption does not state this field
LOW = "low"  # marks: confidence below the pipeline's min_confidence ...
CONTRADICTION = "contradiction"  # ... the caption states two values of one field
MISSING = "missing"  # ... the caption does not state it
MARK_SIGNS = {LOW: "⚠", CONTRADICTION: "✗"}  # prefixed to the text, so the marks survive without colour


# ------------------------------------------------------------------------------ tables


@dataclass
class Table:
    """Rows for display, with one mark per value ("" when nothing is wrong)."""

    headers: list[str]
    rows: list[list]
    marks: list[list[str]] = field(default_factory=list)


def field_label(name: str) -> str:
    """'nuclear_cytoplasmic_ratio' -> 'Nuclear cytoplasmic ratio'."""
    return name.replace("_", " ").capitalize()


def review_fields(schema) -> list[str]:
    """The fields in the order a reviewer reads them: the cell type first, then the morphology."""
    return [*schema.targets, *schema.attribute_names]


def field_mark(cell, name: str, min_confidence: float) -> str:
    if name in cell.contradictions:
        return CONTRADICTION
    if cell.attributes.get(name) is None:
        return MISSING
    confidence = cell.confidences.get(name)
    return LOW if confidence is not None and confidence < min_confidence else ""


def value_text(cell, name: str, mark: str, with_confidence: bool = True) -> str:
    """'Neutrophil (0.97)', '⚠ small (0.31)', '✗ round / irregular' or '—'."""
    if mark == CONTRADICTION:
        return f"{MARK_SIGNS[CONTRADICTION]} " + " / ".join(cell.contradictions[name])
    if mark == MISSING:
        return NOT_STATED
    confidence = cell.confidences.get(name)
    text = str(cell.attributes[name])
    if with_confidence and confidence is not None:
        text += f" ({confidence:.2f})"
    return f"{MARK_SIGNS[LOW]} {text}" if mark == LOW else text


def attribute_table(report, schema, min_confidence: float) -> Table:
    """One row per field, one column per cell (cells sit side by side for comparison): each value
    with its confidence; a last row counts each cell's flags."""
    names = review_fields(schema)
    table = Table(["Attribute", *(f"Cell {cell.index}" for cell in report.cells)], [], [])
    marks = [[field_mark(cell, name, min_confidence) for cell in report.cells] for name in names]
    for name, row in zip(names, marks):
        table.rows.append([field_label(name), *(value_text(c, name, m) for c, m in zip(report.cells, row))])
        table.marks.append(["", *row])
    table.rows.append(["Flags", *(flag_count(cell) for cell in report.cells)])
    table.marks.append(["", *(LOW if cell.flags else "" for cell in report.cells)])
    return table


def flag_count(cell) -> str:
    n = len(cell.flags)
    return f"{MARK_SIGNS[LOW]} {n} flag{'s' * (n != 1)}" if n else "none"


def flag_summary(cell, schema, min_confidence: float, limit: int = 4) -> list[str]:
    """Why to look at a cell, in a few words: contradictions in full, a missing cell type, and the
    fields stated with low confidence by name (the first ``limit``, then how many more)."""
    lines = [f"contradicts itself on {field_label(name).lower()}: {' vs '.join(values)}"
             for name, values in cell.contradictions.items()]
    target = schema.cell_type_field if schema.targets else None
    if target and field_mark(cell, target, min_confidence) == MISSING:
        lines.append(f"no {field_label(target).lower()} stated")
    low = [field_label(name).lower() for name in review_fields(schema) if field_mark(cell, name, min_confidence) == LOW]
    if low:
        more = f" and {len(low) - limit} more" if len(low) > limit else ""
        lines.append(f"confidence below {min_confidence:.2f}: {', '.join(low[:limit])}{more}")
    return lines


def cell_table(cell, schema, min_confidence: float) -> Table:
    """One row per field of one cell: attribute, value, confidence and what is wrong with it."""
    notes = {LOW: "low confidence", CONTRADICTION: "contradicts itself", MISSING: "not stated", "": ""}
    table = Table(["Attribute", "Value", "Confidence", "Note"], [], [])
    for name in review_fields(schema):
        mark = field_mark(cell, name, min_confidence)
        confidence = cell.confidences.get(name)
        table.rows.append([field_label(name), value_text(cell, name, mark, with_confidence=False),
                           NOT_STATED if confidence is None else f"{confidence:.2f}", notes[mark]])
        table.marks.append(["", mark, mark, mark])
    return table


def differential_table(report) -> Table:
    """Cell type, count and percentage: every type of the schema, unclassified only when present."""
    from hemcap.smear import UNCLASSIFIED

    table = Table(["Cell type", "Count", "%"], [], [])
    for name, row in report.differential.items():
        if name != UNCLASSIFIED or row["count"]:
            table.rows.append([name, row["count"], f"{row['percent']:.1f}"])
    table.rows.append(["Total", len(report.cells), "100.0" if report.cells else "0.0"])
    return table


# ------------------------------------------------------------------------------ files


def report_csv(report, schema) -> str:
    """One row per cell: box, detector score, caption, then each field's value and confidence."""
    names = review_fields(schema)
    header = ["image", "kind", "cell", "x0", "y0", "x1", "y1", "detector_score", "caption",
              *(column for name in names for column in (name, f"{name}_confidence")), "contradictions", "flags"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for cell in report.cells:
        box = list(cell.box) if cell.box else [""] * 4
        values = [v for name in names for v in (cell.attributes.get(name) or "", _blank(cell.confidences.get(name)))]
        contradictions = "; ".join(f"{k}: {' | '.join(v)}" for k, v in cell.contradictions.items())
        writer.writerow([report.image, report.kind, cell.index, *box, _blank(cell.detector_score), cell.caption,
                         *values, contradictions, "; ".join(cell.flags)])
    return out.getvalue()


def _blank(value) -> str:
    return "" if value is None else str(value)


def safe_stem(name: str, default: str = "image") -> str:
    """A file-name stem from an uploaded file's name: letters, digits, '-', '_' and '.', at most 60."""
    stem = re.sub(r"[^\w.-]+", "_", Path(name or "").stem).strip("._")
    return stem[:60] or default


def write_downloads(report, schema, out_dir: str | Path, model: str = "") -> dict[str, Path]:
    """``<stem>_hemcap.json`` (the report, the model's name and the research-use note) and
    ``<stem>_hemcap.csv`` in ``out_dir``."""
    from hemcap.fileio import write_text

    stem = safe_stem(report.image)
    paths = {"json": Path(out_dir) / f"{stem}_hemcap.json", "csv": Path(out_dir) / f"{stem}_hemcap.csv"}
    document = {**report.to_dict(), "model": model, "note": RESEARCH_NOTE}
    write_text(paths["json"], json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    write_text(paths["csv"], report_csv(report, schema))
    return paths


# ------------------------------------------------------------------------------ the model


def resolve_model_dir(model: str | Path | None, runs_dir: str | Path = "runs") -> tuple[Path, str]:
    """The model dir to load and a line saying where it came from; FileNotFoundError with the fix."""
    if model is None:
        from hemcap.quickstart import latest_run_model

        found = latest_run_model(runs_dir)
        if found is None:
            raise FileNotFoundError(f"no --model given and no quickstart model under {runs_dir}/; "
                                    "run `hemcap quickstart` first or pass --model DIR")
        return found, f"no --model given: using the newest quickstart model, {found}"
    from hemcap.models import ModelInfoError, find_model_dir

    try:
        path = find_model_dir(model)
    except ModelInfoError as error:
        raise FileNotFoundError(str(error)) from error
    return path, f"model: {path}"


@dataclass
class ModelSummary:
    """What a reviewer should know about the model: what it is and how well it did."""

    name: str
    description: str
    figures: list[tuple[str, str]]  # (metric, value as text)
    source: str  # where the figures come from
    recipe: str | None = None  # the training data's recipe ("synthetic", "wbcatt", ...) when recorded


FIGURES = (("attribute_accuracy", "Mean attribute accuracy", "percent"),
           ("cell_type_accuracy", "Cell-type accuracy", "percent"), ("cider", "CIDEr-D", "plain"))


def summarize_model(model_dir: str | Path) -> ModelSummary:
    """The model's description and figures: a held-out test report of its run (``eval_report_paths``),
    else the validation figures training saved (its ``ModelInfo``), else its model card's results
    (``README.md``)."""
    from hemcap.models import read_model_info

    model_dir = Path(model_dir)
    name = model_name(model_dir)
    info = read_model_info(model_dir)
    training = info.training
    recipe = (training.get("data") or {}).get("recipe")
    for read in (_test_report_figures, _training_figures, _card_figures):
        figures, source = read(model_dir, training)
        if figures:
            return ModelSummary(name, _description(info, training), figures, source, recipe)
    return ModelSummary(name, _description(info, training), [], "no metrics were saved with this model", recipe)


def model_name(model_dir: Path) -> str:
    """The model dir from its run's folder on: 'quickstart-<time>/model/model', 'blip_tiny/model'."""
    parts = model_dir.resolve().parts
    named = max((i for i, part in enumerate(parts) if part != "model"), default=0)
    return "/".join(parts[named:])


def eval_report_paths(model_dir: Path) -> list[Path]:
    """Where a test report of the model's run may lie: in the model dir, in ``report/`` of the
    training output dir above it, or of the quickstart run dir above that (``<run>/model/model``)."""
    places = [model_dir / "metrics.json", model_dir.parent / "report" / "metrics.json"]
    if model_dir.parent.name == "model":
        places.append(model_dir.parent.parent / "report" / "metrics.json")
    return places


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _format(value, style: str) -> str:
    return f"{100 * float(value):.1f}%" if style == "percent" else f"{float(value):.3f}"


def _test_report_figures(model_dir: Path, training: dict) -> tuple[list, str]:
    for path in eval_report_paths(model_dir):
        metrics = _read_json(path)
        faith, caption = metrics.get("faithfulness") or {}, metrics.get("caption") or {}
        if not faith.get("attribute_mean"):
            continue
        cell_type = (faith.get("fields") or {}).get((faith.get("targets") or ["cell_type"])[0], {})
        values = {"attribute_accuracy": faith["attribute_mean"].get("accuracy"),
                  "cell_type_accuracy": cell_type.get("accuracy"), "cider": caption.get("cider_d")}
        figures = [(label, _format(values[key], style)) for key, label, style in FIGURES if values[key] is not None]
        return figures, f"held-out test set, {metrics.get('n', '?')} images"
    return [], ""


def _training_figures(model_dir: Path, training: dict) -> tuple[list, str]:
    metrics = training.get("metrics") or {}
    figures = [(label, _format(metrics[key], style)) for key, label, style in FIGURES if metrics.get(key) is not None]
    images = (training.get("data") or {}).get("val_images", "?")
    return figures, f"validation set during training, {images} images"


def _card_figures(model_dir: Path, training: dict) -> tuple[list, str]:
    if not (model_dir / "README.md").is_file():
        return [], ""
    from huggingface_hub import ModelCard

    try:
        results = ModelCard.load(model_dir / "README.md").data.eval_results or []
    except Exception:  # a hand-written card without valid metadata: no figures from it
        return [], ""
    figures = [(r.metric_name or r.metric_type, _format(r.metric_value, "percent" if r.metric_type == "accuracy"
                                                         else "plain")) for r in results]
    split = results[0].dataset_split if results else None
    return figures, f"model card ({split or 'unknown'} split)"


def _description(info, training: dict) -> str:
    from hemcap.hub import backend_title
    from hemcap.models import BASE_MODEL_DIR

    kind = backend_title(info)
    kind = f"LoRA adapter on a {kind}" if info.adapter else kind
    base = info.base_model if info.base_model != BASE_MODEL_DIR else None  # a scratch base has no name
    origin = f"fine-tuned from {base}" if base else ("trained from random weights" if training else "")
    data = training.get("data") or {}
    trained_on = (f"on {data.get('recipe', 'unknown')} data ({data.get('train_images', '?')} training images, "
                  f"schema {data.get('schema', '?')})" if data else "")
    return " ".join(part for part in (kind, origin, trained_on) if part)
