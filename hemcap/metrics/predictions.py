"""predictions.jsonl: reading, writing and checking it (the format is in ``hemcap.metrics``' docstring),
and the checks of attribute rows that every score starts from."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from hemcap.fileio import write_text
from hemcap.schema import Schema, get_schema

PREDICTION_KEYS = ("id", "caption", "references", "reference_attributes", "attributes", "confidences", "schema")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
SHOWN_PROBLEMS = 20  # an error lists this many problems, then how many more there are


class PredictionsError(ValueError):
    """A predictions file or list is malformed; the message names the line and field."""


def read_predictions(path: str | Path, schema: Schema | None = None) -> list[dict]:
    """Read and check a predictions.jsonl file (format in the module docstring); ``schema`` as for
    ``check_predictions``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    records = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            record = _decode_line(raw, f"{path}:{number}")
            if record is not None:
                records.append((number, record))
    if not records:
        raise PredictionsError(f"{path}: no predictions (the file is empty)")
    check_predictions(records, source=str(path), schema=schema)
    return [record for _, record in records]


def write_predictions(records: Iterable[Mapping], path: str | Path) -> Path:
    """Write records as predictions.jsonl atomically (temp file, then rename)."""
    lines = [json.dumps(dict(r), ensure_ascii=False) for r in records]
    return write_text(path, "\n".join(lines) + "\n")


def _decode_line(raw: bytes, where: str) -> dict | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PredictionsError(
            f"{where}: not valid UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})"
        ) from None
    if not text.strip():
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise PredictionsError(f"{where}: invalid JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(record, dict):
        raise PredictionsError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def check_predictions(records: Sequence[tuple[int, Mapping]], source: str = "predictions",
                      schema: Schema | None = None) -> Schema:
    """Check numbered records; raise PredictionsError listing every problem (first 20). ``schema``
    is the one the lines name (a lab's own, not shipped); by default the shipped one of that name."""
    problems: list[str] = []
    schema_names = {r.get("schema") for _, r in records if isinstance(r.get("schema"), str)}
    if len(schema_names) > 1:
        problems.append(f"lines name different schemas: {sorted(schema_names)}")
    if schema is not None and schema_names - {schema.name}:
        problems.append(f"lines name schema {sorted(schema_names)} but {schema.name!r} was given")
    if schema is None and len(schema_names) == 1:
        schema = _shipped_schema(next(iter(schema_names)), problems)
    seen: dict[str, int] = {}
    for number, record in records:
        where = f"line {number}"
        problems += _record_problems(record, schema, where)
        rid = record.get("id")
        if isinstance(rid, str) and rid:
            if rid in seen:
                problems.append(f"{where}: duplicate id {rid!r} (first on line {seen[rid]})")
            seen.setdefault(rid, number)
    if problems:
        raise problems_error(source, problems)
    return schema


def _shipped_schema(name: str, problems: list[str]) -> Schema | None:
    from hemcap.schema import SchemaError

    try:
        return get_schema(name)
    except SchemaError:
        problems.append(f"schema {name!r} is not shipped with hemcap; give it (hemcap score --schema: its YAML, "
                        "or the model folder, whose info embeds it)")
        return None


def _record_problems(record: Mapping, schema: Schema | None, where: str) -> list[str]:
    missing = [k for k in PREDICTION_KEYS if k not in record]
    if missing:
        return [f"{where}: missing key(s) {', '.join(missing)}"]
    problems = []
    if not isinstance(record["id"], str) or not record["id"]:
        problems.append(f"{where}: field 'id' must be a non-empty string, got {record['id']!r}")
    if not isinstance(record["caption"], str):
        problems.append(f"{where}: field 'caption' must be a string, got {type(record['caption']).__name__}")
    refs = record["references"]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        problems.append(f"{where}: field 'references' must be a non-empty list of non-empty strings")
    texts = [("caption", record["caption"])] + [("references", r) for r in (refs if isinstance(refs, list) else [])]
    problems += [f"{where}: field {key!r} holds a lone surrogate ({_first_surrogate(t)}), not valid Unicode text"
                 for key, t in texts if isinstance(t, str) and _first_surrogate(t)]
    if not isinstance(record["schema"], str):
        problems.append(f"{where}: field 'schema' must be a schema name")
    if schema is not None:
        problems += _attribute_problems(record, schema, where)
    return problems


def _first_surrogate(text: str) -> str | None:
    """JSON may escape half a UTF-16 pair ("\\udcff"); such text cannot be encoded or tokenized."""
    match = _SURROGATE.search(text)
    return f"\\u{ord(match.group()):04x}" if match else None


def _attribute_problems(record: Mapping, schema: Schema, where: str) -> list[str]:
    problems = []
    truth = record["reference_attributes"]
    if not isinstance(truth, dict):
        return [f"{where}: field 'reference_attributes' must be an object"]
    problems += schema.check_attributes(truth, where=f"{where}: reference_attributes")
    for key in ("attributes", "confidences"):
        value = record[key]
        if not isinstance(value, dict):
            problems.append(f"{where}: field {key!r} must be an object")
            continue
        unknown = sorted(set(value) - set(schema.field_names))
        if unknown:
            problems.append(f"{where}: field {key!r} has unknown field(s) {', '.join(unknown)}")
    confidences = record["confidences"] if isinstance(record["confidences"], dict) else {}
    for field, confidence in confidences.items():
        ok = confidence is None or (isinstance(confidence, (int, float)) and 0.0 <= confidence <= 1.0)
        if not ok:
            problems.append(f"{where}: confidences.{field}={confidence!r} is not null or a number in [0, 1]")
    return problems



def check_attribute_rows(rows: Sequence[Mapping], schema: Schema, source: str, first_line: int) -> None:
    """Raise PredictionsError listing every row whose fields or values the schema does not know."""
    problems = [p for i, r in enumerate(rows) for p in schema.check_attributes(r, f"row {i + first_line}")]
    if problems:
        raise problems_error(source, problems)


def problems_error(source: str, problems: Sequence[str]) -> PredictionsError:
    """One error naming ``source`` and listing its problems, the first ``SHOWN_PROBLEMS`` in full."""
    more = f"\n  ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
    shown = "\n  - ".join(problems[:SHOWN_PROBLEMS])
    return PredictionsError(f"{source}: {len(problems)} problem(s):\n  - {shown}{more}")
