"""hemcap.synthetic: determinism, API shapes, and that every attribute cue is really drawn.

The cue tests draw the same seed twice with one attribute changed: the generator keeps a
random stream per drawing step, so the two pictures differ only where that attribute shows.
"""

import colorsys
import json
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import pytest
from skimage.measure import label, regionprops

from hemcap import synthetic
from hemcap.synthetic import ATTRIBUTE_VALUES, CELL_TYPES

# A plain cell: no granules, clear light-blue cytoplasm, so each cue test starts from quiet.
BASE = {
    "cell_type": "Lymphocyte", "cell_size": "big", "cell_shape": "round",
    "nucleus_shape": "unsegmented-round", "nuclear_cytoplasmic_ratio": "low",
    "chromatin_density": "densely", "cytoplasm_vacuole": "no", "cytoplasm_texture": "clear",
    "cytoplasm_colour": "light blue", "granule_type": "nil", "granule_colour": "nil",
    "granularity": "no",
}
SEEDS = range(6)


def pixels(attributes: dict, seed: int, size: int = 96, **changes) -> np.ndarray:
    return np.asarray(synthetic.draw_cell({**attributes, **changes}, size, seed), dtype=float)


def changed(a: np.ndarray, b: np.ndarray, threshold: float = 30.0) -> np.ndarray:
    """Pixels where two renderings of the same seed differ clearly."""
    return np.abs(a - b).sum(axis=-1) > threshold


def cell_mask(image: np.ndarray) -> np.ndarray:
    """WBC pixels: stained blue-violet, unlike the beige background and the salmon red cells."""
    return image[..., 2] - image[..., 0] > -15


def dark_mask(image: np.ndarray) -> np.ndarray:
    return image.sum(axis=-1) < 420  # nucleus violet; nothing else is this dark without granules


def largest_region(mask: np.ndarray):
    return max(regionprops(label(mask)), key=lambda r: r.area)


# --- attributes -------------------------------------------------------------------------


def test_attribute_values_cover_the_wbcatt_schema():
    assert list(ATTRIBUTE_VALUES)[0] == "cell_type" and len(ATTRIBUTE_VALUES) == 12
    assert CELL_TYPES == ("Neutrophil", "Eosinophil", "Basophil", "Lymphocyte", "Monocyte")
    assert all(len(set(values)) == len(values) >= 2 for values in ATTRIBUTE_VALUES.values())


def test_sample_attributes_is_valid_and_every_value_is_common():
    rng = np.random.default_rng(0)
    samples = [synthetic.sample_attributes(rng) for _ in range(2000)]
    for name, values in ATTRIBUTE_VALUES.items():
        counts = Counter(sample[name] for sample in samples)
        assert set(counts) <= set(values), name
        for value in values:  # every value shows up on at least 5% of cells
            assert counts[value] >= 100, (name, value, counts)


def test_sample_attributes_follows_the_cell_type():
    rng = np.random.default_rng(1)
    for cell_type in CELL_TYPES:
        samples = [synthetic.sample_attributes(rng, cell_type) for _ in range(200)]
        assert all(s["cell_type"] == cell_type and len(s) == 12 for s in samples)
        granular = [s["granularity"] == "yes" for s in samples]
        assert all(g == (s["granule_type"] != "nil") for g, s in zip(granular, samples))
    lymphocytes = [synthetic.sample_attributes(rng, "Lymphocyte") for _ in range(200)]
    assert Counter(s["cell_size"] for s in lymphocytes)["small"] > 150
    assert {s["granule_type"] for s in
            (synthetic.sample_attributes(rng, "Eosinophil") for _ in range(50))} == {"round"}
    with pytest.raises(ValueError):
        synthetic.sample_attributes(rng, "Megakaryocyte")


# --- single cells -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128])
def test_draw_cell_is_rgb_square_and_deterministic(size):
    attributes = synthetic.sample_attributes(np.random.default_rng(2), "Neutrophil")
    first = synthetic.draw_cell(attributes, size=size, seed=5)
    assert first.mode == "RGB" and first.size == (size, size)
    assert first.tobytes() == synthetic.draw_cell(attributes, size=size, seed=5).tobytes()
    assert first.tobytes() != synthetic.draw_cell(attributes, size=size, seed=6).tobytes()


def test_draw_cell_rejects_unknown_values():
    with pytest.raises(ValueError, match="cytoplasm_colour"):
        synthetic.draw_cell({**BASE, "cytoplasm_colour": "green"})


def test_draw_cell_handles_odd_granule_combinations():
    for granule_type, colour in [("nil", "red"), ("coarse", "nil"), ("small", "red")]:
        image = synthetic.draw_cell({**BASE, "granule_type": granule_type,
                                     "granule_colour": colour}, size=64)
        assert image.size == (64, 64)


def test_make_cells_is_balanced_deterministic_and_prefix_stable():
    cells = synthetic.make_cells(12, seed=3, size=48)
    counts = Counter(attributes["cell_type"] for _, attributes in cells)
    assert set(counts) == set(CELL_TYPES) and max(counts.values()) - min(counts.values()) <= 1
    again = synthetic.make_cells(5, seed=3, size=48)
    for (image, attributes), (image2, attributes2) in zip(cells, again):
        assert attributes == attributes2 and image.tobytes() == image2.tobytes()
    assert all(image.size == (48, 48) for image, _ in cells)


def test_cells_drawn_by_several_processes_are_the_same(monkeypatch):
    monkeypatch.setattr(synthetic, "CELLS_PER_WORKER", 4)
    parted = synthetic.make_cells(12, seed=3, size=48, workers=3)  # three processes draw four cells each
    alone = synthetic.make_cells(12, seed=3, size=48)
    assert [(i.tobytes(), a) for i, a in parted] == [(i.tobytes(), a) for i, a in alone]


# --- the cues are really there ----------------------------------------------------------


def test_big_cells_cover_more_pixels_than_small():
    for seed in SEEDS:
        big = cell_mask(pixels(BASE, seed, cell_size="big")).sum()
        small = cell_mask(pixels(BASE, seed, cell_size="small")).sum()
        assert big > 1.7 * small, seed


def test_irregular_outline_is_less_convex():
    solidity = {shape: np.mean([largest_region(cell_mask(pixels(BASE, s, cell_shape=shape)))
                                .solidity for s in SEEDS]) for shape in ("round", "irregular")}
    assert solidity["round"] > 0.97 and solidity["irregular"] < solidity["round"] - 0.02


def test_high_nc_ratio_has_a_larger_dark_nucleus():
    for seed in SEEDS:
        high = dark_mask(pixels(BASE, seed, nuclear_cytoplasmic_ratio="high")).sum()
        low = dark_mask(pixels(BASE, seed, nuclear_cytoplasmic_ratio="low")).sum()
        assert high > 1.5 * low, seed


def test_segmented_and_band_nuclei_are_less_convex_than_round():
    def solidity(shape):
        return np.mean([largest_region(dark_mask(pixels(BASE, s, nucleus_shape=shape))).solidity
                        for s in SEEDS])

    round_ = solidity("unsegmented-round")
    assert round_ > 0.9
    for shape in ("unsegmented-band", "segmented-bilobed", "segmented-multilobed"):
        assert solidity(shape) < round_ - 0.1, shape


def test_dense_chromatin_is_darker_and_more_contrasted():
    for seed in SEEDS:
        dense, loose = pixels(BASE, seed), pixels(BASE, seed, chromatin_density="loosely")
        nucleus = changed(dense, loose)
        assert dense[nucleus].sum(-1).mean() < loose[nucleus].sum(-1).mean() - 60
        assert dense[nucleus].sum(-1).std() > loose[nucleus].sum(-1).std()


def test_vacuoles_are_bright_holes_inside_the_cell():
    for seed in SEEDS:
        with_holes = pixels(BASE, seed, cytoplasm_vacuole="yes")
        without = pixels(BASE, seed)
        holes = changed(with_holes, without)
        assert holes.sum() > 20
        assert (with_holes[holes].min(-1) > 232).sum() > 10  # near-white, brighter than plasma
        assert with_holes[holes].mean() > without[holes].mean()


def test_frosted_cytoplasm_is_grainier():
    def grain(image):  # mean absolute difference between horizontal neighbours, in the cell
        inside = cell_mask(image)[:, 1:] & ~dark_mask(image)[:, 1:]
        return np.abs(np.diff(image.sum(-1), axis=1))[inside].mean()

    for seed in SEEDS:
        assert grain(pixels(BASE, seed, cytoplasm_texture="frosted")) > 1.5 * grain(
            pixels(BASE, seed))


def test_cytoplasm_colours_are_ordered_in_lightness_and_hue():
    for seed in SEEDS:
        images = {c: pixels(BASE, seed, cytoplasm_colour=c) for c in ATTRIBUTE_VALUES[
            "cytoplasm_colour"]}
        region = changed(images["light blue"], images["blue"]) & changed(
            images["light blue"], images["purple blue"])
        mean = {c: image[region].mean(0) for c, image in images.items()}
        hue = {c: colorsys.rgb_to_hsv(*(m / 255))[0] * 360 for c, m in mean.items()}
        assert mean["light blue"].sum() > mean["blue"].sum() + 60
        assert mean["light blue"].sum() > mean["purple blue"].sum() + 60
        assert hue["purple blue"] > hue["blue"] + 20  # violet vs. blue


def test_granule_kinds_and_colours_differ_visibly():
    for seed in SEEDS[:3]:
        plain = pixels(BASE, seed)
        area = {kind: changed(pixels(BASE, seed, granule_type=kind, granule_colour="pink"),
                              plain).sum() for kind in ("small", "round", "coarse")}
        assert min(area.values()) > 50
        colours = {}
        for colour in ("pink", "red", "purple"):
            image = pixels(BASE, seed, granule_type="round", granule_colour=colour)
            colours[colour] = image[changed(image, plain)].mean(0)
        red_minus_blue = {c: m[0] - m[2] for c, m in colours.items()}
        assert red_minus_blue["red"] > red_minus_blue["pink"] > red_minus_blue["purple"]
        assert colours["purple"].sum() < colours["pink"].sum() - 100


# --- smears -----------------------------------------------------------------------------


def boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("n_wbc", [1, 2, 3, 4])
def test_draw_smear_boxes_are_inside_and_disjoint(n_wbc):
    image, cells = synthetic.draw_smear(seed=10 + n_wbc, n_wbc=n_wbc)
    assert image.mode == "RGB" and image.size == (640, 480) and len(cells) == n_wbc
    for cell in cells:
        x0, y0, x1, y1 = cell["box"]
        assert all(isinstance(v, int) for v in cell["box"])
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
        assert set(cell["attributes"]) == set(ATTRIBUTE_VALUES)
    for i, a in enumerate(cells):
        for b in cells[i + 1:]:
            assert not boxes_overlap(a["box"], b["box"])


def test_draw_smear_boxes_are_tight_around_each_cell(monkeypatch):
    # granule-free cells, so that "stained blue-violet" finds exactly the WBC pixels
    monkeypatch.setattr(synthetic, "sample_attributes", lambda rng, cell_type=None: dict(BASE))
    image, cells = synthetic.draw_smear(seed=4, n_wbc=4)
    stained = cell_mask(np.asarray(image, dtype=float))
    covered = np.zeros(stained.shape, dtype=bool)
    for cell in cells:
        x0, y0, x1, y1 = cell["box"]
        window = stained[max(0, y0 - 4):y1 + 4, max(0, x0 - 4):x1 + 4]
        rows, cols = np.nonzero(window)
        found = (cols.min() + max(0, x0 - 4), rows.min() + max(0, y0 - 4),
                 cols.max() + 1 + max(0, x0 - 4), rows.max() + 1 + max(0, y0 - 4))
        assert np.abs(np.subtract(found, cell["box"])).max() <= 2, (found, cell["box"])
        covered[y0:y1, x0:x1] = True
    assert stained[~covered].mean() < 0.003  # no cell outside the boxes (platelets are tiny)


def test_draw_smear_is_deterministic_and_defaults_to_one_to_four_cells():
    counts = set()
    for seed in range(8):
        image, cells = synthetic.draw_smear(seed, size=(320, 240))
        assert image.size == (320, 240) and 1 <= len(cells) <= 4
        counts.add(len(cells))
    assert len(counts) >= 2
    a, cells_a = synthetic.draw_smear(3, size=(320, 240))
    b, cells_b = synthetic.draw_smear(3, size=(320, 240))
    assert a.tobytes() == b.tobytes() and cells_a == cells_b


def test_write_smears_writes_matching_voc_and_coco(tmp_path):
    out = synthetic.write_smears(tmp_path / "smears", n=3, seed=1, size=(320, 240))
    assert out == tmp_path / "smears"
    ids = (out / "ImageSets/Main/all.txt").read_text().split()
    coco = json.loads((out / "annotations.json").read_text())
    assert len(ids) == 3 and len(coco["images"]) == 3
    assert coco["categories"] == [{"id": 1, "name": "WBC"}]
    for image_id, entry in zip(ids, coco["images"]):
        assert (out / "JPEGImages" / f"{image_id}.jpg").is_file()
        assert entry["file_name"] == f"{image_id}.jpg" and entry["width"] == 320
        root = ET.parse(out / "Annotations" / f"{image_id}.xml").getroot()
        assert root.findtext("size/width") == "320" and root.findtext("size/height") == "240"
        corners = ("xmin", "ymin", "xmax", "ymax")
        voc = sorted(tuple(int(obj.findtext(f"bndbox/{k}")) for k in corners)
                     for obj in root.iter("object") if obj.findtext("name") == "WBC")
        anns = [a for a in coco["annotations"] if a["image_id"] == entry["id"]]
        assert voc == sorted((x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in anns))
        for ann in anns:
            assert ann["category_id"] == 1 and set(ann["attributes"]) == set(ATTRIBUTE_VALUES)
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert [p.name for p in tmp_path.iterdir()] == ["smears"]  # no staging dirs left behind


def test_write_smears_replaces_an_existing_set(tmp_path):
    out = tmp_path / "smears"
    synthetic.write_smears(out, n=2, seed=0, size=(320, 240))
    synthetic.write_smears(out, n=1, seed=1, size=(320, 240))
    assert (out / "ImageSets/Main/all.txt").read_text().split() == ["synth_00000"]
    assert len(list((out / "JPEGImages").iterdir())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["smears"]
