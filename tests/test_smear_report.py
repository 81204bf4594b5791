"""Smear reports: the differential count, the flags, the JSON round trip, the overlay and the files."""

import json

import numpy as np

from hemcap.schema import get_schema
from hemcap.smear import (UNCLASSIFIED, CellReport, SmearReport, cell_flags, counts_table, differential, draw_overlay,
                          is_complete, read_report, write_report)
from hemcap.synthetic import draw_smear


def test_differential_counts_every_type_and_unclassified():
    schema = get_schema("wbcatt")
    types = schema.values(schema.cell_type_field)
    cells = [_cell(i, {"cell_type": t}) for i, t in enumerate(["Neutrophil", "Neutrophil", "Lymphocyte", None], 1)]
    table = differential(cells, types, schema.cell_type_field)
    assert list(table) == [*types, UNCLASSIFIED]
    assert table["Neutrophil"] == {"count": 2, "percent": 50.0}
    assert table["Lymphocyte"]["percent"] == 25.0 and table[UNCLASSIFIED]["count"] == 1
    assert table["Monocyte"] == {"count": 0, "percent": 0.0}
    assert all(row["percent"] == 0.0 for row in differential([], types, "cell_type").values())
    assert counts_table({"b": 1, "a": 3}, ["a"]) == {"a": {"count": 3, "percent": 75.0}, "b": {"count": 1, "percent": 25.0}}


def test_flags_name_contradictions_missing_type_and_low_confidence():
    flags = cell_flags({"cell_type": None, "cell_size": "big", "nucleus_shape": None},
                       {"cell_type": None, "cell_size": 0.31, "nucleus_shape": None},
                       {"nucleus_shape": ["segmented-bilobed", "unsegmented-band"]}, "cell_type", 0.5)
    assert flags == ["contradiction: nucleus_shape (segmented-bilobed vs unsegmented-band)",
                     "no cell type stated", "low confidence: cell_size (0.31)"]
    assert cell_flags({"cell_type": "Monocyte"}, {"cell_type": 0.9}, {}, "cell_type", 0.5) == []


def test_report_round_trip_overlay_and_files(tmp_path):
    image, _ = draw_smear(1, n_wbc=1)
    cells = [_cell(1, {"cell_type": "Neutrophil"}, box=(100, 100, 220, 210)),
             _cell(2, {"cell_type": None}, box=(0, 0, 60, 50), flags=["no cell type stated"])]
    report = SmearReport("smears/a.jpg", 640, 480, cells, counts_table({"Neutrophil": 1, UNCLASSIFIED: 1}),
                         [2], ["converted grayscale PNG image to 8-bit RGB"])
    data = json.loads(json.dumps(report.to_dict()))
    assert SmearReport.from_dict(data) == report
    overlay = draw_overlay(image, report)
    assert overlay.size == image.size and overlay.mode == "RGB"
    assert np.abs(np.asarray(overlay, int) - np.asarray(image, int)).sum() > 0
    written = write_report(report, image, tmp_path)
    assert written["json"] == tmp_path / "a.json" and written["overlay"] == tmp_path / "a_overlay.png"
    assert read_report(written["json"]) == report and is_complete(tmp_path, "a")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    written["json"].write_text('{"image": "a.jpg", "cells": [')  # cut short
    assert not is_complete(tmp_path, "a")


def _cell(index: int, attributes: dict, box=None, flags=()) -> CellReport:
    return CellReport(index, box, 0.9 if box else None, "a caption", dict(attributes),
                      dict.fromkeys(attributes, 0.8), {}, list(flags))
