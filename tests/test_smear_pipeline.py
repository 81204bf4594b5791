"""The smear pipeline: detect, crop and caption one image, as a smear or as one cell.

A tiny random-weight BLIP stands in for a trained captioner (``conftest.py``): its captions are
noise, so these tests check the pipeline's mechanics (cells found, crops, flags), not what the
captions say. Synthetic smears carry the true cell boxes.
"""

import dataclasses

import pytest
from PIL import Image

from hemcap.engine import Caption, CaptionEngine
from hemcap.smear import (CellReport, Detection, SmearPipeline, SmearReport, StainDetector, StainDetectorConfig,
                          YoloPredictions, describe_red_cells, looks_like_cell)
from hemcap.synthetic import draw_smear, make_cells

SYNTHETIC = StainDetectorConfig(scale=0.6)  # synthetic smears: red cells ~60 px across, BCCD's ~100
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------ single cells and the auto rule


def test_run_cell_captions_the_whole_image(pipeline):
    cell, _ = make_cells(1, seed=2, size=96)[0]
    report = pipeline.run_cell(cell.crop((0, 10, 96, 86)), "cell.png")  # not square: padded, not stretched
    assert report.kind == "cell" and len(report.cells) == 1
    only = report.cells[0]
    assert only.index == 1 and only.box is None and only.detector_score is None
    assert only.crop.size == (64, 64)
    assert set(only.attributes) == set(pipeline.engine.schema.field_names)
    assert sum(row["count"] for row in report.differential.values()) == 1


def test_auto_rule_tells_cells_from_smears():
    detector = StainDetector(SYNTHETIC)
    for size in (64, 128):
        for image, _ in make_cells(6, seed=size, size=size):
            assert looks_like_cell(image.size, detector(image)), f"a {size} px synthetic cell read as a smear"
    for seed in range(6):
        image, _ = draw_smear(seed)
        assert not looks_like_cell(image.size, detector(image)), f"smear {seed} read as a cell"
    for seed in range(3):  # a square tile of a smear: small or off-centre cells
        image, _ = draw_smear(seed, size=(480, 480))
        assert not looks_like_cell(image.size, detector(image)), f"square smear {seed} read as a cell"
    empty, _ = draw_smear(0, n_wbc=0)
    assert not looks_like_cell(empty.size, [])  # an empty 4:3 field stays a smear
    filling = Detection((10.0, 5.0, 190.0, 145.0), 0.9)  # one cell filling a 4:3 frame: a cell crop
    assert looks_like_cell((200, 150), [filling])
    centre, whole, cut, fragment = (Detection(box, score) for box, score in [
        ((120.0, 120.0, 240.0, 240.0), 0.95), ((20.0, 20.0, 90.0, 90.0), 0.9),
        ((0.0, 250.0, 60.0, 330.0), 0.9), ((20.0, 20.0, 90.0, 90.0), 0.1)])
    assert looks_like_cell((360, 360), [centre, cut]) and looks_like_cell((360, 360), [centre, fragment])
    assert not looks_like_cell((360, 360), [centre, whole])  # a second whole cell: a square tile of a smear


def test_pipeline_settings_are_checked(engine):
    with pytest.raises(ValueError, match="crop_size must be >= 1.*margin must be >= 0.*min_confidence.*red_cell_px"):
        SmearPipeline(engine, crop_size=-1, margin=-0.1, min_confidence=2, red_cell_px=0)
    assert SmearPipeline(engine).crop_size == 64  # the captioner's input side


def test_a_captioner_that_sees_the_middle_of_its_field_gets_wider_crops(engine, monkeypatch):
    monkeypatch.setattr(engine.backend.info, "centre_crop", 0.5)
    assert SmearPipeline(engine).crop_size == 128  # its centre crop of them is then the input side, unresized


def test_run_auto_picks_the_path(pipeline):
    cell, _ = make_cells(1, seed=4, size=128)[0]
    smear, truth = draw_smear(5, n_wbc=2)
    assert pipeline.run_auto(cell).kind == "cell"
    report = pipeline.run_auto(smear)
    assert report.kind == "smear" and abs(len(report.cells) - len(truth)) <= 1
    assert pipeline.run_auto(smear, kind="cell").kind == "cell"
    with pytest.raises(ValueError, match="kind must be one of"):
        pipeline.run_auto(smear, kind="slide")


def test_pipeline_uses_another_tools_boxes(engine, tmp_path):
    smear, truth = draw_smear(6, n_wbc=2)
    lines = []
    for cell in truth:
        x0, y0, x1, y1 = cell["box"]
        lines.append(f"0 {(x0 + x1) / 1280} {(y0 + y1) / 960} {(x1 - x0) / 640} {(y1 - y0) / 480} 0.8")
    (tmp_path / "smear6.txt").write_text("\n".join(lines))
    report = SmearPipeline(engine, YoloPredictions(tmp_path)).run(smear, "images/smear6.jpg")
    assert [cell.detector_score for cell in report.cells] == [0.8, 0.8]
    assert report.cells[0].box == tuple(truth[0]["box"])


# ------------------------------------------------------------------------------ flags


def test_pipeline_flags_from_captions(pipeline):
    caption = Caption("monocyte, large", [1, 2], [0.9, 0.2], {"cell_type": "Monocyte", "cell_size": "big"},
                      {"cell_type": 0.9, "cell_size": 0.2}, {"cell_shape": ("round", "irregular")})
    cell = pipeline._cell(3, Detection((1.2, 2.7, 30.1, 40.0), 0.87654), caption, None)
    assert cell.box == (1, 2, 31, 40) and cell.detector_score == 0.8765
    assert cell.flags == ["contradiction: cell_shape (round vs irregular)", "low confidence: cell_size (0.20)"]
    monocyte = CellReport(4, None, None, "a caption", {"cell_type": "Monocyte"}, {"cell_type": 0.8}, {}, [])
    report = pipeline._report("x.jpg", (64, 48), [cell, monocyte], [], "smear")
    assert report.flagged == [3] and report.counts() == {"Monocyte": 2}


def test_report_records_the_red_cell_size_used_and_where_it_came_from(engine):
    image, cells = draw_smear(1)
    measured = SmearPipeline(engine, StainDetector()).run(image, "smear.png")
    assert measured.red_cells["origin"] == "estimated" and measured.red_cells["method"] == "red-cell discs"
    assert 50 <= measured.red_cells["px"] <= 70  # hemcap.synthetic red cells: ~57-62 px at 640x480
    assert len(measured.cells) == len(cells)  # the detector worked at the measured magnification
    given = SmearPipeline(engine, StainDetector(), red_cell_px=60).run(image, "smear.png")
    assert given.red_cells == {"px": 60.0, "confidence": 1.0, "cells": 0, "origin": "given", "note": "", "method": ""}
    assert describe_red_cells(given.red_cells) == "red cells 60 px (given)"
    assert describe_red_cells(measured.red_cells).startswith("red cells ") and "estimated: red-cell discs" in \
        describe_red_cells(measured.red_cells)
    blank = SmearPipeline(engine, StainDetector()).run(Image.new("RGB", (640, 480), (235, 230, 228)), "blank.png")
    assert blank.red_cells["origin"] == "default" and any("red-cell size" in note for note in blank.notes)
    assert SmearReport.from_dict(given.to_dict()).red_cells == given.red_cells


# ------------------------------------------------------------------------------ the captioner's training domain


@pytest.fixture(scope="module")
def domain_engine(model_dir, tmp_path_factory):
    """The tiny captioner as if trained on 240 px fields with 60 px red cells (the synthetic smears')."""
    import shutil

    from hemcap.domain import measure_domain
    from hemcap.engine import CaptionEngine
    from hemcap.models.info import read_model_info, write_model_info

    folder = tmp_path_factory.mktemp("domain") / "model"
    shutil.copytree(model_dir, folder)
    domain = dataclasses.replace(measure_domain([draw_smear(s, size=(240, 240))[0] for s in range(3)], "anchors"),
                                 red_cell_px=60.0, field_px=240.0)
    info = read_model_info(folder)
    info.magnification, info.colour = domain.info_fields(3)
    write_model_info(folder, info)
    return CaptionEngine.from_dir(folder, max_new_tokens=6)


class TrueBoxes:
    """A detector that returns the smear's true white-cell boxes, scaled with the image."""

    def __init__(self, boxes, scale=1.0):
        self.boxes = [Detection(tuple(v * scale for v in box), 1.0) for box in boxes]

    def __call__(self, image, path=None, red_cell_px=None):
        return list(self.boxes)


def test_cells_are_cropped_over_the_training_field_at_the_smears_magnification(domain_engine):
    import numpy as np

    image, cells = draw_smear(1)
    boxes = [cell["box"] for cell in cells]
    larger = image.resize((960, 720), Image.BICUBIC)  # the same smear at 1.5x the magnification
    native = SmearPipeline(domain_engine, TrueBoxes(boxes), red_cell_px=60).run(image, "smear.png")
    zoomed = SmearPipeline(domain_engine, TrueBoxes(boxes, 1.5), red_cell_px=90).run(larger, "zoomed.png")
    assert native.domain["field_px"] == 240 and zoomed.domain["field_px"] == 360
    assert native.domain["stain_norm"] == "anchors"
    for a, b in zip(native.cells, zoomed.cells):  # the same field of view, whatever the magnification
        assert np.abs(np.asarray(a.crop, float) - np.asarray(b.crop, float)).mean() < 6
    raw = CaptionEngine(domain_engine.backend, settings=dataclasses.replace(domain_engine.settings, stain_norm=False))
    assert SmearPipeline(raw, TrueBoxes(boxes), red_cell_px=60).run(image, "smear.png").domain["stain_norm"] == "off"


def test_a_smear_of_unknown_magnification_is_cropped_by_its_boxes_and_warned(domain_engine):
    blank = Image.new("RGB", (320, 240), (235, 230, 228))
    report = SmearPipeline(domain_engine, TrueBoxes([(100, 60, 160, 120)])).run(blank, "blank.png")
    assert report.red_cells["origin"] == "default" and report.domain["field_px"] is None
    assert any("framed by each cell's box" in note for note in report.notes)
    assert report.warning and "magnification could not be measured" in report.warning
    assert SmearReport.from_dict(report.to_dict()).warning == report.warning


def test_another_labs_colours_are_warned(domain_engine):
    from hemcap.looks import Look, restyle

    image, cells = draw_smear(2)
    boxes = [cell["box"] for cell in cells]
    own = SmearPipeline(domain_engine, TrueBoxes(boxes), red_cell_px=60).run(image, "own.png")
    blue = restyle(image, Look("blue lab", (60.0, -5.0, -25.0), (20.0, 6.0, 9.0)))
    other = SmearPipeline(domain_engine, TrueBoxes(boxes), red_cell_px=60).run(blue, "blue.png")
    assert own.domain["shift"]["colour"] < 3 < other.domain["shift"]["colour"]
    assert "training spreads away" in other.warning and not any("spreads" in r for r in own.domain["shift"]["reasons"])


def test_a_cell_image_says_which_magnification_it_was_taken_at(domain_engine):
    pipeline = SmearPipeline(domain_engine, StainDetector(SYNTHETIC))
    image, _ = draw_smear(3, size=(240, 240))
    measured = pipeline.run_cell(image, "cell.png")
    assert any("cropped to the training field" in note for note in measured.notes)
    bare = pipeline.run_cell(Image.new("RGB", (96, 96), (235, 230, 228)), "bare.png")
    assert any("taken to be at the training magnification" in note for note in bare.notes)
