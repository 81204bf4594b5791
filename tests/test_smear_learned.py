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


@pytest.mark.slow
def test_train_detector_then_detect_with_it(labelled_smears, tmp_path, capsys):
    out = tmp_path / "detector"
    argv = ["train-detector", "--data", str(labelled_smears), "--out", str(out), "--epochs", "30",
            "--batch-size", "8", "--threads", "1"]
    assert main(argv) == 0
    info = read_detector_info(out)
    figures = info.training["validation"]
    assert sorted(p.name for p in out.iterdir()) == [WEIGHTS, INFO]  # safetensors only, no pickles
    assert info.training["smears"] == 16 and figures["all"]["smears"] == 4
    assert figures["all"]["recall50"] >= 0.5, figures  # 30 short epochs on 16 smears: it has learned something
    assert main(argv) == 2 and "exists" in capsys.readouterr().err  # refused up front, nothing replaced
    assert read_detector_info(out) == info
    val = load_smears(labelled_smears, "val")
    assert main(["detect", *[str(s.path) for s in val], "--out", str(tmp_path / "found"), "--detector", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "red cells" in printed and "learned detector" in printed
    coco = json.loads((tmp_path / "found" / "detections.json").read_text())
    assert coco["annotations"] and all(image["red_cells"]["px"] > 0 for image in coco["images"])
