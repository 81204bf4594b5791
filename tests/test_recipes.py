import csv
import json
import time

import numpy as np
import pytest
from PIL import Image

from hemcap.captions import parse
from hemcap.recipes import (
    RecipeError,
    load_prepared,
    prepare_csv,
    prepare_leukemiaattri,
    prepare_synthetic,
)
from hemcap.schema import load_schema

WBCATT = load_schema("wbcatt")
NEUTROPHIL = {
    "label": "Neutrophil", "cell_size": "big", "cell_shape": "round", "nucleus_shape": "unsegmented-band",
    "nuclear_cytoplasmic_ratio": "low", "chromatin_density": "densely", "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear", "cytoplasm_colour": "light blue", "granule_type": "small",
    "granule_colour": "pink", "granularity": "yes",
}


def cell_image(seed: int = 0, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def write_table(folder, rows, images=None):
    """A user CSV with one image per row (RGB JPEG unless ``images`` gives another)."""
    images = images or {}
    for i, row in enumerate(rows):
        path = folder / row["path"]
        if row["path"] not in images:
            cell_image(i).save(path)
        elif images[row["path"]] is not None:
            images[row["path"]](path)
    table = folder / "cells.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return table


def table_rows(n, **changes):
    splits = ["train", "train", "val", "test"]
    return [dict(NEUTROPHIL, path=f"cell{i}.jpg", split=splits[i % 4], **changes) for i in range(n)]


# ----------------------------------------------------------------------------------- csv recipe


def test_csv_recipe_writes_every_column(tmp_path):
    rows = table_rows(8)
    rows[1]["label"] = "Eosinophil"
    out = prepare_csv(write_table(tmp_path, rows), tmp_path / "ds", n_paraphrases=2)
    dataset, meta = load_prepared(out)
    assert meta["schema"] == "wbcatt" and meta["recipe"] == "csv"
    assert {s: len(dataset[s]) for s in dataset} == {"train": 4, "validation": 2, "test": 2}
    row = dataset["train"][1]
    assert row["id"] == "cell1.jpg" and row["cell_type"] == "Eosinophil" and row["source"] == "csv"
    assert row["image"].mode == "RGB" and row["image"].size == (48, 48)
    assert len(row["captions"]) == len(WBCATT.templates) + 2
    assert row["caption"] == row["captions"][0]
    expected = {n: row[n] for n in WBCATT.field_names}
    assert all(parse(c) == expected for c in row["captions"])


def test_csv_stores_original_jpeg_bytes(tmp_path):
    out = prepare_csv(write_table(tmp_path, table_rows(4)), tmp_path / "ds")
    dataset, _ = load_prepared(out)
    stored = dataset["train"].cast_column("image", __import__("datasets").Image(decode=False))[0]["image"]["bytes"]
    assert stored == (tmp_path / "cell0.jpg").read_bytes()


def test_csv_without_split_column_hash_splits(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "split"} for r in table_rows(40)]
    dataset, _ = load_prepared(prepare_csv(write_table(tmp_path, rows), tmp_path / "ds", split_column=None))
    sizes = {s: len(dataset[s]) for s in dataset}
    assert sum(sizes.values()) == 40 and sizes["train"] > sizes["test"]


def test_custom_schema_file(tmp_path):
    schema_text = """
name: tiny
targets: [cell_type]
fields:
  cell_type: {values: {Blast: [blast], Lymphocyte: [lymphocyte]}}
  nucleoli: {values: {"yes": [visible nucleoli], "no": [no nucleoli]}}
clauses:
  subject: ["{cell_type}"]
  nucleoli: ["{nucleoli}"]
templates:
  - ["{subject} with {nucleoli}"]
"""
    (tmp_path / "tiny.yaml").write_text(schema_text)
    rows = [{"path": f"c{i}.jpg", "cell_type": "Blast", "nucleoli": "yes", "split": "train"} for i in range(3)]
    out = prepare_csv(write_table(tmp_path, rows), tmp_path / "ds", schema=str(tmp_path / "tiny.yaml"))
    dataset, meta = load_prepared(out)
    assert meta["schema"] == "tiny"
    assert dataset["train"][0]["caption"] == "Blast with visible nucleoli."


# ----------------------------------------------------------------------------------- bad input


def expect_problems(tmp_path, rows, images=None, **kwargs) -> str:
    table = write_table(tmp_path, rows, images)
    with pytest.raises(RecipeError) as error:
        prepare_csv(table, tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists(), "nothing is half-written"
    assert not list(tmp_path.glob(".ds.partial*"))
    return str(error.value)


def test_every_bad_row_is_reported_at_once(tmp_path):
    rows = table_rows(6)
    rows[1]["cell_size"] = "huge"
    rows[2]["label"] = "Blast"
    rows[3]["path"] = "cell0.jpg"  # duplicate id
    rows[4]["split"] = "holdout"
    message = expect_problems(tmp_path, rows, images={"cell0.jpg": lambda p: cell_image().save(p)})
    assert "4 problem(s)" in message
    assert "cells.csv line 3: cell_size='huge' is not a wbcatt value (expected one of big, small)" in message
    assert "cells.csv line 4: cell_type='Blast'" in message
    assert "cells.csv line 5: duplicate id 'cell0.jpg' (first at cells.csv line 2)" in message
    assert "cells.csv line 6: column 'split': unknown split 'holdout'" in message


def test_missing_columns_are_listed(tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("granularity", "label")} for r in table_rows(2)]
    message = expect_problems(tmp_path, rows)
    assert "missing column 'label'" in message and "missing column 'granularity'" in message


def test_bad_image_files(tmp_path):
    rows = table_rows(5)
    images = {
        "cell0.jpg": None,  # missing
        "cell1.jpg": lambda p: p.write_bytes(cell_jpeg()[:300]),  # truncated
        "cell2.jpg": lambda p: p.write_text("name,value\n"),  # not an image
    }
    message = expect_problems(tmp_path, rows, images)
    assert "cells.csv line 2: " in message and "cell0.jpg: file not found" in message
    assert "cells.csv line 3: " in message and "corrupt or truncated" in message
    assert "cells.csv line 4: " in message and "not an image file" in message
    assert "3 problem(s)" in message


def cell_jpeg() -> bytes:
    import io

    buffer = io.BytesIO()
    cell_image(size=96).save(buffer, format="JPEG")
    return buffer.getvalue()


ODD_MODES = {
    "grayscale": lambda p: cell_image().convert("L").save(p.with_suffix(".png")),
    "RGBA (alpha channel)": lambda p: cell_image().convert("RGBA").save(p.with_suffix(".png")),
    "16-bit grayscale": lambda p: Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(p.with_suffix(".png")),
    "CMYK": lambda p: cell_image().convert("CMYK").save(p.with_suffix(".jpg")),
}


@pytest.mark.parametrize("mode_name", sorted(ODD_MODES))
def test_unusual_modes_are_refused_unless_converted(tmp_path, mode_name):
    suffix = ".jpg" if mode_name == "CMYK" else ".png"
    rows = table_rows(2)
    rows[0]["path"] = "odd" + suffix
    message = expect_problems(tmp_path, rows, {rows[0]["path"]: ODD_MODES[mode_name]})
    assert f"{mode_name} " in message and "--convert-images" in message
    dataset, _ = load_prepared(prepare_csv(tmp_path / "cells.csv", tmp_path / "ds", convert_images=True))
    assert dataset["train"][0]["image"].mode == "RGB"


def test_existing_output_needs_overwrite(tmp_path):
    table = write_table(tmp_path, table_rows(4))
    out = prepare_csv(table, tmp_path / "ds")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        prepare_csv(table, out)
    rows = table_rows(8)
    write_table(tmp_path, rows)
    prepare_csv(table, out, overwrite=True)
    dataset, _ = load_prepared(out)
    assert sum(len(dataset[s]) for s in dataset) == 8


def test_failed_overwrite_keeps_the_old_dataset(tmp_path):
    out = prepare_csv(write_table(tmp_path, table_rows(4)), tmp_path / "ds")
    rows = table_rows(4)
    rows[0]["cell_size"] = "huge"
    with pytest.raises(RecipeError):
        prepare_csv(write_table(tmp_path, rows), out, overwrite=True)
    dataset, _ = load_prepared(out)
    assert dataset["train"][0]["cell_size"] == "big"


def test_not_utf8_and_missing_table(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("path,label\ncaf\xe9.jpg,x\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8"):
        prepare_csv(tmp_path / "latin1.csv", tmp_path / "ds")
    with pytest.raises(RecipeError, match="annotation file not found"):
        prepare_csv(tmp_path / "nope.csv", tmp_path / "ds")


def test_load_prepared_explains_a_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a hemcap dataset"):
        load_prepared(tmp_path)


def test_image_paths_must_stay_inside_the_root(tmp_path):
    root = tmp_path / "lab"
    root.mkdir()
    secret = tmp_path / "secret.jpg"
    cell_image(9).save(secret)  # a readable image outside the root: only the path gives it away
    rows = table_rows(4)
    rows[1]["path"], rows[2]["path"] = str(secret), "../secret.jpg"
    images = {str(secret): None, "../secret.jpg": None}
    message = expect_problems(root, rows, images=images)
    assert "2 problem(s)" in message
    assert f"cells.csv line 3: image path {str(secret)!r} leads outside the image folder {root}" in message
    assert "cells.csv line 4: image path '../secret.jpg' leads outside" in message
    assert "--allow-outside-root" in message
    dataset, _ = load_prepared(prepare_csv(root / "cells.csv", tmp_path / "ds", allow_outside_root=True))
    assert sum(len(dataset[s]) for s in dataset) == 4


def test_coco_file_names_must_stay_inside_the_images_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    coco = write_lld_fixture(tmp_path, n_smears=2)  # smears written beside, not inside, images/
    data = json.loads(coco.read_text())
    data["images"][0]["file_name"] = "../lld0.jpg"
    data["images"][1]["file_name"] = str(tmp_path / "lld1.jpg")
    coco.write_text(json.dumps(data))
    with pytest.raises(RecipeError) as error:
        prepare_leukemiaattri(coco, images, tmp_path / "ds")
    assert "lld.json image 0: image path '../lld0.jpg' leads outside the image folder" in str(error.value)
    assert "lld.json image 1: image path" in str(error.value)
    dataset, _ = load_prepared(prepare_leukemiaattri(coco, images, tmp_path / "ds", allow_outside_root=True))
    assert sum(len(dataset[s]) for s in dataset) == 4

# ----------------------------------------------------------------------------- leukemiaattri


LLD_CELL = {"cell_size": 2, "nuclear_chromatio": 0, "nuclear_shape": 1, "nucleolus": 1, "cytoplasm": 0,
            "cytoplasmic_basophilia": "moderate", "cytoplasmic_vacuoles": "absent"}


def write_lld_fixture(folder, n_smears=4, bad=False, name="lld"):
    """A small LeukemiaAttri-style COCO file: smears with boxed cells, codes and strings mixed."""
    images, annotations = [], []
    for i in range(n_smears):
        Image.new("RGB", (200, 150), (230, 200, 200)).save(folder / f"{name}{i}.jpg")
        images.append({"id": i, "file_name": f"{name}{i}.jpg", "width": 200, "height": 150,
                       "diagnosis": ["AML", "ALL", "healthy", "CML"][i % 4]})
        for j, bbox in enumerate([[10, 10, 40, 40], [150, 100, 45, 45]]):  # the second runs off the edge
            annotations.append({"id": i * 10 + j, "image_id": i, "bbox": bbox, "category_id": 1 + (j % 2),
                                "attributes": dict(LLD_CELL)})
    if bad:
        annotations[0]["attributes"]["cell_size"] = 7
        annotations[1]["attributes"]["nucleolus"] = "huge"
        annotations.append({"id": 999, "image_id": 42, "bbox": [0, 0, 5, 5], "category_id": 1})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "Myeloblast"}, {"id": 2, "name": "Lymphocyte"}]}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(coco))
    return path


def test_leukemiaattri_crops_and_captions(tmp_path):
    coco = write_lld_fixture(tmp_path)
    out = prepare_leukemiaattri({"train": coco, "test": write_lld_fixture(tmp_path, n_smears=1, name="test")},
                                tmp_path, tmp_path / "ds", crop_size=64)
    dataset, meta = load_prepared(out)
    assert meta["schema"] == "leukemiaattri"
    assert len(dataset["train"]) == 8 and "validation" not in dataset
    row = dataset["train"][0]
    assert row["image"].size == (64, 64)
    assert row["cell_size"] == "large" and row["nuclear_chromatin"] == "open" and row["diagnosis"] == "AML"
    assert row["cell_type"] == "Myeloblast"
    assert parse(row["caption"], "leukemiaattri") == {n: row[n] for n in load_schema("leukemiaattri").field_names}


def test_leukemiaattri_single_file_splits_by_smear(tmp_path):
    coco = write_lld_fixture(tmp_path, n_smears=12)
    dataset, _ = load_prepared(prepare_leukemiaattri(coco, tmp_path, tmp_path / "ds"))
    for split in dataset:
        smears = {i.rsplit("-", 1)[0] for i in dataset[split]["id"]}
        others = {i.rsplit("-", 1)[0] for s in dataset if s != split for i in dataset[s]["id"]}
        assert not smears & others


def test_leukemiaattri_bad_annotations(tmp_path):
    coco = write_lld_fixture(tmp_path, bad=True)
    with pytest.raises(RecipeError) as error:
        prepare_leukemiaattri(coco, tmp_path, tmp_path / "ds")
    message = str(error.value)
    assert "lld.json annotation #0: cell_size code 7 out of range 0..2" in message
    assert "nucleolus='huge'" in message
    assert "image_id 42 is not in images[]" in message


# ---------------------------------------------------------------------------------- synthetic


def test_synthetic_recipe_is_deterministic(tmp_path):
    a = prepare_synthetic(tmp_path / "a", n_train=10, n_val=3, n_test=4, size=64, seed=1)
    b = prepare_synthetic(tmp_path / "b", n_train=10, n_val=3, n_test=4, size=64, seed=1)
    da, _ = load_prepared(a)
    db, _ = load_prepared(b)
    assert {s: len(da[s]) for s in da} == {"train": 10, "validation": 3, "test": 4}
    assert da["train"]["captions"] == db["train"]["captions"]
    assert np.array_equal(np.asarray(da["test"][2]["image"]), np.asarray(db["test"][2]["image"]))
    assert set(da["train"]["id"]).isdisjoint(da["test"]["id"])


@pytest.mark.realdata
def test_wbcatt_recipe_official_split(shared_data, tmp_path):
    from hemcap.recipes import prepare_wbcatt

    started = time.perf_counter()
    dataset, meta = load_prepared(prepare_wbcatt(shared_data, tmp_path / "wbcatt", n_paraphrases=1))
    elapsed = time.perf_counter() - started
    assert {s: len(dataset[s]) for s in dataset} == {"train": 6169, "validation": 1030, "test": 3099}
    row = dataset["test"][0]
    assert row["image"].size == (360, 363)
    assert parse(row["caption"]) == {n: row[n] for n in WBCATT.field_names}
    print(f"prepare wbcatt: {elapsed:.1f} s")
