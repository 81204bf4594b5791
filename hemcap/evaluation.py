"""``hemcap eval``: caption a prepared split with a trained model, then score and report it.

Writes ``predictions.jsonl`` (enough to re-score with ``hemcap score``), ``metrics.json``,
``report.md`` and plots into one folder, atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from hemcap.engine import CaptionEngine

if TYPE_CHECKING:
    from hemcap.looks import Look

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """What to evaluate and how."""

    model_dir: Path  # a dir written by `hemcap train` (model or LoRA adapter)
    data_dir: Path  # a dataset written by `hemcap prepare`
    out_dir: Path  # the report folder to write
    split: str = "test"  # split to caption and score
    limit: int | None = None  # score only the first N rows (quick looks)
    reannotations: Path | None = None  # WBCAtt re-annotation CSV: the human agreement ceiling
    meteor: bool | None = None  # None: when Java is present
    overwrite: bool = False  # replace out_dir if it exists
    seed: int = 0  # picks the random example captions
    looks: tuple[Path, ...] = ()  # folders of other labs' smears: the split is also scored in each one's look

    def __post_init__(self):
        problems = []
        if not Path(self.model_dir).is_dir():
            problems.append(f"model dir {self.model_dir} does not exist")
        if not Path(self.data_dir).is_dir():
            problems.append(f"dataset dir {self.data_dir} does not exist")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit must be >= 1 (got {self.limit})")
        if Path(self.out_dir).exists() and not self.overwrite:
            problems.append(f"output dir {self.out_dir} exists; pass --overwrite to replace it")
        problems += [f"look folder {folder} does not exist" for folder in self.looks if not Path(folder).is_dir()]
        if problems:
            raise ValueError("; ".join(problems))


def evaluate(options: EvalOptions, settings: dict | None = None) -> dict:
    """Caption, score and report; returns the metrics. ``settings`` override the engine settings the
    model's info records (those its validation decoded with)."""
    from hemcap.metrics import score_records, write_predictions
    from hemcap.fileio import staging_dir
    from hemcap.recipes import dataset_schema, get_split, load_prepared
    from hemcap.report import write_report

    dataset, meta = load_prepared(options.data_dir)
    rows = get_split(dataset, options.split)
    if options.limit:
        rows = rows.select(range(min(options.limit, len(rows))))
    engine = CaptionEngine.from_dir(options.model_dir, **(settings or {}))
    _check_schema(engine.schema, dataset_schema(meta, options.data_dir), options)
    records = caption_dataset(engine, rows)
    with staging_dir(options.out_dir, options.overwrite) as staging:
        write_predictions(records, staging / "predictions.jsonl")
        metrics = score_records(
            records, baseline_labels=_train_labels(options.data_dir, dataset), reannotations=options.reannotations,
            meteor=options.meteor, seed=options.seed,
            meta={"model": str(options.model_dir), "data": str(options.data_dir), "split": options.split,
                  "stain_norm": engine.domain.normalisation if engine.normalises_stain else "off",
                  "refined": sorted((engine.backend.info.refiner or {}).get("fields", {}))},
            schema=engine.schema,
        )
        if options.looks:
            metrics["looks"] = score_looks(engine, rows, options, metrics, staging)
        write_report(metrics, staging)
    return metrics


def score_looks(engine: CaptionEngine, rows, options: EvalOptions, in_domain: dict, out: Path) -> list[dict]:
    """The split captioned and scored again in each look (``hemcap.looks``): ``looks/<name>/predictions.jsonl``,
    a row per look in ``looks.md``, and the rows returned. Every cell is re-stained by one matrix per look,
    from the split's own stain (measured on its first ``LOOK_IMAGES`` images) to the look's."""
    from hemcap.looks import measure_look, restyle
    from hemcap.metrics import score_records, write_predictions

    source = split_look(rows)
    table = [look_row("in domain", None, in_domain, in_domain)]
    for folder in options.looks:
        look = measure_look(folder)
        records = caption_dataset(engine, rows, transform=lambda image: restyle(image, look, source=source))
        write_predictions(records, out / "looks" / look.name / "predictions.jsonl")
        table.append(look_row(look.name, look, score_records(records, meteor=False, schema=engine.schema), in_domain))
    (out / "looks.md").write_text(looks_markdown(table, source.red_cell_px), encoding="utf-8")
    return table


def split_look(rows) -> Look:
    """The split's own look (``hemcap.looks.look_of``) from its first ``LOOK_IMAGES`` images."""
    from hemcap.looks import LOOK_IMAGES, look_of

    return look_of([row["image"].convert("RGB") for row in rows.select(range(min(LOOK_IMAGES, len(rows))))], "split")


def look_row(name: str, look, metrics: dict, in_domain: dict) -> dict:
    """Mean attribute accuracy and cell-type accuracy in one look, and their drops from in domain."""
    mean, kind = _headline(metrics)
    base_mean, base_kind = _headline(in_domain)
    return {"look": name, "red_cell_px": look.red_cell_px if look else None, "attribute_accuracy": mean,
            "cell_type_accuracy": kind, "attribute_drop": base_mean - mean,
            "cell_type_drop": None if kind is None else base_kind - kind,
            "definition": look.as_dict() if look else None}


def _headline(metrics: dict) -> tuple[float, float | None]:
    faithfulness = metrics["faithfulness"]
    target = next(iter(faithfulness.get("targets", [])), None)  # the cell type, in WBCAtt's schema
    accuracy = faithfulness["fields"][target]["accuracy"] if target else None
    return faithfulness["attribute_mean"]["accuracy"], accuracy


def looks_markdown(table: list[dict], red_cell_px: float | None) -> str:
    size = f"{red_cell_px:.0f} px" if red_cell_px else "not measured"
    lines = [f"# The split in other labs' looks (its own red cells: {size})", "",
             "| look | red cells | mean attribute accuracy | drop | cell type | drop |", "|---|---|---|---|---|---|"]
    for row in table:
        kind = "-" if row["cell_type_accuracy"] is None else f"{row['cell_type_accuracy']:.1%}"
        drop = "-" if row["cell_type_drop"] is None else f"{100 * row['cell_type_drop']:.1f}"
        px = f"{row['red_cell_px']:.0f} px" if row["red_cell_px"] else "-"
        lines.append(f"| {row['look']} | {px} | {row['attribute_accuracy']:.1%} | {100 * row['attribute_drop']:.1f} | "
                     f"{kind} | {drop} |")
    return "\n".join(lines) + "\n"


def _check_schema(model_schema, data_schema, options: EvalOptions) -> None:
    if model_schema.name != data_schema.name or model_schema.field_names != data_schema.field_names:
        raise ValueError(f"{options.model_dir} speaks the {model_schema.name!r} schema but {options.data_dir} is "
                         f"labelled with {data_schema.name!r}; evaluate it on data of its own schema")


def caption_dataset(engine: CaptionEngine, rows, batch_size: int | None = None, transform=None) -> list[dict]:
    """Prediction records (see ``hemcap.metrics``) for every row of a prepared split; ``transform``
    changes each image first."""
    from tqdm.auto import tqdm

    schema = engine.schema
    batch_size = batch_size or engine.settings.decode_chunk
    records = []
    with tqdm(total=len(rows), desc="captioning", unit="img") as bar:
        for batch in batches(rows, batch_size):
            if transform:
                batch = [{**row, "image": transform(row["image"])} for row in batch]
            for row, caption in zip(batch, engine.caption_rows(batch)):
                records.append(_record(row, caption, schema))
            bar.update(len(batch))
    return records


def batches(rows, size: int) -> Iterator[list[dict]]:
    """A prepared split's rows as lists of ``size`` dicts."""
    for start in range(0, len(rows), size):
        block = rows[start : start + size]  # one columnar read per batch, images decoded here
        yield [dict(zip(block, values)) for values in zip(*block.values())]


def _record(row: dict, caption, schema) -> dict:
    return {
        "id": row["id"],
        "caption": caption.text,
        "references": list(row["captions"]) or [row["caption"]],
        "reference_attributes": {name: row[name] for name in schema.field_names},
        "attributes": caption.attributes,
        "confidences": caption.confidences,
        "schema": schema.name,
    }


def _train_labels(data_dir: Path, dataset) -> Path | None:
    """The training split gives the majority-class baseline, when the dataset has one."""
    return Path(data_dir) if "train" in dataset else None

