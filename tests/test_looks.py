"""Other labs' looks: measured from a folder of smears, and given to an image (colour, resolution, sharpness)."""

import json

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from hemcap.looks import Look, lab_statistics, look_of, measure_look, restyle, sharpness
from hemcap.smear.magnification import estimate_red_cell_px
from hemcap.synthetic import draw_smear, make_cells


@pytest.fixture(scope="module")
def smear():
    """A drawn smear (red cells ~55 px across) and its measured red-cell size."""
    image = draw_smear(0)[0]
    return image, estimate_red_cell_px(image).px


def test_a_look_is_measured_from_a_folder_of_smears(tmp_path):
    for seed in range(4):
        draw_smear(seed)[0].save(tmp_path / f"{seed}.png")
    look = measure_look(tmp_path, "synthetic")
    assert look.name == "synthetic" and 50 <= look.red_cell_px <= 70  # hemcap.synthetic red cells: ~57-62 px
    assert 60 < look.lab_mean[0] < 95 and all(s > 0 for s in look.lab_std)
    assert 0.05 < look.sharpness < 0.2  # hemcap.synthetic smears: ~0.11 (PBC's ~0.14, BCCD's ~0.07)
    assert look.background_rgb[0] > 200 and look.nucleus_od[1] > look.red_cell_od[1] > 0  # the stain's anchors
    for seed in range(4):
        draw_smear(seed)[0].filter(ImageFilter.GaussianBlur(2)).save(tmp_path / f"{seed}.png")
    assert measure_look(tmp_path).sharpness < 0.5 * look.sharpness


def test_restyle_gives_the_looks_colours_and_its_lower_resolution():
    cell = make_cells(1, seed=4, size=128)[0][0]
    look = Look("blue lab", (70.0, 5.0, -15.0), (12.0, 8.0, 6.0))
    mean, std = lab_statistics(restyle(cell, look))
    assert np.allclose(mean, look.lab_mean, atol=2.0) and np.allclose(std, look.lab_std, atol=2.0)
    same = Look("itself", *(tuple(float(v) for v in stat) for stat in lab_statistics(cell)))
    assert np.abs(np.asarray(restyle(cell, same), int) - np.asarray(cell, int)).mean() < 2  # its own look: unchanged
    lower = Look("lower magnification", same.lab_mean, same.lab_std, red_cell_px=30.0)
    blurred = np.asarray(restyle(cell, lower, red_cell_px=60.0), float)
    detail = lambda a: np.abs(np.diff(a, axis=1)).mean()  # noqa: E731
    assert blurred.shape == np.asarray(cell).shape and detail(blurred) < 0.8 * detail(np.asarray(cell, float))
    higher = Look("higher magnification", same.lab_mean, same.lab_std, red_cell_px=120.0)
    assert np.abs(np.asarray(restyle(cell, higher, red_cell_px=60.0), int) - np.asarray(cell, int)).mean() < 2


def test_sharpness_falls_with_blur_and_is_measured_at_one_physical_scale(smear):
    image, red_cell_px = smear
    values = [sharpness(image.filter(ImageFilter.GaussianBlur(sigma)), red_cell_px) for sigma in (0.5, 1, 2, 4)]
    values.insert(0, sharpness(image, red_cell_px))
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] < 0.25 * values[0]
    smaller = image.resize((480, 360), Image.LANCZOS)  # the same smear at 3/4 the magnification
    assert abs(sharpness(smaller, 0.75 * red_cell_px) / values[0] - 1) < 0.1


def test_sharpness_ignores_colour_brightness_and_contrast(smear):
    image, red_cell_px = smear
    own = sharpness(image, red_cell_px)
    recoloured = [restyle(image, Look("blue lab", (70.0, 5.0, -15.0), (12.0, 8.0, 6.0))),
                  restyle(image, Look("Raabin-like", (62.4, 18.2, 1.3), (14.7, 10.6, 11.6))),
                  ImageEnhance.Brightness(image).enhance(0.8), ImageEnhance.Contrast(image).enhance(0.6),
                  ImageEnhance.Color(image).enhance(0.5)]
    assert all(abs(sharpness(other, red_cell_px) / own - 1) < 0.05 for other in recoloured)


def test_restyle_blurs_an_image_to_a_softer_looks_sharpness(smear):
    image, red_cell_px = smear
    own = sharpness(image, red_cell_px)
    for share in (0.7, 0.5, 0.25):
        look = Look("softer lab", (75.0, 8.0, 5.0), (10.0, 8.0, 6.0), sharpness=share * own)
        styled = restyle(image, look, red_cell_px)
        assert abs(sharpness(styled, red_cell_px) / look.sharpness - 1) < 0.1
    unmeasured = np.asarray(restyle(image, look), int)  # red cells measured on the image itself
    assert np.abs(unmeasured - np.asarray(styled, int)).mean() < 1
    sharper = Look("sharper lab", look.lab_mean, look.lab_std, sharpness=2 * own)  # never sharpened
    assert np.array_equal(restyle(image, sharper, red_cell_px), restyle(image, Look("colour", look.lab_mean, look.lab_std)))


def test_a_look_without_sharpness_restyles_as_before():
    cell = make_cells(1, seed=4, size=128)[0][0]
    mean, std = (tuple(float(v) for v in stat) for stat in lab_statistics(cell))
    old = Look(**json.loads(json.dumps({"name": "old", "lab_mean": mean, "lab_std": std, "red_cell_px": 30.0})))
    assert old.sharpness is None and Look(**old.as_dict()) == old
    never_blurred = Look("sharpest", mean, std, 30.0, sharpness=1.0)  # sharpness is a share: never above 1
    assert np.array_equal(restyle(cell, old, red_cell_px=60.0), restyle(cell, never_blurred, red_cell_px=60.0))
    soft = Look("soft", mean, std, 30.0, sharpness=0.3 * sharpness(cell, 50.0))
    assert not np.array_equal(restyle(cell, old, red_cell_px=60.0), restyle(cell, soft, red_cell_px=60.0))


def test_restyle_gives_the_looks_stain_red_cells_and_nuclei_alike():
    import dataclasses

    from hemcap.looks import stain_anchors

    smear, _ = draw_smear(5, size=(320, 240))
    background, red, nuclei = stain_anchors(smear)
    assert red is not None and nuclei is not None and nuclei[1] > red[1]  # nuclei absorb more green than red cells
    look = Look("other stain", (80.0, 5.0, 0.0), (15.0, 8.0, 8.0), background_rgb=(200.0, 205.0, 210.0),
                red_cell_od=tuple(red * [0.6, 0.8, 1.2]), nucleus_od=tuple(nuclei * [1.3, 0.9, 0.7]))
    got_background, got_red, got_nuclei = stain_anchors(restyle(smear, look))
    assert np.allclose(got_background, look.background_rgb, atol=4)
    assert np.allclose(got_red, look.red_cell_od, atol=0.04) and np.allclose(got_nuclei, look.nucleus_od, atol=0.08)
    reinhard_only = dataclasses.replace(look, nucleus_od=None)  # a look measured before stains: Reinhard's transfer
    mean, _ = lab_statistics(restyle(smear, reinhard_only))
    assert np.allclose(mean, look.lab_mean, atol=2.0)


def test_a_source_look_restains_every_image_by_one_matrix_as_a_labs_stain_does(smear):
    image = smear[0]
    rgb = np.asarray(image, float)
    background = np.median(rgb[rgb.sum(axis=-1) > np.quantile(rgb.sum(axis=-1), 0.8)], axis=0)
    darker = Image.fromarray(np.clip(background * (rgb / background) ** 1.4, 0, 255).astype(np.uint8))  # 40 % more dye
    source = look_of([image], "own lab")
    look = Look("blue lab", (70.0, 5.0, -15.0), (12.0, 8.0, 6.0), background_rgb=(240.0, 235.0, 250.0),
                red_cell_od=(0.25, 0.35, 0.15), nucleus_od=(1.3, 1.5, 0.5))
    grey = lambda styled: np.asarray(styled.convert("L"), float).mean()  # noqa: E731
    dye = grey(image) - grey(darker)  # ~10 grey levels
    assert abs(grey(restyle(image, look, source=source)) - grey(restyle(image, look))) < 1  # its own stain: alike
    assert grey(restyle(image, look)) - grey(restyle(darker, look)) < 0.3 * dye  # each image's own: the dye erased
    assert grey(restyle(image, look, source=source)) - grey(restyle(darker, look, source=source)) > 0.8 * dye  # kept
