"""Cell types scored on labelled smears: reading the labels, matching them to detected cells,
the scores, and `hemcap eval-smears` end to end on synthetic smears (whose true types are known)."""

import csv
import json
import math

import pytest

from hemcap.cli import main
from hemcap.smear.cell_types import MISSED, TypeLabel, confusion_lines, labelled_pairs, read_type_labels, score
from hemcap.smear.report import UNCLASSIFIED, CellReport, SmearReport

TYPES = ("Neutrophil", "Lymphocyte", "Monocyte", "Eosinophil", "Basophil")


def write_csv(path, rows, header=("image", "cell_type", "x0", "y0", "x1", "y1")):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def report_with(cells: list[tuple[tuple, str | None]]) -> SmearReport:
    """A report whose cells have these boxes and stated cell types."""
    reports = [CellReport(i, box, 0.9, "", {"cell_type": kind}, {}, {}, []) for i, (box, kind) in enumerate(cells, 1)]
    differential = {name: {"count": 0, "percent": 0.0} for name in (*TYPES, UNCLASSIFIED)}
    return SmearReport("smear.jpg", 640, 480, reports, differential, [], [])


def test_labels_are_read_in_any_case_and_every_problem_is_named(tmp_path):
    good = write_csv(tmp_path / "good.csv", [("a/s1.jpg", "NEUTROPHIL", "", "", "", ""),
                                             ("s2.jpg", "eosinophil", 10, 20, 110, 120)])
    labels = read_type_labels(good, TYPES)
    assert labels == {"s1.jpg": [TypeLabel("Neutrophil")], "s2.jpg": [TypeLabel("Eosinophil", (10, 20, 110, 120))]}
    bad = write_csv(tmp_path / "bad.csv", [("s1.jpg", "blast", "", "", "", ""), ("s2.jpg", "Monocyte", 1, 2, "x", 4),
                                           ("s3.jpg", "Monocyte", 5, 5, 5, 9)])
    with pytest.raises(ValueError) as error:
        read_type_labels(bad, TYPES)
    message = str(error.value)
    assert "row 2: cell type 'blast'" in message and "row 3: box" in message and "row 4: box" in message
    with pytest.raises(ValueError, match="missing"):
        read_type_labels(write_csv(tmp_path / "x.csv", [("s.jpg",)], header=("image",)), TYPES)


def test_image_labels_score_every_cell_and_boxes_match_one_to_one():
    report = report_with([((0, 0, 100, 100), "Neutrophil"), ((200, 200, 300, 300), "Monocyte"),
                          ((400, 0, 500, 100), None)])
    assert labelled_pairs(report, [TypeLabel("Neutrophil")]) == [
        ("Neutrophil", "Neutrophil"), ("Neutrophil", "Monocyte"), ("Neutrophil", UNCLASSIFIED)]
    boxes = [TypeLabel("Neutrophil", (5, 5, 100, 100)), TypeLabel("Lymphocyte", (210, 190, 300, 300)),
             TypeLabel("Eosinophil", (0, 300, 100, 400))]  # the third overlaps no detection
    assert labelled_pairs(report, boxes) == [("Neutrophil", "Neutrophil"), ("Lymphocyte", "Monocyte"),
                                             ("Eosinophil", MISSED)]
    with pytest.raises(ValueError, match="give boxes"):
        labelled_pairs(report, [TypeLabel("Neutrophil"), TypeLabel("Monocyte")])


def test_scores_and_the_constant_answer_baseline():
    pairs = [("Neutrophil", "Neutrophil")] * 6 + [("Neutrophil", "Monocyte")] * 2 + [("Lymphocyte", "Lymphocyte"),
                                                                                     ("Eosinophil", MISSED)]
    scores = score(pairs)
    assert scores["cells"] == 10 and scores["accuracy"] == 0.7 and scores["missed"] == 1
    assert scores["recall"] == {"Eosinophil": 0.0, "Lymphocyte": 1.0, "Neutrophil": 0.75}
    assert math.isclose(scores["balanced_accuracy"], (0 + 1 + 0.75) / 3)
    constant = score([(true, "Neutrophil") for true, _ in pairs])
    assert constant["accuracy"] == 0.8 and math.isclose(constant["balanced_accuracy"], 1 / 3)
    table = confusion_lines(scores, TYPES)
    assert table[0] == "| labelled \\ given | Neutrophil | Lymphocyte | Monocyte | missed | recall |"
    assert "| Neutrophil | 6 | 0 | 2 | 0 | 75.0% |" in table


def test_eval_smears_command_end_to_end(model_dir, smears, tmp_path, capsys):
    coco = json.loads((smears / "annotations.json").read_text())
    names = {image["id"]: image["file_name"] for image in coco["images"]}
    rows = [(names[a["image_id"]], a["attributes"]["cell_type"], a["bbox"][0], a["bbox"][1],
             a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]) for a in coco["annotations"]]
    rows.append(("not_there.jpg", "Basophil", "", "", "", ""))
    labels = write_csv(tmp_path / "labels.csv", rows)
    out = tmp_path / "eval"
    argv = ["eval-smears", str(smears / "JPEGImages"), "--labels", str(labels), "--model", str(model_dir),
            "--out", str(out), "--red-cell-px", "60", "--max-new-tokens", "6"]
    assert main(argv) == 0
    scores = json.loads((out / "cell_types.json").read_text())
    assert scores["cells"] == len(rows) - 1 and scores["images"] == len(names)  # every labelled cell scored
    assert scores["labels_without_image"] == ["not_there.jpg"] and scores["unlabelled_images"] == []
    assert scores["missed"] <= 1  # the stain detector finds the drawn cells (the tiny captioner's words are noise)
    assert sum(sum(row.values()) for row in scores["confusion"].values()) == scores["cells"]
    printed = capsys.readouterr().out
    assert f"{scores['cells']} labelled cells on {len(names)} images" in printed and "labels without image" in printed
    assert main(argv) == 0  # a second run reuses the reports and scores the same
    assert json.loads((out / "cell_types.json").read_text())["confusion"] == scores["confusion"]
