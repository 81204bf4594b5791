"""The learned detector: its targets and boxes agree, augmentation moves boxes with the pixels, the
folder reloads, and `hemcap train-detector` then `hemcap detect --detector` work end to end."""

import json
import shutil

import numpy as np
import pytest
import torch

from hemcap.cli import main
from hemcap.smear.labelled import load_smears, without_copies
from hemcap.smear.learned import (INFO, STRIDE, WEIGHTS, DetectorInfo, NetConfig, build_net, decode, load_detector,
                                  read_detector_info, save_detector)
from hemcap.smear.train_detector import DetectorTrainingConfig, Sample, _flip_turn, targets
from hemcap.synthetic import write_smears


def maps_from_targets(boxes: np.ndarray, side: int, config: NetConfig) -> torch.Tensor:
    """The output maps a perfect network would give: logits of the heat map, exact offsets and sizes."""
    heat, centres = targets(boxes, side, len(config.classes), config.work_red_cell_px)
    n = len(config.classes)
    maps = torch.zeros(n + 4, side // STRIDE, side // STRIDE)
    maps[:n] = torch.logit(torch.from_numpy(heat).clamp(1e-4, 1 - 1e-4))
    for c, y, x, *values in centres:
        maps[n:, y, x] = torch.tensor(values)
    return maps


def test_decoding_the_targets_gives_back_the_boxes():
    config = NetConfig()
    boxes = np.array([[10, 20, 58, 66, 0], [70, 5, 95, 29, 1], [80, 80, 104, 103, 1]], np.float32)
    maps = maps_from_targets(boxes, 128, config)
    for label, index in (("WBC", 0), ("RBC", 1)):
        found = decode(maps, config, label, min_score=0.5, max_detections=10)
        wanted = boxes[boxes[:, 4] == index, :4]
        assert len(found) == len(wanted) and all(score > 0.99 for _, score in found)
        got = np.array(sorted(box for box, _ in found))
        assert np.allclose(got, wanted[np.argsort(wanted[:, 0])], atol=1e-3)


@pytest.mark.parametrize("seed", range(8))
def test_flips_and_turns_move_the_boxes_with_the_pixels(seed):
    pixels = np.full((40, 60, 3), 255, np.uint8)
    pixels[5:15, 30:50] = 0  # a dark cell in the box (30, 5, 50, 15)
    sample = Sample(pixels, np.array([[30, 5, 50, 15, 1]], np.float32))
    turned, boxes = _flip_turn(sample.pixels, sample.boxes, np.random.default_rng(seed))
    x0, y0, x1, y1, label = boxes[0].astype(int)
    assert label == 1 and (turned[y0:y1, x0:x1] == 0).all() and (turned[..., 0] == 0).sum() == 200


def test_detector_folder_round_trip_and_clear_errors(tmp_path):
    info = DetectorInfo(net=NetConfig(widths=(8, 8, 8, 8)), min_score=0.2, training={"steps": 3})
    net = build_net(info.net)
    save_detector(tmp_path / "det", net, info)
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == [WEIGHTS, INFO]
    again = load_detector(tmp_path / "det")
    assert again.info == info
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.net.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="not a hemcap detector folder"):
        read_detector_info(tmp_path)
    data = json.loads((tmp_path / "det" / INFO).read_text())
    (tmp_path / "det" / INFO).write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        read_detector_info(tmp_path / "det")


def test_training_config_reports_every_problem():
    with pytest.raises(ValueError) as error:
        DetectorTrainingConfig(epochs=0, lr=-1, scale_jitter=0.5)
    for part in ("epochs", "lr", "scale_jitter", "data"):
        assert part in str(error.value)


@pytest.fixture(scope="module")
def labelled_smears(tmp_path_factory):
    """20 synthetic smears (WBC and RBC boxes, VOC layout): 16 to train on, 4 to validate."""
    root = write_smears(tmp_path_factory.mktemp("labelled") / "smears", 20, seed=5)
    ids = (root / "ImageSets" / "Main" / "all.txt").read_text().split()
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(ids[:16]))
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(ids[16:]))
    return root


def test_copies_of_validation_smears_are_left_out_of_training(labelled_smears, tmp_path):
    train, val = load_smears(labelled_smears, "train"), load_smears(labelled_smears, "val")
    assert all(s.of("RBC") and s.of("WBC") for s in train)
    copy = tmp_path / "renamed.jpg"
    shutil.copy(val[0].path, copy)
    kept, dropped = without_copies(train + [type(train[0])("renamed", copy, val[0].size)], val)
    assert dropped == 1 and [s.name for s in kept] == [s.name for s in train]


@pytest.fixture(scope="module")
def trained(labelled_smears, tmp_path_factory):
    """A detector trained by the real command on the 16 synthetic training smears (~10 s)."""
    out = tmp_path_factory.mktemp("trained") / "detector"
    argv = ["train-detector", "--data", str(labelled_smears), "--out", str(out), "--epochs", "30",
            "--batch-size", "8", "--threads", "1"]
    assert main(argv) == 0
    return out, argv


@pytest.mark.slow
def test_train_detector_writes_a_measured_safetensors_folder(trained, capsys):
    out, argv = trained
    info = read_detector_info(out)
    figures = info.training["validation"]
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS, INFO]  # safetensors only, no pickles
    assert info.training["smears"] == 16 and figures["all"]["smears"] == 4
    assert figures["all"]["recall50"] >= 0.5, figures  # 30 short epochs on 16 smears: it has learned something
    assert main(argv) == 2 and "exists" in capsys.readouterr().err  # refused up front, nothing replaced
    assert read_detector_info(out) == info


@pytest.mark.slow
def test_detect_with_the_learned_detector_measures_red_cells(trained, labelled_smears, tmp_path, capsys):
    val = load_smears(labelled_smears, "val")
    assert main(["detect", *[str(s.path) for s in val], "--out", str(tmp_path / "found"), "--detector",
                 str(trained[0])]) == 0
    printed = capsys.readouterr().out
    assert printed.count("learned detector") == len(val)  # one line per image: its red-cell size and how measured
    coco = json.loads((tmp_path / "found" / "detections.json").read_text())
    assert coco["annotations"]
    for image, smear in zip(coco["images"], val):
        assert image["red_cells"]["origin"] == "estimated"
        assert abs(image["red_cells"]["px"] / smear.median_red_cell_px() - 1) < 0.25  # 30 epochs on 16 smears
    given = tmp_path / "given"
    assert main(["detect", str(val[0].path), "--out", str(given), "--detector", str(trained[0]),
                 "--red-cell-px", "60"]) == 0
    assert "red cells 60 px (given)" in capsys.readouterr().out


@pytest.mark.slow
def test_bad_images_get_a_note_never_a_crash(trained, tmp_path):
    from PIL import Image, ImageDraw

    from hemcap.smear import StainDetector, write_detections
    from hemcap.synthetic import draw_smear

    folder = tmp_path / "bad"
    folder.mkdir()
    one_cell = Image.new("RGB", (160, 160), (236, 226, 220))  # a white cell alone: no red cells to measure
    ImageDraw.Draw(one_cell).ellipse((20, 20, 140, 140), fill=(200, 170, 215))
    ImageDraw.Draw(one_cell).ellipse((50, 45, 115, 110), fill=(90, 40, 120))
    one_cell.save(folder / "one_cell.png")
    draw_smear(2)[0].convert("L").save(folder / "grey.png")
    crowded = Image.new("RGB", (640, 480), (230, 215, 220))
    draw = ImageDraw.Draw(crowded)
    rng = np.random.default_rng(0)
    for x, y in rng.uniform(0, 640, (600, 2)):  # hundreds of overlapping cells, no background left
        draw.ellipse((x - 30, y * 0.75 - 30, x + 30, y * 0.75 + 30), fill=(190, 120, 150), outline=(150, 80, 120))
    crowded.save(folder / "crowded.png")
    Image.new("RGB", (5, 7), (200, 180, 190)).save(folder / "tiny.png")
    for detector in (load_detector(trained[0]), StainDetector()):
        _, summary = write_detections([folder], tmp_path / type(detector).__name__, detector)
        rows = {row["image"].split("/")[-1]: row for row in summary["per_image"]}
        assert sorted(rows) == ["crowded.png", "grey.png", "one_cell.png", "tiny.png"]  # every image read
        notes = {p["file"].split("/")[-1]: p["note"] for p in summary["problems"] if "note" in p}
        for name in ("one_cell.png", "crowded.png", "tiny.png"):
            assert rows[name]["red_cells"]["origin"] == "default" and "red-cell size" in notes[name], (name, rows[name])
        assert all(row["cells"] <= 50 for row in rows.values())
