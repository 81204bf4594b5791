"""Data recipes: attribute annotations -> an HF ``DatasetDict`` of images and expert captions.

One function per source format (``prepare_wbcatt``, ``prepare_leukemiaattri``, ``prepare_csv``,
``prepare_synthetic``). Each gathers ``CellRecord``s and hands them to ``write_dataset``, which
checks everything first, reports every problem at once (file, row, column, value), and writes
the dataset to a temporary directory that is renamed into place only when complete.

A prepared dataset has the splits ``train``, ``validation`` and ``test`` and the columns
``id``, ``image``, ``caption`` (template 0), ``captions`` (every template plus paraphrases),
one column per schema field, and ``source``. ``hemcap_dataset.json`` beside it names the schema.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from PIL import Image

from hemcap.captions import caption_variants, render
from hemcap.fileio import staging_dir, write_json
from hemcap.schema import Schema, get_schema

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation", "test": "test"}
META_FILE = "hemcap_dataset.json"
MAX_LISTED_PROBLEMS = 50
_READY_FORMATS = ("JPEG", "PNG")  # stored as the original bytes: no re-encoding, no loss


class RecipeError(ValueError):
    """Input that cannot become a dataset. ``problems`` holds every problem found."""

    def __init__(self, summary: str, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        lines = "\n  - ".join(shown) + (f"\n  ... and {more} more" if more else "")
        super().__init__(f"{summary}: {len(problems)} problem(s):\n  - {lines}")


@dataclass
class CellRecord:
    """One cell before its image is read: where the image is, what the cell shows."""

    id: str
    split: str
    attributes: dict[str, str]
    where: str  # for messages: "file.csv line 7"
    image_path: Path | None = None
    image: Image.Image | None = None  # in-memory images (synthetic cells, smear crops)
    source: str = ""
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------- the recipes


def prepare_wbcatt(data_dir: str | Path, out_dir: str | Path, allow_outside_root: bool = False, **options) -> Path:
    """WBCAtt's official train/val/test split; images from the PBC folder beside it."""
    data_dir = Path(data_dir)
    schema = get_schema("wbcatt")
    records = []
    for split_file, split in (("train", "train"), ("val", "validation"), ("test", "test")):
        csv_path = data_dir / "wbcatt" / f"pbc_attr_v1_{split_file}.csv"
        records += _records_from_table(csv_path, schema, "path", data_dir / "pbc", split, "wbcatt", "img_name",
                                       allow_outside_root=allow_outside_root)
    return write_dataset(records, schema, out_dir, meta={"recipe": "wbcatt", "data_dir": str(data_dir)}, **options)


def prepare_csv(
    csv_path: str | Path,
    out_dir: str | Path,
    schema: str | Path = "wbcatt",
    image_column: str = "path",
    image_root: str | Path | None = None,
    split_column: str | None = "split",
    id_column: str | None = None,
    allow_outside_root: bool = False,
    **options,
) -> Path:
    """A user's own table: one row per cell, an image path column and one column per field.

    Rows go to the split named in ``split_column`` (train/val/validation/test); without
    that column, a stable hash of the id puts 80/10/10 % in train/validation/test. Image paths
    must stay inside ``image_root`` unless ``allow_outside_root`` (see ``image_under``).
    """
    csv_path = Path(csv_path)
    schema_obj = get_schema(schema)
    root = Path(image_root) if image_root else csv_path.parent
    records = _records_from_table(csv_path, schema_obj, image_column, root, None, "csv", id_column, split_column,
                                  allow_outside_root)
    meta = {"recipe": "csv", "csv": str(csv_path), "schema_file": str(schema)}
    return write_dataset(records, schema_obj, out_dir, meta=meta, **options)


def prepare_synthetic(
    out_dir: str | Path,
    n_train: int = 600,
    n_val: int = 100,
    n_test: int = 200,
    size: int = 128,
    seed: int = 0,
    workers: int = 1,
    **options,
) -> Path:
    """Procedural cells from ``hemcap.synthetic``: deterministic by seed, balanced over cell types, the same
    for any number of ``workers`` (processes that draw them: the caller's main module must be guarded by
    ``if __name__ == "__main__"``, as the ``hemcap`` commands are)."""
    from hemcap import synthetic

    records = []
    for index, (split, n) in enumerate(zip(SPLITS, (n_train, n_val, n_test))):
        cells = synthetic.make_cells(n, seed * 10 + index, size, workers)  # distinct seeds per split
        for i, (image, attributes) in enumerate(cells):
            rid = f"synthetic-{split}-{i:05d}"
            records.append(CellRecord(rid, split, attributes, rid, image=image, source="synthetic"))
    meta = {"recipe": "synthetic", "seed": seed, "size": size}
    return write_dataset(records, get_schema("wbcatt"), out_dir, meta=meta, **options)


def prepare_leukemiaattri(
    coco_json: str | Path | Mapping[str, str | Path],
    images_dir: str | Path,
    out_dir: str | Path,
    margin: float = 0.25,
    crop_size: int | None = 224,
    allow_outside_root: bool = False,
    **options,
) -> Path:
    """LeukemiaAttri / LLD COCO annotations: crop every annotated cell and caption it.

    ``coco_json`` is one file (split 80/10/10 by smear, so no smear is in two splits) or a
    mapping split -> file. See ``records_from_coco`` for the accepted COCO layout; its file names
    must stay inside ``images_dir`` unless ``allow_outside_root``.
    """
    schema = get_schema("leukemiaattri")
    files = coco_json if isinstance(coco_json, Mapping) else {None: coco_json}
    records = []
    for split, path in files.items():
        records += records_from_coco(Path(path), Path(images_dir), schema, split, margin, crop_size,
                                     allow_outside_root)
    meta = {"recipe": "leukemiaattri", "coco_json": {str(k): str(v) for k, v in files.items()}}
    return write_dataset(records, schema, out_dir, meta=meta, **options)


# ------------------------------------------------------------------------------ reading COCO


def records_from_coco(
    path: Path, images_dir: Path, schema: Schema, split: str | None, margin: float, crop_size: int | None,
    allow_outside_root: bool = False,
) -> list[CellRecord]:
    """Cells from a COCO file in LeukemiaAttri's layout.

    Each annotation has ``bbox`` [x, y, w, h], ``category_id`` (the category name is the cell
    type) and ``attributes``: field -> value, given as the schema's value string or as its index
    in the schema's value list (LLD's integer codes; keys may use a field's ``aliases``). The
    diagnosis comes from the annotation, else from its image entry.
    """
    coco = _read_json(path)
    categories = {c["id"]: c["name"] for c in coco.get("categories", [])}
    images = {im["id"]: im for im in coco.get("images", [])}
    by_image: dict = {}
    for number, ann in enumerate(coco.get("annotations", [])):
        by_image.setdefault(ann.get("image_id"), []).append((number, ann))
    records = []
    for image_id, anns in by_image.items():
        records += _records_from_coco_image(path, images_dir, images.get(image_id), anns, categories, schema, split,
                                            margin, crop_size, allow_outside_root)
    return records


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(str(path), ["annotation file not found"])
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecipeError(str(path), [f"not valid UTF-8 JSON: {error}"]) from None


def _records_from_coco_image(path, images_dir, image_entry, anns, categories, schema, split, margin, crop_size,
                             allow_outside_root=False):
    where = f"{path.name} annotation"
    if image_entry is None:
        return [_failed_record(f"{where} #{n}: image_id {a.get('image_id')!r} is not in images[]", a, split) for n, a in anns]
    file_name = image_entry.get("file_name", "")
    smear_split = split or hash_split(file_name)  # whole smears go to one split: no leakage
    from hemcap.images import ImageError, background_colour, load_rgb, square_crop

    smear_path, problems = image_under(images_dir, file_name, f"{path.name} image {image_entry.get('id')!r}",
                                       allow_outside_root)
    if problems:
        return [_failed_record(problems[0], a, smear_split) for _, a in anns]
    try:
        smear = load_rgb(smear_path)
    except ImageError as error:
        return [_failed_record(f"{where} #{n}: {error.reason}", a, smear_split) for n, a in anns]
    background = background_colour(smear)  # once per smear: it pads every crop at the border
    records = []
    for number, ann in anns:
        attributes, problems = _coco_attributes(ann, image_entry, categories, schema, f"{where} #{number}")
        x, y, w, h = (float(v) for v in ann.get("bbox", [0, 0, 0, 0]))
        crop = square_crop(smear, (x, y, x + w, y + h), margin, crop_size, background)
        rid = f"{Path(file_name).stem}-{ann.get('id', number)}"
        records.append(CellRecord(rid, smear_split, attributes, f"{where} #{number}", image=crop,
                                  source="leukemiaattri", problems=problems))
    return records


def _failed_record(message: str, ann: dict, split: str | None) -> CellRecord:
    return CellRecord(str(ann.get("id")), split or "train", {}, message, problems=[message])


def _coco_attributes(ann, image_entry, categories, schema, where) -> tuple[dict[str, str], list[str]]:
    raw = {**(ann.get("attributes") or {})}
    for key in ("diagnosis",):
        raw.setdefault(key, ann.get(key, image_entry.get(key)))
    raw.setdefault(schema.cell_type_field, categories.get(ann.get("category_id")))
    attributes, problems = {}, []
    for name, field_ in schema.fields.items():
        keys = (name, field_.column, *field_.aliases)
        value = next((raw[k] for k in keys if raw.get(k) is not None), None)
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(field_.values):
                problems.append(f"{where}: {name} code {value} out of range 0..{len(field_.values) - 1}")
                continue
            value = field_.values[value]
        if value is not None:
            attributes[name] = str(value)
    return attributes, problems


# ------------------------------------------------------------------------------ reading tables


def _records_from_table(
    csv_path: Path,
    schema: Schema,
    image_column: str,
    image_root: Path,
    split: str | None,
    source: str,
    id_column: str | None = None,
    split_column: str | None = None,
    allow_outside_root: bool = False,
) -> list[CellRecord]:
    rows, columns = _read_csv(csv_path)
    wanted = [schema.fields[f].column for f in schema.field_names] + [image_column]
    wanted += [c for c in (id_column,) if c]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise RecipeError(f"{csv_path}", [f"missing column {c!r} (columns are: {', '.join(columns)})" for c in missing])
    records = []
    for line, row in rows:
        where = f"{csv_path.name} line {line}"
        attributes = {f: row[schema.fields[f].column].strip() for f in schema.field_names}
        image_path, outside = image_under(image_root, row[image_column].strip(), where, allow_outside_root)
        rid = row[id_column].strip() if id_column else row[image_column].strip()
        row_split, problems = _row_split(row, split, split_column, rid, where)
        record = CellRecord(rid, row_split, attributes, where, image_path=None if outside else image_path,
                            source=source, problems=outside + problems)
        records.append(record)
    return records


def image_under(root: Path, name: str, where: str, allow_outside: bool = False) -> tuple[Path, list[str]]:
    """``root / name``, and a problem when ``name`` leads out of ``root`` (an absolute path or ``..``):
    an annotation file from elsewhere must not make hemcap read any file of this machine. The check is
    on the written path, so symbolic links inside ``root`` (a user's own layout) are followed."""
    path = root / name
    if allow_outside or _stays_inside(name):
        return path, []
    return path, [f"{where}: image path {name!r} leads outside the image folder {root} "
                  "(pass --allow-outside-root if that is meant)"]


def _stays_inside(name: str) -> bool:
    return not Path(name).is_absolute() and Path(os.path.normpath(name)).parts[:1] != ("..",)


def _read_csv(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    if not path.is_file():
        raise RecipeError(str(path), ["annotation file not found"])
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = [(i + 2, row) for i, row in enumerate(reader)]  # line 1 is the header
            return rows, list(reader.fieldnames or [])
    except UnicodeDecodeError as error:
        raise RecipeError(str(path), [f"not UTF-8 text ({error.reason} at byte {error.start})"]) from None


def _row_split(row, split, split_column, rid, where) -> tuple[str, list[str]]:
    if split is not None:
        return split, []
    if split_column and split_column in row:
        name = (row[split_column] or "").strip().lower()
        if name not in SPLIT_ALIASES:
            return "", [f"{where}: column {split_column!r}: unknown split {name!r} (use train, val or test)"]
        return SPLIT_ALIASES[name], []
    return hash_split(rid), []


def hash_split(key: str, fractions: tuple[float, float] = (0.8, 0.1)) -> str:
    """A stable train/validation/test assignment from a key (crc32, not Python's salted hash)."""
    u = zlib.crc32(key.encode("utf-8")) / 2**32
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


# ------------------------------------------------------------------------------ writing a dataset


def write_dataset(
    records: list[CellRecord],
    schema: Schema,
    out_dir: str | Path,
    overwrite: bool = False,
    n_paraphrases: int = 4,
    seed: int = 0,
    convert_images: bool = False,
    meta: dict | None = None,
) -> Path:
    """Check every record, then write the DatasetDict atomically. Raises RecipeError listing all problems."""
    out_dir = Path(out_dir)
    _check_output_dir(out_dir, overwrite)
    started = time.perf_counter()
    images = _gather_images(records, convert_images)
    problems = _record_problems(records, schema) + [p for _, p in images if p]
    if problems:
        raise RecipeError(f"cannot build the {schema.name} dataset", problems)
    dataset = _build_dataset_dict(records, [b for b, _ in images], schema, n_paraphrases, seed)
    meta = {"schema": schema.name, "schema_definition": dict(schema.raw), "fields": list(schema.field_names),
            "n_paraphrases": n_paraphrases,
            "seed": seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
    _save_atomically(dataset, meta, out_dir, overwrite)
    counts = ", ".join(f"{s} {len(dataset[s])}" for s in dataset)
    log.info("wrote %s (%s) in %.1f s", out_dir, counts, time.perf_counter() - started)
    return out_dir


def _check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} exists; pass --overwrite to replace it")


def _record_problems(records: list[CellRecord], schema: Schema) -> list[str]:
    problems = []
    first_seen: dict[str, str] = {}
    for record in records:
        problems += record.problems
        problems += schema.check_attributes(record.attributes, record.where)
        if record.id in first_seen:
            problems.append(f"{record.where}: duplicate id {record.id!r} (first at {first_seen[record.id]})")
        first_seen.setdefault(record.id, record.where)
    return problems


def _gather_images(records: list[CellRecord], convert: bool) -> list[tuple[bytes | None, str | None]]:
    """Encoded bytes per record, or a problem message. Threads: PIL releases the GIL while decoding."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda r: _record_image(r, convert), records))


def _record_image(record: CellRecord, convert: bool) -> tuple[bytes | None, str | None]:
    if record.image is not None:
        return _png_bytes(record.image.convert("RGB")), None
    if record.image_path is None:  # a record that failed earlier; its problem is already listed
        return None, None
    data, problem = image_bytes(record.image_path, convert)
    return data, (f"{record.where}: {problem}" if problem else None)


def image_bytes(path: Path, convert: bool = False) -> tuple[bytes | None, str | None]:
    """The bytes to store for an image file, or why it cannot be used.

    Standard 8-bit RGB JPEG/PNG files are kept as they are. Grayscale, alpha, 16-bit, CMYK and
    palette images are refused unless ``convert`` is set: the attributes describe colours, so a
    silent conversion could change what a caption claims.
    """
    from hemcap.images import ImageError, describe_mode, load_rgb, probe

    try:
        info = probe(path)
    except ImageError as error:
        return None, str(error)
    if info.mode == "RGB" and info.format in _READY_FORMATS:
        return path.read_bytes(), None
    if not convert:
        return None, f"{path}: {describe_mode(info.mode)} {info.format} image; expected 8-bit RGB (pass --convert-images to convert)"
    try:
        return _png_bytes(load_rgb(path)), None
    except ImageError as error:
        return None, str(error)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _build_dataset_dict(records, image_data, schema: Schema, n_paraphrases: int, seed: int):
    import datasets

    features = datasets.Features(
        {"id": datasets.Value("string"), "image": datasets.Image(), "caption": datasets.Value("string"),
         "captions": datasets.List(datasets.Value("string")),
         **{f: datasets.Value("string") for f in schema.field_names}, "source": datasets.Value("string")}
    )
    columns = {split: {name: [] for name in features} for split in SPLITS}
    for record, data in zip(records, image_data):
        row = columns[record.split]
        row["id"].append(record.id)
        row["image"].append({"bytes": data, "path": None})
        row["caption"].append(render(record.attributes, schema))
        row_seed = seed * 1_000_003 + zlib.crc32(record.id.encode())  # per-row wording, stable across runs
        row["captions"].append(caption_variants(record.attributes, schema, n_paraphrases, row_seed))
        for name in schema.field_names:
            row[name].append(record.attributes[name])
        row["source"].append(record.source)
    empty = [s for s in SPLITS if not columns[s]["id"]]
    if empty:  # datasets cannot load a saved split with no rows, so it is left out
        log.warning("no rows for split(s) %s; the dataset has no such split", ", ".join(empty))
    return datasets.DatasetDict(
        {s: datasets.Dataset.from_dict(columns[s], features=features) for s in SPLITS if s not in empty}
    )


def _save_atomically(dataset, meta: dict, out_dir: Path, overwrite: bool) -> None:
    with staging_dir(out_dir, overwrite) as staging:
        dataset.save_to_disk(str(staging))
        write_json(staging / META_FILE, meta, indent=2)


# ------------------------------------------------------------------------------ reading it back


def load_prepared(path: str | Path):
    """``(DatasetDict, meta)`` for a dataset written by a recipe."""
    import datasets

    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a hemcap dataset (no {META_FILE}); make one with `hemcap prepare`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return datasets.load_from_disk(str(path)), meta


def dataset_schema(meta: dict, where: str | Path = "dataset") -> Schema:
    """The schema a prepared dataset was written with: embedded in its meta (an own YAML need not be
    kept), else a shipped schema by name (datasets written before the schema was embedded)."""
    from hemcap.schema import build_schema

    if meta.get("schema_definition"):
        return build_schema(meta["schema_definition"], source=f"{where}/{META_FILE}")
    if not meta.get("schema"):
        raise ValueError(f"{where}/{META_FILE} names no schema; prepare the dataset again")
    return get_schema(meta["schema"])


def get_split(dataset, split: str):
    """One split, with a message listing the splits there are when it is missing."""
    name = SPLIT_ALIASES.get(split, split)
    if name not in dataset:
        raise ValueError(f"dataset has no split {split!r}; it has: {', '.join(dataset)}")
    return dataset[name]


def iter_attribute_rows(dataset, schema: Schema) -> Iterable[dict[str, str]]:
    """The field values of each row, without decoding images."""
    columns = {name: dataset[name] for name in schema.field_names}
    for i in range(len(dataset)):
        yield {name: values[i] for name, values in columns.items()}
