"""A smear's magnification from its own red cells: ``estimate_red_cell_px(image)``.

The stain detector's thresholds assume BCCD's magnification (red cells ~100 px across,
``StainDetectorConfig.scale`` = red-cell px / 100). This module measures the red-cell diameter of
any smear without weights, so that scale can follow the image.

Method, on a copy shrunk by an integer factor to a short side of 160-319 px:

1. optical density relative to the bright background (median of the brightest 25 % of pixels, as
   ``hemcap.smear.detect.stain_contrasts``); cells = summed density above an Otsu threshold, holes
   filled (the pale central pallor of a red cell turns it into a ring);
2. nuclei = ``OD_green - OD_blue`` > 0.5: every white-cell nucleus passes it, red cells stay below;
3. the distance transform of the cells; its local maxima are the centres of inscribed discs. A
   disc whose centre lies inside a larger disc is dropped (one disc per cell: touching red cells
   keep one each, an elongated clump keeps its widest);
4. a watershed of the distance transform (half resolution), seeded by every disc, splits merged
   cells into one region per disc. A region is a round cell when its area is 0.8-1.5 x its disc's
   (pi r^2): a disc inside a merged clump or an oval cell has a region larger than that;
5. discs reaching a nucleus are dropped (their region, seeded too, keeps the white cell's cytoplasm
   from spilling into the neighbouring red cells' regions);
6. the disc estimate is the median disc diameter weighted by disc area (specks and ridge fragments
   weigh little), discs of non-round regions at half weight, times one calibration factor fitted
   on TXL-PBC train (labelled boxes also hold the border-cut, oval and overlapping cells). With at
   least 3 round cells, the estimate is the geometric mean of that and the area-weighted median
   area-equivalent diameter of the round cells (which follows oval cells, where the inscribed disc
   runs short); when the two differ by more than 15 % the confidence is halved;
7. an estimate so large that fewer than 5 such cells would fit in the image is no estimate.

Validated on TXL-PBC (``eval/bench_red_cells.py``), share of images within +-10 % of the median
labelled red-cell box side, train / val: BCCD 0.83 / 0.72, BCD 0.70 / 0.55, PBC 0.79 / 0.80,
Raabin-WBC 0.63 / 0.63 (median error 4-10 %); BCCD VOC train 0.63; synthetic smears within 7 %.
Gross errors (off by more than 25 %, val) fell from 0.13 / 0.16 / 0.05 / 0.12 to
0.10 / 0.05 / 0.03 / 0.10 (BCCD / BCD / PBC / Raabin-WBC). ~6 ms per 640x480 image on one core (the watershed: 0.6 ms).
With the estimated sizes the stain detector gets AP@0.5 0.979 on BCCD VOC train (labelled sizes:
0.990) and 0.943 on TXL-PBC val (labelled: 0.954). The target of 0.90 per source is NOT met: the
threshold segmentation fuses overlapping cells into clumps whose inscribed discs and regions both
run large, loses pale cells (Raabin's blurred fields), and TXL's crops hold few whole cells.
``confidence`` (agreeing discs and their share, halved when discs and round cells disagree) flags
part of the misses: below ``MIN_CONFIDENCE`` (2-26 % of images per source, train) ``resolve_red_cell_size``
falls back to the default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from hemcap.smear.detect import ImageLike, as_pil_rgb

DEFAULT_RED_CELL_PX = 100.0  # BCCD's red cells: what StainDetectorConfig's thresholds assume
WORK_SIDE = 160  # shrink to a short side of 160-319 px: red cells stay >= 8 px across, EDT ~1.5 ms
MIN_SIDE = 32  # px; smaller images hold no measurable red cell
MIN_CELLS = 5  # fewer supporting discs give a median no better than a guess
NUCLEUS_MIN = 0.5  # OD_green - OD_blue: white-cell nuclei >= 0.8 (10th pct), red cells <= 0.14 (99th)
MIN_RADIUS = 4.0  # working px: smaller discs are specks, platelets and ring fragments
MIN_DENSITY = 0.1  # summed OD; red cells' Otsu threshold is >= 0.17 on TXL-PBC, JPEG noise ~0.03
CROWDED = 0.9  # cells over this share of the image leave no background to measure against
# labelled box side / weighted disc diameter, median over TXL-PBC train; on the discs only (with the
# round cells 1.00 and 1.08 trade BCD against PBC by 0.06, 1.04 is best overall)
CALIBRATION = 1.04
SUPPORT = 0.2  # discs within +-20 % (in log) of the estimate support it
MIN_CONFIDENCE = 0.3  # below this resolve_red_cell_size uses the default
# a watershed region is one round cell when its area is 0.8-1.5 x its inscribed disc's (pi r^2):
# merged or elongated blobs lie above; on TXL-PBC train their area-equivalent diameters alone put
# BCD at 0.61 within 10 % (discs: 0.47) but PBC at 0.71 (discs: 0.79), so step 6 averages the two
# (0.7-1.5, 0.9-1.5, 0.8-1.3, 0.8-1.7: shares within +-0.05, none better on all four sources)
ROUND = (0.8, 1.5)
NOT_ROUND_WEIGHT = 0.5  # a disc in a merged blob weighs half: BCCD 0.79 -> 0.83, BCD 0.63 -> 0.69 (train)
MIN_ROUND = 3  # fewer round cells leave the disc estimate alone (5 instead: the same shares +-0.02)
DISAGREE = 0.15  # round cells and discs further apart (log) halve the confidence (0.1, 0.2: same +-0.02)
MIN_FIT = 5  # a red cell so large that fewer than 5 would fit in the image is no red cell


@dataclass(frozen=True)
class RedCellSize:
    """A red-cell diameter in input pixels, and how far to trust it."""

    px: float | None  # median red-cell diameter in input pixels; None = could not estimate
    confidence: float  # 0..1
    cells: int  # red cells (discs) the estimate rests on
    origin: str  # "estimated", "given" or "default"
    note: str = ""  # why it could not estimate, or why the confidence is low
    method: str = "red-cell discs"  # what measured it: this module's discs, or a learned detector's red cells

    def as_dict(self) -> dict:
        return asdict(self)


def _fail(note: str, cells: int = 0) -> RedCellSize:
    return RedCellSize(None, 0.0, cells, "estimated", f"could not estimate the red-cell size: {note}")


def estimate_red_cell_px(image: ImageLike) -> RedCellSize:
    """The median red-cell diameter of a smear, from its own red cells (module docstring)."""
    pil = as_pil_rgb(image)
    if min(pil.size) < MIN_SIDE:
        return _fail(f"the image is {pil.width}x{pil.height}, need at least {MIN_SIDE} px a side")
    factor = max(1, min(pil.size) // WORK_SIDE)
    rgb = np.asarray(pil.reduce(factor) if factor > 1 else pil)
    problem = _colour_problem(rgb)
    if problem:
        return _fail(problem)
    cells, nuclei = cell_masks(rgb)
    share = cells.mean()
    if share > CROWDED:
        return _fail(f"cells cover {share:.0%} of the image, no background to tell them apart")
    radii, areas = red_cells(cells, nuclei)
    size = _from_cells(radii, areas, factor)
    return _bounded(size, pil.width * pil.height) if size.px is not None else size


def _colour_problem(rgb: np.ndarray) -> str:
    rgb = rgb[::4, ::4]  # a sixteenth of the pixels tells colour from grey as well, 15x faster
    spread = rgb.max(axis=-1).astype(np.int16) - rgb.min(axis=-1)
    if np.percentile(spread, 99) < 8:  # grey within JPEG noise: no stain colour to read
        return "the image has no colour (grayscale or blank)"
    if np.ptp(rgb.sum(axis=-1, dtype=np.int32)) < 30:
        return "the image is blank"
    return ""


def _from_cells(radii: np.ndarray, areas: np.ndarray, factor: int) -> RedCellSize:
    """Step 6 of the module docstring: discs, round cells, their agreement."""
    if radii.size < MIN_CELLS:
        return _fail(f"only {radii.size} red cells found (need {MIN_CELLS})", int(radii.size))
    round_ = (areas > ROUND[0] * np.pi * radii**2) & (areas < ROUND[1] * np.pi * radii**2)
    weights = radii**2 * np.where(round_, 1.0, NOT_ROUND_WEIGHT)
    radius = weighted_median(radii, weights)
    support = int(np.count_nonzero(np.abs(np.log(radii / radius)) < SUPPORT))
    confidence = _confidence(radii, radius, support, weights)
    px = float(2 * radius * factor * CALIBRATION)
    note = f"{support} of {radii.size} red cells agree within {SUPPORT:.0%} of the estimate"
    if np.count_nonzero(round_) >= MIN_ROUND:
        round_px = weighted_median(2 * np.sqrt(areas[round_] / np.pi), areas[round_]) * factor
        if abs(np.log(round_px / px)) >= DISAGREE:
            confidence = round(confidence / 2, 3)
            note = f"round cells ({round_px:.0f} px) and discs ({px:.0f} px) disagree"
        px = float(np.sqrt(round_px * px))
    note = "" if confidence >= MIN_CONFIDENCE else f"low confidence: {note}"
    return RedCellSize(px, confidence, support, "estimated", note)


def _bounded(size: RedCellSize, image_area: int) -> RedCellSize:
    """No estimate when fewer than ``MIN_FIT`` such red cells would fit in the image."""
    limit = np.sqrt(4 * image_area / (MIN_FIT * np.pi))
    if size.px > limit:
        return _fail(f"{size.px:.0f} px red cells: fewer than {MIN_FIT} would fit in the image", size.cells)
    return size


def _confidence(radii: np.ndarray, radius: float, support: int, weights: np.ndarray) -> float:
    """More agreeing discs and a larger agreeing share: confidence 1 from 12 discs and 60 %."""
    share = float(weights[np.abs(np.log(radii / radius)) < SUPPORT].sum() / weights.sum())
    return round(min(1.0, support / 12) * min(1.0, share / 0.6), 3)


def cell_masks(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(cells, nuclei)`` boolean maps of an RGB uint8 array (module docstring, steps 1-2)."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    density = optical_density(rgb)
    total = ndi.gaussian_filter(density.sum(axis=-1), 1.0, truncate=2.0)
    # clipping at the 60th percentile keeps dark nuclei from pulling the threshold above the red cells;
    # a quarter of the pixels gives the same threshold
    sample = total[::2, ::2]
    threshold = max(threshold_otsu(np.clip(sample, 0, np.quantile(sample, 0.6))), MIN_DENSITY)
    nuclei = density[..., 1] - density[..., 2] > NUCLEUS_MIN
    return fill_holes(total > threshold), nuclei


_LOG = np.log(np.maximum(np.arange(256), 1)).astype(np.float32)  # ln of each 8-bit level


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """``ln(background / I)`` per channel; background = median of the brightest 25 % of pixels."""
    sample = rgb[::2, ::2].reshape(-1, 3)  # a quarter of the pixels: the same background, 4x faster
    brightness = sample.sum(axis=-1, dtype=np.int16)
    k = int(0.75 * brightness.size)
    background = np.median(sample[brightness >= np.partition(brightness, k)[k]], axis=0)
    return np.log(np.maximum(background, 1)).astype(np.float32) - _LOG[rgb]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background pockets that do not reach the border become foreground (3x faster than
    ``binary_fill_holes``: one labelling)."""
    from scipy import ndimage as ndi

    labels, _ = ndi.label(~mask)
    outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return mask | ~np.isin(labels, outside)


def disc_radii(cells: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Radii of the inscribed discs, one per cell, away from nuclei (module docstring, steps 3 and 5)."""
    return red_cells(cells, nuclei)[0]


def red_cells(cells: np.ndarray, nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(radii, areas)`` of the red cells: inscribed discs away from nuclei, and the areas of their
    watershed regions (module docstring, steps 3-5), in working px."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    depth = ndi.distance_transform_edt(cells)  # the image edge is not background: cut cells keep depth
    peaks = (depth >= ndi.maximum_filter(depth, size=5)) & (depth > MIN_RADIUS)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-depth[ys, xs], kind="stable")[:400]  # 400: far more than a field's red cells
    ys, xs = ys[order], xs[order]
    radii = depth[ys, xs]
    keep = _outermost(ys, xs, radii)
    ys, xs, radii = ys[keep], xs[keep], radii[keep]
    if radii.size == 0:
        return radii, radii
    # every disc seeds a region, those reaching a nucleus too: a white cell's region stays its own.
    # At half resolution: 4x faster (2.3 -> 0.6 ms), the same shares within 10 % +-0.03 (TXL-PBC train)
    markers = np.zeros(depth[::2, ::2].shape, np.int32)
    markers[ys // 2, xs // 2] = np.arange(1, radii.size + 1)
    regions = watershed(-depth[::2, ::2], markers, mask=cells[::2, ::2])
    areas = 4 * np.bincount(regions.ravel(), minlength=radii.size + 1)[1:]
    if not nuclei.any():
        return radii, areas.astype(float)
    clear = ndi.distance_transform_cdt(~nuclei, metric="chessboard")[ys, xs] > radii
    return radii[clear], areas[clear].astype(float)


def _outermost(ys: np.ndarray, xs: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Discs whose centre lies inside no larger disc."""
    distance = np.hypot(ys[:, None] - ys[None, :], xs[:, None] - xs[None, :])
    inside = (distance < radii[None, :]) & (radii[None, :] > radii[:, None])
    return ~inside.any(axis=1)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def resolve_red_cell_size(image: ImageLike, given: float | None = None, default: float = DEFAULT_RED_CELL_PX,
                          estimate: Callable[[ImageLike], RedCellSize] | None = None) -> RedCellSize:
    """The size to use: ``given`` when set, else the estimate (``estimate``, default
    ``estimate_red_cell_px``), else ``default`` with the reason."""
    if given is not None:
        if not given > 0:
            raise ValueError(f"given red-cell size must be > 0, got {given}")
        return RedCellSize(float(given), 1.0, 0, "given", method="")
    estimate = (estimate or estimate_red_cell_px)(image)
    if estimate.px is not None and estimate.confidence >= MIN_CONFIDENCE:
        return estimate
    reason = estimate.note or "no estimate"
    return RedCellSize(float(default), estimate.confidence, estimate.cells, "default",
                       f"using the default {default:g} px: {reason}", method="")


def measure_red_cells(image: ImageLike, given: float | None = None, detector=None) -> RedCellSize:
    """``resolve_red_cell_size`` for an image about to go through ``detector``: a detector that finds
    red cells itself (the learned one has ``estimate_red_cells``) measures them, others use the discs."""
    return resolve_red_cell_size(image, given, estimate=getattr(detector, "estimate_red_cells", None))
