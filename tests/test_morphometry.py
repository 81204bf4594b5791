"""Nucleus geometry on drawn cells: one nucleus, two lobes joined by a filament, a neighbour's, none."""

import numpy as np

from hemcap.morphometry import NAMES, nucleus_geometry, nucleus_mask

BACKGROUND, NUCLEUS = (235, 215, 220), (70, 30, 130)  # pale plasma, haematoxylin purple


def drawn(*discs, bridge=None, size=256) -> np.ndarray:
    """A pale field with purple discs (row, col, radius) and an optional bar (row, col0, col1, half-width)."""
    rows, cols = np.mgrid[:size, :size]
    image = np.empty((size, size, 3), np.uint8)
    image[:] = BACKGROUND
    for r, c, radius in discs:
        image[(rows - r) ** 2 + (cols - c) ** 2 <= radius ** 2] = NUCLEUS
    if bridge:
        r, c0, c1, half = bridge
        image[r - half : r + half + 1, c0:c1] = NUCLEUS
    return image


def feature(values: np.ndarray, name: str) -> float:
    return float(values[NAMES.index(name)])


def test_a_round_nucleus_is_one_piece_at_every_erosion():
    values = nucleus_geometry(drawn((128, 128, 40)))
    assert values.shape == (len(NAMES),)
    assert [feature(values, f"pieces_{r}") for r in (0, 2, 4, 6, 8, 10)] == [1.0] * 6
    assert feature(values, "solidity") > 0.95
    assert feature(values, "second_piece_4") == 0.0


def test_two_lobes_on_a_filament_fall_apart_when_eroded():
    values = nucleus_geometry(drawn((128, 95, 28), (128, 161, 28), bridge=(128, 95, 161, 1)))
    assert feature(values, "pieces_0") == 1.0  # joined as drawn: one nucleus
    assert feature(values, "pieces_4") == 2.0  # the 3 px filament is gone at radius 2 and beyond
    assert feature(values, "second_piece_4") > 0.9  # two lobes of a size
    assert feature(values, "solidity") < 0.9


def test_a_neighbours_nucleus_at_the_edge_is_not_the_cells():
    mask = nucleus_mask(drawn((128, 128, 35), (20, 20, 18)))
    assert mask[128, 128] and not mask[20, 20]


def test_a_field_without_a_nucleus_gives_zeros():
    assert not nucleus_geometry(drawn()).any()
