"""estimate_red_cell_px / resolve_red_cell_size on synthetic smears, bad inputs and (when present) TXL-PBC."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemcap.smear import DEFAULT_RED_CELL_PX, RedCellSize, estimate_red_cell_px, resolve_red_cell_size
from hemcap.smear.magnification import _bounded
from hemcap.synthetic import _RBC_DIAMETER_FRAC, _SMEAR_UNIT, _streams, draw_smear

TXL = Path(__file__).resolve().parents[2] / "shared" / "data" / "txl_pbc"
BACKGROUND = np.array([250.0, 228.0, 204.0])


def true_red_cell_px(seed: int, short_side: int = 480) -> float:
    """draw_smear's red-cell diameter: the first draw of its "rbc" stream (hemcap/synthetic.py)."""
    return _SMEAR_UNIT * short_side * _streams(seed)["rbc"].uniform(*_RBC_DIAMETER_FRAC)


def discs(shape: tuple[int, int], centres, radius: float, rgb) -> np.ndarray:
    """Beer-Lambert discs of one colour on the PBC background; overlaps darken."""
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    layers = sum(((rows - y) ** 2 + (cols - x) ** 2 <= radius**2).astype(float) for y, x in centres)
    image = BACKGROUND * (np.asarray(rgb) / BACKGROUND) ** layers[..., None]
    noise = np.random.default_rng(0).normal(0, 2, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_smear_within_10_percent(seed):
    image, _ = draw_smear(seed)
    size = estimate_red_cell_px(image)
    assert size.origin == "estimated" and size.cells >= 5 and size.confidence > 0.5
    assert abs(size.px / true_red_cell_px(seed) - 1) <= 0.10


def test_rescaled_smear_scales_the_estimate():
    image, _ = draw_smear(3)
    small = image.resize((480, 360), Image.BILINEAR)
    ratio = estimate_red_cell_px(small).px / estimate_red_cell_px(image).px
    assert ratio == pytest.approx(0.75, rel=0.1)


def test_array_input_matches_pil():
    image, _ = draw_smear(4)
    assert estimate_red_cell_px(np.asarray(image)) == estimate_red_cell_px(image)


BAD_INPUTS = {
    "white cell alone": lambda: discs((300, 300), [(150, 150)], 90, (78, 30, 128)),
    "blank": lambda: np.full((480, 640, 3), 230, np.uint8),
    "grayscale": lambda: np.asarray(draw_smear(0)[0].convert("L").convert("RGB")),
    "tiny": lambda: np.full((5, 7, 3), 200, np.uint8),
    "hundreds overlapping": lambda: discs(
        (480, 640), np.random.default_rng(1).uniform((0, 0), (480, 640), (600, 2)), 30, (210, 158, 160)),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_gives_no_estimate_and_a_note(name):
    size = estimate_red_cell_px(BAD_INPUTS[name]())
    assert size.px is None and size.confidence == 0.0
    assert size.note.startswith("could not estimate the red-cell size: ")


def test_estimate_too_large_for_the_image_is_dropped():
    # 5 cells of 180 px need ~127,000 px^2; a 320x240 image has 76,800
    size = _bounded(RedCellSize(180.0, 0.9, 8, "estimated"), 320 * 240)
    assert size.px is None and size.confidence == 0.0 and "would fit" in size.note
    assert _bounded(RedCellSize(100.0, 0.9, 8, "estimated"), 320 * 240).px == 100.0


def test_resolve_origins():
    smear, _ = draw_smear(0)
    assert resolve_red_cell_size(smear, given=80.0) == RedCellSize(80.0, 1.0, 0, "given", method="")
    assert resolve_red_cell_size(smear).origin == "estimated"
    fallback = resolve_red_cell_size(BAD_INPUTS["blank"]())
    assert (fallback.origin, fallback.px) == ("default", DEFAULT_RED_CELL_PX)
    assert "no colour" in fallback.note
    assert resolve_red_cell_size(BAD_INPUTS["tiny"](), default=60.0).px == 60.0
    with pytest.raises(ValueError):
        resolve_red_cell_size(smear, given=0.0)


def test_as_dict_is_json_ready():
    assert estimate_red_cell_px(BAD_INPUTS["tiny"]()).as_dict()["px"] is None


def _val_shares() -> dict[str, float]:
    """Share within 10 % on the first 20 val images of each TXL-PBC source."""
    from hemcap.images import load_rgb
    from hemcap.smear.labelled import load_smears

    hits: dict[str, list[bool]] = {}
    for smear in load_smears(TXL, "val"):
        rows = hits.setdefault(smear.source, [])
        if len(rows) < 20:
            px = estimate_red_cell_px(load_rgb(smear.path)).px
            rows.append(px is not None and abs(px / smear.median_red_cell_px() - 1) <= 0.10)
    return {source: sum(rows) / len(rows) for source, rows in hits.items()}


needs_txl = pytest.mark.skipif(not (TXL / "labels" / "val").is_dir(), reason=f"TXL-PBC not found at {TXL}")


@needs_txl
def test_real_smears_hold_the_measured_level():
    # measured (eval/bench_red_cells.py): BCD 0.45, BCCD 0.55, Raabin-WBC 0.55, PBC 0.85 on these 80
    # images (0.45-0.80 before the round cells); guards against regressions, a margin of 1-2 images
    shares = _val_shares()
    assert set(shares) == {"BCCD", "BCD", "PBC", "Raabin-WBC"}
    assert min(shares.values()) >= 0.35 and sorted(shares.values())[2] >= 0.5


@needs_txl
@pytest.mark.xfail(reason="target not met yet: 90 % within 10 % per source (measured 0.45-0.85)", strict=False)
def test_real_smears_reach_the_target():
    assert min(_val_shares().values()) >= 0.90
