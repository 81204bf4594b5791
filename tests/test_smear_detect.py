"""The weight-free detector on synthetic and BCCD smears, the prediction adapters and crops."""

import json

import numpy as np
import pytest
from PIL import Image

from hemcap.smear import (CocoPredictions, Detection, StainDetector, StainDetectorConfig, YoloPredictions,
                          build_detector, crop_cells, detect, read_yolo)
from hemcap.synthetic import draw_smear

SYNTHETIC = StainDetectorConfig(scale=0.6)  # hemcap.synthetic red cells are ~57 px across, BCCD's ~100


def box_iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def matched_ious(truth, found) -> list[float]:
    """Greedy one-to-one matching by IoU, best pairs first."""
    pairs = sorted(((box_iou(t, f.box), i, j) for i, t in enumerate(truth) for j, f in enumerate(found)), reverse=True)
    used_t, used_f, ious = set(), set(), []
    for iou, i, j in pairs:
        if i not in used_t and j not in used_f and iou > 0:
            used_t.add(i), used_f.add(j), ious.append(iou)
    return ious


@pytest.mark.parametrize("seed", [0, 1, 3, 7, 11, 42])
def test_synthetic_smears_count_and_boxes(seed):
    image, cells = draw_smear(seed)
    found = StainDetector(SYNTHETIC)(image)
    assert abs(len(found) - len(cells)) <= 1, f"seed {seed}: {len(found)} found, {len(cells)} drawn"
    ious = matched_ious([c["box"] for c in cells], found)
    assert len([i for i in ious if i >= 0.5]) >= len(cells) - 1
    assert all(0 <= d.score <= 1 for d in found)


def test_synthetic_eosinophil_is_found_with_its_granules():
    image, cells = draw_smear(101, n_wbc=None)
    eosinophils = [c["box"] for c in cells if c["attributes"]["cell_type"] == "Eosinophil"]
    assert eosinophils, "seed 101 draws an eosinophil"
    found = StainDetector(SYNTHETIC)(image)
    assert max(box_iou(eosinophils[0], d.box) for d in found) >= 0.5


def restained(image: Image.Image, mix, tint) -> Image.Image:
    """``image`` as another lab's stain would show it: optical density mixed across channels by
    ``mix`` (row = output channel) and the background colour scaled by ``tint``."""
    pixels = np.asarray(image, np.float32) + 0.5
    background = np.quantile(pixels.reshape(-1, 3), 0.99, axis=0)
    density = np.log(background / pixels) @ np.asarray(mix, np.float32).T
    return Image.fromarray(np.clip(background * np.asarray(tint) * np.exp(-density), 0, 255).astype(np.uint8))


STAINS = {  # the BCCD-tuned constant thresholds found 0-2 of these cells, and up to 37 red cells
    "lilac red cells, pink background (Raabin-like)": ([[1, 1, 0], [0, 1, 0], [0, 0, 1]], (0.95, 0.85, 0.8)),
    "magenta nuclei": ([[1, 0.8, 0], [0, 1.2, 0], [0, 0.2, 0.9]], (0.97, 0.82, 0.76)),
    "blue-violet, grey background": ([[1.3, 0.2, 0], [0, 1, 0], [0, 0, 0.6]], (1, 1, 1)),
    "twice as dark": ([[1.8, 0, 0], [0, 1.8, 0], [0, 0, 1.8]], (1, 0.9, 0.85)),
}


@pytest.mark.parametrize("stain", sorted(STAINS))
@pytest.mark.parametrize("seed", [0, 3, 11])
def test_restained_smears_give_the_same_cells(stain, seed):
    image, cells = draw_smear(seed)
    found = StainDetector(SYNTHETIC)(restained(image, *STAINS[stain]))
    assert len(found) == len(cells), f"{stain}, seed {seed}: {len(found)} found, {len(cells)} drawn"
    assert all(iou >= 0.5 for iou in matched_ious([c["box"] for c in cells], found))


def test_red_cell_px_sets_the_scale_for_one_call():
    image, _ = draw_smear(7)
    detector = StainDetector()  # scale 1, but this smear's red cells are ~60 px across
    assert detector(image, red_cell_px=60.0) == StainDetector(StainDetectorConfig(scale=0.6))(image)
    assert detector(image) == StainDetector(StainDetectorConfig(scale=1.0))(image)  # nothing kept between calls
    big = image.resize((image.width * 2, image.height * 2), Image.BILINEAR)
    found, found_big = detector(image, red_cell_px=60.0), detector(big, red_cell_px=120.0)
    assert len(found_big) == len(found)
    halved = [Detection(tuple(v / 2 for v in d.box), d.score) for d in found_big]
    assert len([i for i in matched_ious([d.box for d in found], halved) if i >= 0.8]) == len(found)


@pytest.mark.parametrize("bad", [0, -5.0, float("nan"), "100"])
def test_red_cell_px_must_be_a_positive_number(bad):
    image, _ = draw_smear(0)
    with pytest.raises(ValueError, match="red_cell_px"):
        StainDetector()(image, red_cell_px=bad)


def test_smear_without_white_cells_gives_nothing():
    image, cells = draw_smear(3, n_wbc=0)
    assert cells == [] and StainDetector(SYNTHETIC)(image) == []
    assert detect(Image.new("RGB", (640, 480), (230, 225, 220))) == []
    assert detect(np.zeros((5, 7, 3), np.uint8)) == []  # tiny and black


def test_array_and_pil_inputs_agree():
    image, _ = draw_smear(1)
    assert StainDetector(SYNTHETIC)(np.asarray(image)) == StainDetector(SYNTHETIC)(image)


def test_grayscale_input_finds_no_stain():
    image, _ = draw_smear(0)
    assert StainDetector(SYNTHETIC)(image.convert("L").convert("RGB")) == []


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as error:
        StainDetectorConfig(scale=0, background_quantile=1.5, min_score=2, nucleus_otsu_range=(0.3, 0.1),
                            min_box_side=-1, red_cell_od_min=-0.1)
    message = str(error.value)
    for name in ("scale", "background_quantile", "min_score", "nucleus_otsu_range", "min_box_side", "red_cell_od_min"):
        assert name in message


def test_crops_are_square_resized_and_padded_at_the_border():
    image = Image.new("RGB", (200, 100), (240, 240, 240))
    image.paste((90, 40, 160), (0, 0, 40, 40))  # a "cell" in the corner
    crops = crop_cells(image, [Detection((0, 0, 40, 40), 0.9)], size=64, margin=0.5)
    assert len(crops) == 1 and crops[0].size == (64, 64)
    pixels = np.asarray(crops[0])
    assert pixels[2, 2].tolist() == [240, 240, 240]  # beyond the border: background colour, not black
    assert pixels[32, 32].tolist() == [90, 40, 160]


def test_yolo_adapter_reads_boxes_scores_and_classes(tmp_path):
    (tmp_path / "smear1.txt").write_text("0 0.5 0.5 0.25 0.5 0.9\n1 0.1 0.1 0.1 0.1\n\n")
    found = YoloPredictions(tmp_path, classes=[0])(np.zeros((100, 200, 3), np.uint8), path="data/smear1.jpg")
    assert found == [Detection((75.0, 25.0, 125.0, 75.0), 0.9)]
    assert len(read_yolo(tmp_path / "smear1.txt", (200, 100))) == 2  # no class filter; default score 1
    assert YoloPredictions(tmp_path)(np.zeros((10, 10, 3), np.uint8), path="other.jpg") == []


def test_yolo_adapter_names_bad_lines_and_needs_a_path(tmp_path):
    (tmp_path / "bad.txt").write_text("0 0.5 0.5 0.2\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 1"):
        YoloPredictions(tmp_path)(np.zeros((10, 10, 3), np.uint8), path="bad.png")
    with pytest.raises(ValueError, match="path="):
        YoloPredictions(tmp_path)(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(FileNotFoundError):
        YoloPredictions(tmp_path / "missing")


def test_coco_adapter_reads_results_lists(tmp_path):
    images = tmp_path / "images.json"
    images.write_text(json.dumps({"images": [{"id": 7, "file_name": "folder/smear7.jpg"}],
                                  "categories": [{"id": 1, "name": "WBC"}, {"id": 2, "name": "RBC"}]}))
    results = [{"image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 40], "score": 0.8},
               {"image_id": 7, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 0.9},
               {"image_id": "smear9", "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]
    (tmp_path / "results.json").write_text(json.dumps(results))
    image = np.zeros((50, 50, 3), np.uint8)
    by_id = CocoPredictions(tmp_path / "results.json", images=images)
    assert len(by_id(image, path="/x/smear7.jpg")) == 2
    wbc_only = CocoPredictions(tmp_path / "results.json", images=images, categories=[1])
    assert wbc_only(image, path="smear7.jpg") == [Detection((10.0, 20.0, 40.0, 60.0), 0.8)]
    assert CocoPredictions(tmp_path / "results.json")(image, path="smear9.png")[0].box == (1.0, 2.0, 4.0, 6.0)
    with pytest.raises(ValueError, match="not among"):
        CocoPredictions(images, categories=["Platelet"])


def test_build_detector_choices(tmp_path):
    assert isinstance(build_detector(), StainDetector)
    (tmp_path / "s.txt").write_text("0 0.5 0.5 0.5 0.5 0.2\n0 0.5 0.5 0.1 0.1 0.9\n")
    saved = build_detector(yolo_dir=tmp_path, min_score=0.5)
    assert [d.score for d in saved(np.zeros((10, 10, 3), np.uint8), path="s.png")] == [0.9]
    with pytest.raises(ValueError, match="not YOLO txt and COCO JSON"):
        build_detector(yolo_dir=tmp_path, coco_json=tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="not a hemcap detector folder"):
        build_detector(detector_dir=tmp_path)


BCCD_CASES = {"BloodImage_00065": 2, "BloodImage_00031": 2, "BloodImage_00007": 1}  # test split, labelled WBC


@pytest.mark.realdata
def test_bccd_smears(shared_data):
    import xml.etree.ElementTree as ET

    root = shared_data / "bccd"
    if not (root / "JPEGImages").is_dir():
        pytest.skip(f"BCCD not found at {root}")
    from hemcap.images import load_rgb

    for name, count in BCCD_CASES.items():
        truth = [tuple(float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                 for o in ET.parse(root / "Annotations" / f"{name}.xml").getroot().iter("object")
                 if o.findtext("name") == "WBC"]
        found = detect(load_rgb(root / "JPEGImages" / f"{name}.jpg"))
        assert len(truth) == count and len(found) == count, name
        assert min(matched_ious(truth, found)) >= 0.7, name
