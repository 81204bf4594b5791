"""Other labs' looks: measured from a folder of smears, and given to an image (colour and resolution)."""

import numpy as np
from PIL import Image

from hemcap.looks import Look, lab_statistics, measure_look, restyle
from hemcap.synthetic import draw_smear, make_cells


def test_a_look_is_measured_from_a_folder_of_smears(tmp_path):
    for seed in range(4):
        draw_smear(seed)[0].save(tmp_path / f"{seed}.png")
    look = measure_look(tmp_path, "synthetic")
    assert look.name == "synthetic" and 50 <= look.red_cell_px <= 70  # hemcap.synthetic red cells: ~57-62 px
    assert 60 < look.lab_mean[0] < 95 and all(s > 0 for s in look.lab_std)


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
