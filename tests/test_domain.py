"""A captioner's training domain: measured from its training images, kept in its info, and used at
inference (the field of view at a smear's magnification, stain normalisation, the domain-shift warning)."""

import numpy as np
import pytest
from PIL import Image

from hemcap.domain import (COLOUR_LIMIT, WARNING, Domain, colour_distance, colour_statistics, domain_shift,
                           field_side, measure_domain, normalise_stain)
from hemcap.images import centre_square
from hemcap.looks import Look, restyle
from hemcap.models.info import ModelInfo
from hemcap.synthetic import draw_smear, make_cells


@pytest.fixture(scope="module")
def cells():
    return [image for image, _ in make_cells(12, seed=7, size=96)]


@pytest.fixture(scope="module")
def domain(cells):
    return measure_domain(cells, "anchors")


def test_the_training_images_give_magnification_and_colour(domain):
    assert 14 <= domain.red_cell_px <= 30 and domain.field_px == 96  # synthetic 96 px cells: red cells ~17-23 px
    assert 60 < domain.lab_mean[0] < 95 and all(s >= 1.0 for s in domain.lab_spread)
    assert domain.background[0] > domain.red_cells[0]  # the background is lighter than the red cells
    magnification, colour = domain.info_fields(12)
    info = ModelInfo("blip", {"name": "x"}, magnification=magnification, colour=colour)
    assert Domain.from_info(info) == domain and colour["normalisation"] == "anchors"
    assert Domain.from_info(ModelInfo("blip", {"name": "x"})) is None  # a model from before: no domain
    with pytest.raises(ValueError, match="stain normalisation must be one of none, reinhard, anchors"):
        measure_domain([], "macenko")


def test_the_field_scales_with_the_smears_red_cells(domain):
    assert field_side(domain, domain.red_cell_px) == pytest.approx(96)
    assert field_side(domain, 2 * domain.red_cell_px) == pytest.approx(192)
    assert field_side(domain, None) is None and field_side(None, 50.0) is None


def other_lab(image: Image.Image) -> Image.Image:
    """The image in a bluish, paler lab's colours."""
    return restyle(image, Look("blue lab", (82.0, 2.0, -8.0), (12.0, 6.0, 9.0)))


def test_anchor_normalisation_gives_an_image_the_training_colours(domain):
    smear, _ = draw_smear(2, size=(320, 240))
    moved = other_lab(smear)
    restored = normalise_stain(moved, domain)
    _, _, background, red = colour_statistics(restored)
    assert np.abs(background - np.asarray(domain.background)).max() < 3  # Lab units
    assert np.abs(red - np.asarray(domain.red_cells)).max() < 4
    assert colour_distance(restored, domain) < colour_distance(moved, domain)


def test_normalising_an_image_of_the_domain_changes_little(cells, domain):
    for cell in cells[:4]:
        change = np.abs(np.asarray(normalise_stain(cell, domain), float) - np.asarray(cell, float)).mean()
        assert change < 8, f"an in-domain cell changed by {change:.1f} levels on average"


def test_reinhard_normalisation_matches_the_training_statistics(cells):
    domain = measure_domain(cells, "reinhard")
    from hemcap.looks import lab_statistics

    mean, std = lab_statistics(normalise_stain(other_lab(cells[0]), domain))
    assert np.allclose(mean, domain.lab_mean, atol=2.5) and np.allclose(std, domain.lab_std, atol=2.5)


def test_the_normaliser_is_keyed_by_what_it_does(cells, domain):
    none = measure_domain(cells, "none")
    assert none.normaliser()(cells[0]) is cells[0] and none.normaliser().key == ""
    assert domain.normaliser().key != measure_domain(cells, "reinhard").normaliser().key != ""


def test_the_domain_shift_warns_past_any_limit():
    calm = domain_shift([0.5, 1.0, 0.8], 0.4, [0.9, 0.95])
    assert calm.warning is None and calm.reasons == [] and calm.score < 1
    far = domain_shift([COLOUR_LIMIT * 2], 0.4, [0.9])
    assert far.warning == WARNING and far.score == pytest.approx(2) and "training spreads" in far.reasons[0]
    enlarged = domain_shift([0.5], 3.0, [0.9])
    assert enlarged.warning and "enlarged 3.00x" in enlarged.reasons[0]
    unsure = domain_shift([0.5], 0.4, [0.2, 0.3])
    assert unsure.warning and "confidence 0.25" in unsure.reasons[0]
    guessed = domain_shift([0.5], None, [0.9], unknown_magnification=True)
    assert guessed.warning and "magnification could not be measured" in guessed.reasons[0]
    assert domain_shift([], None, []).warning is None  # nothing captioned: nothing to warn about


def test_a_centre_crop_moves_the_colours_measured_but_not_the_magnification(cells, domain):
    cropped = measure_domain(cells, "anchors", crop=0.5)
    seen = measure_domain([centre_square(c, 0.5) for c in cells], "anchors")
    assert (cropped.red_cell_px, cropped.field_px) == (domain.red_cell_px, domain.field_px)  # smears are cut whole
    assert cropped.lab_mean == seen.lab_mean != domain.lab_mean  # colours of what the model is given
    assert (cropped.field_lab_mean, cropped.field_lab_spread) == (domain.lab_mean, domain.lab_spread)
    assert domain.field_lab_mean is None  # a model given the whole field is warned on it anyway
    magnification, colour = cropped.info_fields(12)
    assert Domain.from_info(ModelInfo("blip", {"name": "x"}, magnification=magnification, colour=colour)) == cropped


def test_a_model_that_sees_only_the_centre_is_warned_on_the_whole_field(cells, domain):
    cropped = measure_domain(cells, "anchors", crop=0.5)
    field = other_lab(cells[0])  # another lab's field around this lab's white cell: the centre is unchanged
    field.paste(centre_square(cells[0], 0.5), (24, 24))
    seen = centre_square(field, 0.5)
    assert colour_distance(seen, cropped) < 1 < colour_distance(seen, cropped, field=field)  # 0.9 and 2.5
    assert colour_distance(seen, domain, field=field) == colour_distance(seen, domain)  # no crop: what it sees


def test_stain_normalisation_gives_red_cells_and_nuclei_the_training_densities():
    from hemcap.looks import stain_anchors

    smears = [draw_smear(seed, size=(320, 240))[0] for seed in range(3)]
    domain = measure_domain(smears, "stain")
    _, red, nuclei = stain_anchors(smears[0])
    other = Look("other stain", (80.0, 5.0, 0.0), (15.0, 8.0, 8.0), background_rgb=(200.0, 205.0, 215.0),
                 red_cell_od=tuple(red * [0.6, 0.8, 1.3]), nucleus_od=tuple(nuclei * [1.4, 0.7, 0.6]))
    background, red, nuclei = stain_anchors(normalise_stain(restyle(smears[0], other), domain))
    assert np.allclose(background, domain.background_rgb, atol=4)
    assert np.allclose(red, domain.red_cell_od, atol=0.05) and np.allclose(nuclei, domain.nucleus_od, atol=0.1)


def test_a_restained_copy_is_another_stain_that_the_normaliser_undoes_on_red_cells_and_nuclei():
    import dataclasses

    from hemcap.inputs import Restained
    from hemcap.looks import stain_anchors

    smears = [draw_smear(seed, size=(320, 240))[0] for seed in range(3)]
    domain = measure_domain(smears, "stain")
    raw = dataclasses.replace(domain, normalisation="none")
    copies = [Restained(1.0, copy, 0, raw)(smears[0]) for copy in range(2)]
    assert np.array_equal(copies[0], Restained(1.0, 0, 0, raw)(smears[0]))  # seeded by image, copy and seed
    assert not np.array_equal(copies[0], copies[1])
    moved = [np.abs(stain_anchors(copy)[2] - stain_anchors(smears[0])[2]).max() for copy in copies]
    assert min(moved) > 0.1  # another stain: the nuclei's densities moved
    _, red, nuclei = stain_anchors(Restained(1.0, 0, 0, domain)(smears[0]))  # then the model's normaliser
    assert np.allclose(red, domain.red_cell_od, atol=0.05) and np.allclose(nuclei, domain.nucleus_od, atol=0.1)
    assert Restained(1.0, 0, 0, raw).key != Restained(1.0, 0, 0, domain).key != Restained(1.0, 1, 0, domain).key
