"""What a captioner is set beside: training labels (for the majority baseline), the agreement of a
second human annotation (the ceiling), and the parser's accuracy on the reference captions."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from hemcap.captions import parse
from hemcap.metrics.predictions import PredictionsError, check_attribute_rows
from hemcap.schema import Schema, get_schema


def read_label_rows(path: str | Path, schema: str | Schema = "wbcatt", split: str = "train") -> list[dict]:
    """Attribute rows from an annotation CSV (schema columns, e.g. WBCAtt's ``label``) or a
    prepared dataset directory (its ``split``, one column per field)."""
    schema, path = get_schema(schema), Path(path)
    if path.is_dir():
        return _dataset_label_rows(path, schema, split)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [fld.column for fld in schema.fields.values() if fld.column not in (reader.fieldnames or [])]
        if missing:
            raise PredictionsError(f"{path}: missing column(s) {', '.join(missing)} for schema {schema.name}")
        rows = [{name: row[fld.column] for name, fld in schema.fields.items()} for row in reader]
    check_attribute_rows(rows, schema, str(path), first_line=2)
    return rows


def _dataset_label_rows(path: Path, schema: Schema, split: str) -> list[dict]:
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise PredictionsError(f"{path}: no split {split!r} (has {', '.join(data)})")
        data = data[split]
    missing = [name for name in schema.field_names if name not in data.column_names]
    if missing:
        raise PredictionsError(f"{path}: missing column(s) {', '.join(missing)}")
    columns = {name: data[name] for name in schema.field_names}
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    check_attribute_rows(rows, schema, f"{path} [{split}]", first_line=0)
    return rows


def human_agreement(
    reannotations: str | Path,
    originals: Sequence[str | Path] | None = None,
    schema: str | Schema = "wbcatt",
    key: str = "img_name",
) -> dict:
    """Per-field agreement between a second annotation and the original one, matched on ``key``.

    ``originals`` default to the WBCAtt split files beside the re-annotation file
    (``pbc_attr_v1_{train,val,test}.csv``). The mean is over the schema's attributes.
    """
    schema, reannotations = get_schema(schema), Path(reannotations)
    if originals is None:
        originals = [reannotations.parent / f"pbc_attr_v1_{s}.csv" for s in ("train", "val", "test")]
    first = _keyed_rows(reannotations, schema, key)
    second: dict[str, dict] = {}
    for path in originals:
        second |= _keyed_rows(Path(path), schema, key)
    unmatched = sorted(set(first) - set(second))
    if unmatched:
        raise PredictionsError(f"{reannotations}: {len(unmatched)} {key}(s) not in the originals, e.g. {unmatched[:5]}")
    fields = {
        name: float(np.mean([first[k][name] == second[k][name] for k in first])) for name in schema.field_names
    }
    return {
        "fields": fields,
        "attribute_mean": float(np.mean([fields[n] for n in schema.attribute_names])),
        "n_images": len(first),
        "source": str(reannotations),
    }


def _keyed_rows(path: Path, schema: Schema, key: str) -> dict[str, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = [key] + [fld.column for fld in schema.fields.values()]
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise PredictionsError(f"{path}: missing column(s) {', '.join(missing)}")
        rows = {row[key]: {n: row[fld.column] for n, fld in schema.fields.items()} for row in reader}
    return rows


def parser_accuracy(references: Sequence[Sequence[str]], reference_attributes: Sequence[Mapping], schema) -> dict:
    """How often parse(reference caption) gives exactly the reference attributes (must be 1.0)."""
    schema = get_schema(schema)
    total, failures, cache = 0, [], {}
    for refs, truth in zip(references, reference_attributes):
        for caption in refs:
            total += 1
            parsed = cache[caption] = cache.get(caption) or parse(caption, schema)
            if dict(parsed) != {n: truth[n] for n in schema.field_names}:
                wrong = {n: parsed[n] for n in schema.field_names if parsed[n] != truth[n]}
                failures.append({"caption": caption, "wrong": wrong})
    return {"accuracy": 1 - len(failures) / total, "n_captions": total, "n_failures": len(failures),
            "failures": failures[:5]}
