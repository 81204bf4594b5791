"""The smear pipeline: detect, crop, caption, report; resumable batches; bad input per image.

A tiny random-weight BLIP stands in for a trained captioner: its captions are noise, so these tests
check the pipeline's mechanics (cells found, files written, counts, flags, resumption), not what
the captions say. Synthetic smears carry the true cell boxes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemcap.captions import render
from hemcap.smear.detect import Detection, StainDetector, StainDetectorConfig, YoloPredictions
from hemcap.engine import Caption
from hemcap.smear.pipeline import (
    REPORT_KEYS, UNCLASSIFIED, CellReport, SmearPipeline, SmearReport, cell_flags, counts_table, differential,
    draw_overlay, is_complete, looks_like_cell, merge_summary, output_stems, process_images, read_report,
    write_report,
)
from hemcap.schema import get_schema
from hemcap.synthetic import draw_smear, make_cells, sample_attributes, write_smears

SYNTHETIC = StainDetectorConfig(scale=0.6)  # synthetic smears: red cells ~60 px across, BCCD's ~100
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model is 4-7x faster on one thread than on two on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-weight BLIP saved as ``hemcap train`` saves one (64 px input, 300-token vocabulary)."""
    from hemcap.config import ModelConfig
    from hemcap.models import load_backend

    rng = np.random.default_rng(0)
    captions = [render(sample_attributes(rng)) for _ in range(64)]
    layers = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
    config = ModelConfig(name_or_path=None, backend="blip", init="scratch", vocab_size=300, max_length=64,
                         vision_config=dict(image_size=64, patch_size=16, **layers), text_config=layers)
    return load_backend(config, captions).save(tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def engine(model_dir):
    from hemcap.engine import CaptionEngine

    return CaptionEngine.from_dir(model_dir, max_new_tokens=6)  # short captions: the tests time the pipeline


@pytest.fixture(scope="module")
def pipeline(engine) -> SmearPipeline:
    return SmearPipeline(engine, StainDetector(SYNTHETIC))


@pytest.fixture(scope="module")
def smears(tmp_path_factory) -> Path:
    return write_smears(tmp_path_factory.mktemp("smears") / "set", 4, seed=3)


def true_counts(smear_set: Path) -> dict[str, int]:
    coco = json.loads((smear_set / "annotations.json").read_text())
    counts = {Path(image["file_name"]).stem: 0 for image in coco["images"]}
    stems = {image["id"]: Path(image["file_name"]).stem for image in coco["images"]}
    for ann in coco["annotations"]:
        counts[stems[ann["image_id"]]] += 1
    return counts


# ------------------------------------------------------------------------------ the acceptance run


def test_caption_command_on_synthetic_smears(model_dir, smears, tmp_path, capsys):
    from hemcap.cli import main

    out = tmp_path / "reports"
    argv = ["caption", str(smears / "JPEGImages"), "--model", str(model_dir), "--out", str(out), "--detect",
            "--detector-scale", "0.6", "--max-new-tokens", "6", "--crops"]
    assert main(argv) == 0
    truth = true_counts(smears)
    for stem, n_true in truth.items():
        report = json.loads((out / f"{stem}.json").read_text())
        assert set(report) == REPORT_KEYS
        assert abs(len(report["cells"]) - n_true) <= 1, f"{stem}: {len(report['cells'])} cells found, {n_true} drawn"
        assert report["kind"] == "smear" and (report["width"], report["height"]) == (640, 480)
        assert sum(row["count"] for row in report["differential"].values()) == len(report["cells"])
        for cell in report["cells"]:
            assert set(cell) == {"index", "box", "detector_score", "caption", "attributes", "confidences",
                                 "contradictions", "flags"}
            assert 0 <= cell["box"][0] < cell["box"][2] <= 640 and 0 <= cell["box"][1] < cell["box"][3] <= 480
        with Image.open(out / f"{stem}_overlay.png") as overlay:
            assert overlay.size == (640, 480)
        with Image.open(out / f"{stem}_crops" / "1.png") as crop:
            assert crop.size == (64, 64)  # the captioner's input side
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reports"] == 4 and summary["failed"] == 0
    assert summary["cells"] == sum(len(json.loads((out / f"{s}.json").read_text())["cells"]) for s in truth)
    printed = capsys.readouterr().out
    assert all(f"{stem}.jpg" in printed for stem in truth) and "4 of 4 images reported" in printed


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


def test_caption_command_on_one_cell_prints_its_caption(model_dir, tmp_path, capsys):
    from hemcap.cli import main

    make_cells(1, seed=11, size=64)[0][0].save(tmp_path / "cell.png")
    argv = ["caption", str(tmp_path / "cell.png"), "--model", str(model_dir), "--out", str(tmp_path / "out"),
            "--cell", "--max-new-tokens", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = read_report(tmp_path / "out" / "cell.json")
    assert report.kind == "cell" and f"caption: {report.cells[0].caption}" in printed and "attributes:" in printed


def test_pipeline_settings_are_checked(engine):
    with pytest.raises(ValueError, match="crop_size must be >= 1.*margin must be >= 0.*min_confidence"):
        SmearPipeline(engine, crop_size=-1, margin=-0.1, min_confidence=2)
    assert SmearPipeline(engine).crop_size == 64  # the captioner's input side


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


# ------------------------------------------------------------------------------ counts, flags, files


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


def test_pipeline_flags_from_captions(pipeline):
    caption = Caption("monocyte, large", [1, 2], [0.9, 0.2], {"cell_type": "Monocyte", "cell_size": "big"},
                      {"cell_type": 0.9, "cell_size": 0.2}, {"cell_shape": ("round", "irregular")})
    cell = pipeline._cell(3, Detection((1.2, 2.7, 30.1, 40.0), 0.87654), caption, None)
    assert cell.box == (1, 2, 31, 40) and cell.detector_score == 0.8765
    assert cell.flags == ["contradiction: cell_shape (round vs irregular)", "low confidence: cell_size (0.20)"]
    report = pipeline._report("x.jpg", (64, 48), [cell, _cell(4, {"cell_type": "Monocyte"})], [], "smear")
    assert report.flagged == [3] and report.counts() == {"Monocyte": 2}


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


def test_output_stems_separate_same_named_images():
    stems = output_stems([Path("a/x.jpg"), Path("b/x.jpg"), Path("b/y.png")])
    assert stems[2] == "y" and stems[0] != stems[1] and all(s.startswith("x-") for s in stems[:2])


# ------------------------------------------------------------------------------ batches


def test_restart_skips_finished_images(pipeline, smears, tmp_path):
    images = smears / "JPEGImages"
    first = process_images([images], tmp_path, pipeline, kind="smear", progress=False)
    assert (first["written"], first["reused"], first["reports"]) == (4, 0, 4)
    done = json.loads((tmp_path / "synth_00001.json").read_text())
    (tmp_path / "synth_00002.json").write_text('{"image": "cut short')  # a crash mid-write, before the rename
    (tmp_path / "synth_00003_overlay.png").unlink()
    again = process_images([images], tmp_path, pipeline, kind="smear", progress=False)
    assert (again["written"], again["reused"], again["reports"]) == (2, 2, 4)
    assert again["cells"] == first["cells"] and again["differential"] == first["differential"]
    assert json.loads((tmp_path / "synth_00001.json").read_text()) == done
    assert not list(tmp_path.glob(".summary-part-*"))
    redo = process_images([images], tmp_path, pipeline, kind="smear", overwrite=True, progress=False)
    assert (redo["written"], redo["reused"]) == (4, 0)


def test_bad_inputs_are_reported_per_image(pipeline, tmp_path):
    folder = tmp_path / "in"
    (folder / "nested").mkdir(parents=True)
    smear, _ = draw_smear(7, n_wbc=1, size=(320, 240))
    draw_smear(8, n_wbc=0)[0].save(folder / "empty.jpg")
    smear.convert("L").save(folder / "grey.png")
    smear.convert("RGBA").save(folder / "alpha.png")
    Image.fromarray((np.asarray(smear.convert("L"), np.uint16) * 257)).save(folder / "deep.png")
    smear.convert("CMYK").save(folder / "cmyk.jpg")
    Image.new("1", (7000, 6000)).save(folder / "huge.png")  # 42 MP, a few kB on disk
    smear.save(folder / "corrupt.jpg")
    (folder / "corrupt.jpg").write_bytes((folder / "corrupt.jpg").read_bytes()[:600])
    (folder / "notes.txt").write_text("not an image")
    make_cells(1, seed=9, size=64)[0][0].save(folder / "nested" / "cell.png")

    summary = process_images([folder], tmp_path / "out", pipeline, progress=False)
    problems = {Path(p["file"]).name: p for p in summary["problems"] if "note" not in p}
    notes = {}
    for p in summary["problems"]:
        if "note" in p:
            notes[Path(p["file"]).name] = notes.get(Path(p["file"]).name, "") + p["note"]
    assert "exceeds the limit of 40,000,000" in problems["huge.png"]["error"]
    assert "corrupt or truncated" in problems["corrupt.jpg"]["error"]
    assert problems["notes.txt"]["skipped"].startswith("skipped: not an image")
    assert (summary["images"], summary["failed"], summary["not_images"], summary["reports"]) == (8, 2, 1, 6)
    assert "grayscale" in notes["grey.png"] and "alpha" in notes["alpha.png"]
    assert "16-bit" in notes["deep.png"] and "CMYK" in notes["cmyk.jpg"]
    kinds = {Path(row["image"]).name: (row["kind"], row["cells"]) for row in summary["per_image"]}
    assert kinds["empty.jpg"] == ("smear", 0)  # an empty field: an empty report, not an error
    assert kinds["cell.png"] == ("cell", 1) and kinds["cmyk.jpg"][0] == "smear"
    empty = read_report(tmp_path / "out" / "empty.json")
    assert empty.cells == [] and empty.flagged == [] and all(r["count"] == 0 for r in empty.differential.values())
    grey = read_report(tmp_path / "out" / "grey.json")
    assert any("needs colour" in note for note in grey.notes)


def test_merge_summary_joins_the_processes_shares(pipeline, smears, tmp_path):
    """What the main process does after ``wait_for_everyone``: each process's outcomes plus the
    reports on disk (also those of an earlier run) make one summary."""
    from hemcap.images import iter_images
    from hemcap.smear.pipeline import process_one

    entries = list(iter_images([smears / "JPEGImages", tmp_path / "missing.jpg"]))
    images = [path for path, note in entries if note is None]
    jobs = list(zip(images, output_stems(images)))
    out = tmp_path / "out"
    earlier = process_one(*jobs[0], out, pipeline, "smear")
    shares = [[process_one(*job, out, pipeline, "smear") for job in jobs[1:3]],
              [process_one(*jobs[3], out, pipeline, "smear"), {"file": str(images[3]), "stem": "x", "error": "boom"}]]
    for rank, share in enumerate(shares):
        for outcome in share:
            outcome["process"] = rank
    summary = merge_summary(entries, jobs, shares[0] + shares[1][1:], out, ["Neutrophil"])
    assert "error" not in earlier
    assert (summary["images"], summary["reports"], summary["written"], summary["reused"]) == (4, 3, 2, 1)
    assert {Path(p["file"]).name: p["error"] for p in summary["problems"]} == {
        "missing.jpg": "file not found", images[3].name: "boom"}
    assert [row["process"] for row in summary["per_image"]] == [None, 0, 0]
    assert summary["cells"] == sum(row["cells"] for row in summary["per_image"])
    assert list(summary["differential"])[0] == "Neutrophil"


@pytest.mark.slow
def test_accelerate_launch_splits_images_across_processes(model_dir, smears, tmp_path):
    """Two CPU processes under torchrun (``accelerate launch --cpu`` starts only one): ~15 s."""
    out = tmp_path / "reports"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hemcap.cli",
               "caption", str(smears / "JPEGImages"), "--model", str(model_dir), "--out", str(out), "--detect",
               "--detector-scale", "0.6", "--max-new-tokens", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["reports"] == 4
    assert sorted(row["process"] for row in summary["per_image"]) == [0, 0, 1, 1]
    assert done.stdout.count("4 of 4 images reported") == 1  # only the main process prints


def _cell(index: int, attributes: dict, box=None, flags=()) -> CellReport:
    return CellReport(index, box, 0.9 if box else None, "a caption", dict(attributes),
                      dict.fromkeys(attributes, 0.8), {}, list(flags))
