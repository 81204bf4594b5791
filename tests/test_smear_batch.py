"""The one batch runner behind ``hemcap detect`` and ``hemcap caption``: output names, bad input
per image, resumption, the processes' shares merged into one summary, and each command's files.

The caption tests use the tiny random-weight BLIP of ``conftest.py``; synthetic smears carry the
true cell boxes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemcap.cli import main
from hemcap.smear import (CocoPredictions, StainDetector, StainDetectorConfig, output_stems, process_images,
                          read_report, write_detections)
from hemcap.smear.batch import CaptionTask, merge_summary, plan, run_one
from hemcap.smear.report import REPORT_KEYS
from hemcap.synthetic import draw_smear, make_cells

SYNTHETIC = StainDetectorConfig(scale=0.6)  # synthetic smears: red cells ~60 px across, BCCD's ~100
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------ output names


def test_output_stems_separate_same_named_images():
    stems = output_stems([Path("a/x.jpg"), Path("b/x.jpg"), Path("b/y.png")])
    assert stems[2] == "y" and stems[0] != stems[1] and all(s.startswith("x-") for s in stems[:2])


def test_output_stems_never_take_the_runs_own_file_names():
    stems = output_stems([Path("a/summary.jpg"), Path("a/Problems.png"), Path("a/detections.tif"), Path("a/X.png"),
                          Path("b/x.jpg"), Path("a/cell.png")])
    assert all(s.startswith(n + "-") for s, n in zip(stems, ("summary", "Problems", "detections", "X", "x")))
    assert stems[-1] == "cell"


# ------------------------------------------------------------------------------ hemcap caption


def true_counts(smear_set: Path) -> dict[str, int]:
    coco = json.loads((smear_set / "annotations.json").read_text())
    counts = {Path(image["file_name"]).stem: 0 for image in coco["images"]}
    stems = {image["id"]: Path(image["file_name"]).stem for image in coco["images"]}
    for ann in coco["annotations"]:
        counts[stems[ann["image_id"]]] += 1
    return counts




def test_caption_command_on_synthetic_smears(model_dir, smears, tmp_path, capsys):
    out = tmp_path / "reports"
    argv = ["caption", str(smears / "JPEGImages"), "--model", str(model_dir), "--out", str(out), "--detect",
            "--red-cell-px", "60", "--max-new-tokens", "6", "--crops"]
    assert main(argv) == 0
    truth = true_counts(smears)
    for stem, n_true in truth.items():
        report = json.loads((out / f"{stem}.json").read_text())
        assert set(report) == REPORT_KEYS | {"red_cells", "domain"}
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


def test_caption_command_on_one_cell_prints_its_caption(model_dir, tmp_path, capsys):
    make_cells(1, seed=11, size=64)[0][0].save(tmp_path / "cell.png")
    argv = ["caption", str(tmp_path / "cell.png"), "--model", str(model_dir), "--out", str(tmp_path / "out"),
            "--cell", "--max-new-tokens", "4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = read_report(tmp_path / "out" / "cell.json")
    assert report.kind == "cell" and f"caption: {report.cells[0].caption}" in printed and "attributes:" in printed


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
    """What every process does once the shares are gathered: each process's outcomes plus the
    reports of an earlier run make one summary."""
    entries, jobs = plan([smears / "JPEGImages", tmp_path / "missing.jpg"])
    task = CaptionTask(pipeline, tmp_path / "out", "smear")
    earlier = run_one(jobs[0], task)
    shares = [[run_one(job, task) for job in jobs[1:3]],
              [run_one(jobs[3], task), {"file": str(jobs[3].path), "stem": jobs[3].stem, "error": "boom"}]]
    for rank, share in enumerate(shares):
        for outcome in share:
            outcome["process"] = rank
    reused = {jobs[0].stem: task.reuse(jobs[0].stem)}
    summary = task.summarise(merge_summary(entries, jobs, shares[0] + shares[1][1:], reused))
    assert "error" not in earlier
    assert (summary["images"], summary["reports"], summary["written"], summary["reused"]) == (4, 3, 2, 1)
    assert {Path(p["file"]).name: p["error"] for p in summary["problems"]} == {
        "missing.jpg": "file not found", jobs[3].path.name: "boom"}
    assert [row["process"] for row in summary["per_image"]] == [None, 0, 0]
    assert summary["cells"] == sum(row["cells"] for row in summary["per_image"])
    assert list(summary["differential"])[:len(pipeline.cell_types)] == list(pipeline.cell_types)


@pytest.mark.slow
def test_accelerate_launch_splits_images_across_processes(model_dir, smears, tmp_path):
    """Two CPU processes under torchrun (``accelerate launch --cpu`` starts only one): ~15 s."""
    out = tmp_path / "reports"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hemcap.cli",
               "caption", str(smears / "JPEGImages"), "--model", str(model_dir), "--out", str(out), "--detect",
               "--red-cell-px", "60", "--max-new-tokens", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["reports"] == 4
    assert sorted(row["process"] for row in summary["per_image"]) == [0, 0, 1, 1]
    assert done.stdout.count("4 of 4 images reported") == 1  # only the main process prints


# ------------------------------------------------------------------------------ hemcap detect


def test_write_detections_round_trips_through_the_coco_adapter(tmp_path):
    smear, cells = draw_smear(0)
    smear.save(tmp_path / "smear.png")
    out, summary = write_detections([tmp_path / "smear.png"], tmp_path / "out", StainDetector(SYNTHETIC), crop_size=96)
    coco = json.loads((out / "detections.json").read_text())
    assert len(coco["annotations"]) == summary["per_image"][0]["cells"] == len(cells)
    assert all((out / ann["crop"]).is_file() for ann in coco["annotations"])
    assert Image.open(out / coco["annotations"][0]["crop"]).size == (96, 96)
    again = CocoPredictions(out / "detections.json")(smear, path=tmp_path / "smear.png")
    red_cell_px = summary["per_image"][0]["red_cells"]["px"]  # measured on the smear, recorded with its boxes
    direct = StainDetector(SYNTHETIC)(smear, red_cell_px=red_cell_px)
    assert np.allclose([d.box for d in again], [d.box for d in direct], atol=0.01)


def _mixed_folder(folder):
    """A smear, a no-cell image, grayscale, RGBA, 16-bit, CMYK, corrupt, huge, text and a sub-folder."""
    folder.mkdir()
    smear, _ = draw_smear(7)
    smear.save(folder / "smear.jpg", quality=92)
    Image.new("RGB", (64, 48), (235, 230, 225)).save(folder / "empty.png")
    smear.convert("L").save(folder / "gray.png")
    smear.convert("RGBA").save(folder / "alpha.png")
    Image.fromarray((np.asarray(smear.convert("L"), np.uint16) * 257)).save(folder / "deep.png")
    smear.convert("CMYK").save(folder / "cmyk.jpg")
    (folder / "broken.jpg").write_bytes((folder / "smear.jpg").read_bytes()[:2000])
    Image.new("RGB", (1200, 1000)).save(folder / "huge.png")
    (folder / "labels.csv").write_text("a,b\n")
    (folder / "sub").mkdir()
    smear.save(folder / "sub" / "smear.jpg", quality=92)  # same stem as the first one


def test_detect_batch_reports_each_bad_file_and_goes_on(tmp_path):
    _mixed_folder(tmp_path / "in")
    detector = StainDetector(SYNTHETIC)
    out, summary = write_detections([tmp_path / "in"], tmp_path / "out", detector, crop_size=64, max_pixels=1_000_000)
    name = lambda file: Path(file).relative_to(tmp_path / "in").as_posix()  # noqa: E731
    rows = {name(row["image"]): row for row in summary["per_image"]}
    problems = json.loads((out / "problems.json").read_text())
    assert problems == summary["problems"]
    said = {}  # file -> what problems.json says about it: errors, skips and notes
    for problem in problems:
        said.setdefault(name(problem.pop("file")), []).extend(problem.items())
    assert said["broken.jpg"][0][0] == "error" and "corrupt or truncated" in said["broken.jpg"][0][1]
    assert said["huge.png"][0][0] == "error" and "exceeds the limit of 1,000,000" in said["huge.png"][0][1]
    assert said["labels.csv"][0][0] == "skipped" and "not an image" in said["labels.csv"][0][1]
    assert {file for file, items in said.items() if items[0][0] in ("error", "skipped")} == {
        "broken.jpg", "huge.png", "labels.csv"}
    assert rows["empty.png"]["cells"] == 0 and rows["empty.png"]["red_cells"]["origin"] == "default"
    assert [kind for kind, note in said["empty.png"] if "red-cell size" not in note] == []  # only that it was guessed
    assert rows["smear.jpg"]["cells"] and rows["sub/smear.jpg"]["cells"]
    assert rows["cmyk.jpg"]["cells"] and rows["alpha.png"]["cells"]
    assert any("grayscale" in note for _, note in said["gray.png"]) and rows["gray.png"]["cells"] == 0
    assert any("needs colour" in note for _, note in said["gray.png"])
    assert any("16-bit" in note for _, note in said["deep.png"])
    coco = json.loads((out / "detections.json").read_text())
    crops = sorted(p.name for p in (out / "crops").iterdir())
    assert crops == sorted(Path(ann["crop"]).name for ann in coco["annotations"])
    stems = output_stems([tmp_path / "in" / "smear.jpg", tmp_path / "in" / "sub" / "smear.jpg"])
    for stem, image in zip(stems, ("smear.jpg", "sub/smear.jpg")):  # the caption command's names: no overwriting
        assert sum(crop.startswith(f"{stem}_") for crop in crops) == rows[image]["cells"] > 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_detections([tmp_path / "in"], out, detector)


def test_cli_detect(tmp_path, capsys):
    smear, cells = draw_smear(11)
    smear.save(tmp_path / "smear.png")
    (tmp_path / "junk.jpg").write_text("nope")
    code = main(["detect", str(tmp_path / "smear.png"), str(tmp_path / "junk.jpg"), "--out", str(tmp_path / "o"),
                 "--red-cell-px", "60", "--crop-size", "32"])
    captured = capsys.readouterr()
    assert code == 0 and f"files: 1 read, 1 unreadable, 0 not images; {len(cells)} cells" in captured.out
    assert "junk.jpg" in captured.err
    assert main(["detect", str(tmp_path / "smear.png"), "--out", str(tmp_path / "o")]) == 2  # exists
