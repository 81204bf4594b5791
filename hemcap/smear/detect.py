"""Find the white blood cells on a smear image: a weight-free stain detector, a ``Detector``
protocol other detectors plug into (``hemcap.smear.saved`` adapts other tools' predictions), and
square crops for the captioner.

The stain detector needs no trained weights. It works on optical density relative to the slide
background, ``OD_c = ln(background_c / I_c)``, measured against the image's own red cells: their
colour is learned per image (the median OD of the stained pixels, most of which are red cells)
and each contrast is zero on it, whatever the lab's stain, scanner or background tint:

- ``violet = OD_red - (r_red / r_blue) OD_blue``: red light absorbed beyond what a red cell of
  the same blue density absorbs: nuclei and lilac cytoplasm;
- ``stain = OD_green - (r_green / r_blue) OD_blue``: the same for green light: every part of a
  white cell, magenta nuclei (Raabin) and eosinophil granules included,

where ``r`` is the red cells' OD. ``violet + stain`` is the nucleus darkness: 1.2-2.2 in nuclei
of all four TXL-PBC labs, 0 in red cells and background.

A pixel belongs to a white cell when the violet or stain contrast is high, when both are
modestly positive (pale cytoplasm), or when it absorbs more green than red (granules, pale
cytoplasm) close to a nucleus. A morphological opening removes red-cell rims and platelets; the
darkness above 0.4 inside the cells marks the nuclei (an Otsu threshold clipped to a range; the
train search closed the range to that one value); a watershed from the
nuclei splits touching cells, and regions sharing a long border (lobes of one nucleus) are merged
again. Each cell's box is the bounding box of its region grown by a small margin and widened to
at least 1.3 red-cell diameters (white cells are bigger; pale cytoplasm can escape the mask); its
score grows with the nucleus area and drops when the image border cuts the cell.

Lengths are in BCCD pixels (red cells 100 px): ``config.scale``, or per call
``detector(image, red_cell_px=...)`` (e.g. from ``hemcap.smear.magnification``), sets the size.

The constants were chosen on TXL-PBC train (four labs, red-cell size from the labelled red
cells; coordinate search of AP + recall + IoU/2 summed over labs); the BCCD-only constants they
replace were tuned on BCCD train. Measured on TXL-PBC val (283 smears, ``red_cell_px`` = median
labelled red-cell side; AP@0.5 / recall@0.5 / mean IoU):

    BCCD 1.000 / 1.000 / 0.854   BCD 0.950 / 0.957 / 0.816   PBC 0.979 / 0.981 / 0.870
    Raabin-WBC 0.918 / 0.935 / 0.807   pooled 0.954 / 0.963 / 0.837
    (BCCD-only constants: BCCD 0.996 / 1.000, BCD 0.834 / 0.872, PBC 0.677 / 0.800,
    Raabin-WBC 0.177 / 0.389, pooled 0.527 / 0.690)

With ``red_cell_px`` 10 % off, pooled AP stays 0.952 (-10 %) / 0.955 (+10 %); BCD drops to
0.911 at -10 %. BCCD test (72 smears, scale 1): AP 0.987, recall 1.000, mean IoU 0.859
(BCCD-only constants: 0.988 / 1.000 / 0.856). Of Raabin's 7 val misses, 4 are red cells or
corner slivers labelled WBC; the others are a neutrophil whose lobes came apart (two boxes) and
a blurred field. With the red-cell size measured on each image instead, as ``hemcap detect`` does
(``hemcap.smear.magnification``): TXL-PBC val pooled 0.943 / 0.967 / 0.832, Raabin-WBC 0.890 /
0.935; BCCD test 0.958 / 0.972 / 0.848 (BENCHMARKS.md, "Detection across labs"). Eosinophils'
orange granules have a red cell's hue; their density (``granule_density_min``) keeps them
(hemcap.synthetic's; no change on TXL-PBC train).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Union

import numpy as np
from PIL import Image

from hemcap.images import background_colour, square_crop

ImageLike = Union[Image.Image, np.ndarray]
Box = tuple[float, float, float, float]
BCCD_RED_CELL_PX = 100.0  # red-cell diameter in the BCCD pixels the config's lengths are given in
NEEDS_COLOUR = "the stain detector needs colour, so it finds no cells in a grayscale image"


@dataclass(frozen=True)
class Detection:
    """One white cell: its box in pixels of the input image and a confidence in [0, 1]."""

    box: Box  # (x0, y0, x1, y1), pixel edges: x1 - x0 is the width
    score: float
    label: str = "WBC"

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]


class Detector(Protocol):
    """Anything that finds cells: ``detector(image, path=None, red_cell_px=None) -> list[Detection]``.

    ``path`` names the file the image came from; detectors that look up predictions saved by
    another tool need it, the others ignore it. ``red_cell_px`` is the image's red-cell diameter
    in pixels, its magnification (``hemcap.smear.magnification``); detectors that work at a
    fixed magnification measure it themselves when it is None, saved predictions ignore it.
    """

    def __call__(self, image: ImageLike, path: str | Path | None = None,
                 red_cell_px: float | None = None) -> list[Detection]: ...


# ------------------------------------------------------------------------------ stain detector


@dataclass(frozen=True)
class StainDetectorConfig:
    """Thresholds of the weight-free detector. Lengths and areas are in pixels of a BCCD image
    (640x480 fields, red cells ~100 px and white cells 100-250 px across); ``scale`` converts them."""

    scale: float = 1.0  # image pixels per BCCD pixel: your red-cell diameter / 100 (hemcap.synthetic smears: 0.6)
    red_cell_od_min: float = 0.2  # summed OD above this: stained pixels, mostly red cells; their median is r
    work_scale: int = 4  # at scale 1, segment at 1/4 of the input size (160x120): 5x faster, same boxes
    background_quantile: float = 0.75  # pixels brighter than this quantile set the slide background colour
    smooth_px: float = 3.0  # Gaussian sigma on optical density, averages eosinophil granules into an area
    violet_min: float = 0.1  # violet above this: nucleus or lilac cytoplasm (red cells sit at 0)
    stain_min: float = 0.1  # stain above this: granules or dense cytoplasm, whatever the violet
    pale_stain_min: float = 0.08  # pale cytoplasm: stain above this ...
    pale_violet_min: float = 0.05  # ... and violet above this (red cells at 0, their rims below)
    granule_redness_min: float = 0.05  # stain - violet above this near a nucleus: granules, pale cytoplasm,
    granule_reach_px: float = 40.0  # ... within this distance of a nucleus core (train: 40 beat 30, 60 and 80)
    granule_density_min: float = 2.0  # ... or summed OD above this x a red cell's (orange eosinophil granules: ~2.4)
    opening_px: float = 12.0  # disk radius of the opening that cuts red-cell rims and platelets away
    nucleus_otsu_range: tuple[float, float] = (0.4, 0.4)  # Otsu of violet + stain in cells, clipped (nuclei 1.2-2.2)
    min_nucleus_area: float = 120.0  # px^2; smaller nucleus seeds are ignored
    min_cell_area: float = 4000.0  # px^2; smaller regions are platelet clumps (smallest BCCD train WBC: 5,776)
    lobe_contact: float = 0.75  # merge two regions whose shared border >= this x the smaller one's diameter
    box_margin: float = 0.03  # grow each box by this share of its longer side (BCCD boxes leave a small gap)
    min_box_side: float = 130.0  # widen boxes to this about their centre (labelled WBC: 95 % >= 1.3 red cells)
    score_nucleus_area: float = 3000.0  # score = 1 - exp(-nucleus area / this) ...
    truncation_penalty: float = 0.5  # ... x (1 - this x share of the cell's diameter lying on the image border)
    min_score: float = 0.0  # drop detections scoring below this

    def __post_init__(self):
        problems = _config_problems(self)
        if problems:
            raise ValueError("StainDetectorConfig: " + "; ".join(problems))


def _config_problems(cfg: StainDetectorConfig) -> list[str]:
    problems = []
    if not cfg.scale > 0:
        problems.append(f"scale must be > 0, got {cfg.scale}")
    if not (isinstance(cfg.work_scale, int) and cfg.work_scale >= 1):
        problems.append(f"work_scale must be an integer >= 1, got {cfg.work_scale!r}")
    if not 0 < cfg.background_quantile < 1:
        problems.append(f"background_quantile must be in (0, 1), got {cfg.background_quantile}")
    for name in ("smooth_px", "granule_reach_px", "granule_density_min", "opening_px", "min_nucleus_area",
                 "min_cell_area", "lobe_contact", "box_margin", "min_box_side", "score_nucleus_area",
                 "red_cell_od_min"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(cfg, name)}")
    low, high = cfg.nucleus_otsu_range
    if low > high:
        problems.append(f"nucleus_otsu_range must be (low, high) with low <= high, got {cfg.nucleus_otsu_range}")
    for name in ("truncation_penalty", "min_score"):
        if not 0 <= getattr(cfg, name) <= 1:
            problems.append(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    return problems


class StainDetector:
    """The weight-free detector: ``StainDetector(config)(image) -> list[Detection]``."""

    def __init__(self, config: StainDetectorConfig | None = None):
        self.config = config or StainDetectorConfig()

    def __call__(self, image: ImageLike, path: str | Path | None = None,
                 red_cell_px: float | None = None) -> list[Detection]:
        """``red_cell_px``: this image's red-cell diameter in pixels; it replaces ``config.scale``
        (scale = red_cell_px / 100) for this call, e.g. from ``hemcap.smear.magnification``."""
        cfg = self.config
        scale = _call_scale(cfg, red_cell_px)
        small = _shrink(as_pil_rgb(image), max(1, round(cfg.work_scale * scale)))
        px = scale * small.width / image_size(image)[0]  # working pixels per BCCD pixel
        violet, stain, density = stain_contrasts(np.asarray(small), cfg.background_quantile,
                                                 cfg.smooth_px * px, cfg.red_cell_od_min)
        regions, nuclei = segment_cells(violet, stain, cfg, px, density)
        return _detections(regions, nuclei, cfg, image_size(image), scale)


def _call_scale(cfg: StainDetectorConfig, red_cell_px: float | None) -> float:
    if red_cell_px is None:
        return cfg.scale
    if not (isinstance(red_cell_px, (int, float)) and math.isfinite(red_cell_px) and red_cell_px > 0):
        raise ValueError(f"red_cell_px must be a positive number of pixels, got {red_cell_px!r}")
    return red_cell_px / BCCD_RED_CELL_PX


def detect(image: ImageLike, config: StainDetectorConfig | None = None) -> list[Detection]:
    """White cells on a smear image with the weight-free stain detector."""
    return StainDetector(config)(image)


def find_cells(detector: Detector, image: Image.Image, path: str | Path | None = None,
               notes: list[str] | None = None, red_cell_px: float | None = None):
    """``(detections, red_cells)``: ``detector``'s cells at the image's magnification, ``red_cell_px``
    when given, else measured (``hemcap.smear.magnification.measure_red_cells``). ``notes`` gets why
    the size had to be guessed, and why the stain detector finds no cell on a grey image."""
    from hemcap.smear.magnification import measure_red_cells  # it builds on this module

    red_cells = measure_red_cells(image, red_cell_px, detector)
    if notes is not None and red_cells.note:
        notes.append(red_cells.note)
    detections = detector(image, path=path, red_cell_px=red_cells.px)
    if notes is not None and not detections and isinstance(detector, StainDetector) and is_grey(image):
        notes.append(NEEDS_COLOUR)
    return detections, red_cells


def is_grey(image: ImageLike) -> bool:
    """Whether every pixel has equal red, green and blue: a grayscale picture, whatever its file's mode."""
    pixels = np.asarray(as_pil_rgb(image))
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


def as_pil_rgb(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"expected an HxWx3 RGB array, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array, got {array.dtype} (load files with hemcap.images.load_rgb)")
    return Image.fromarray(array[..., :3])


def image_size(image: ImageLike) -> tuple[int, int]:
    """(width, height)."""
    if isinstance(image, Image.Image):
        return image.size
    return int(image.shape[1]), int(image.shape[0])


def _shrink(image: Image.Image, factor: int) -> Image.Image:
    factor = min(factor, image.width, image.height)
    return image.reduce(factor) if factor > 1 else image


def stain_contrasts(rgb: np.ndarray, background_quantile: float = 0.75, sigma: float = 0.75,
                    red_cell_od_min: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(violet, stain, density)`` maps of an RGB uint8 array (module docstring), smoothed by ``sigma``
    pixels: red and green optical density less the blue density times this image's red-cell ratio,
    and the summed optical density in units of a red cell's."""
    density = optical_density(rgb, background_quantile, sigma)
    red, green, blue = red_cell_colour(density, red_cell_od_min)
    violet = density[..., 0] - (red / blue) * density[..., 2]
    stain = density[..., 1] - (green / blue) * density[..., 2]
    return violet, stain, density.sum(axis=-1) / (red + green + blue)


def optical_density(rgb: np.ndarray, background_quantile: float = 0.75, sigma: float = 0.75) -> np.ndarray:
    """``ln(background / I)`` per channel, the background being the median of the brightest pixels."""
    from scipy import ndimage as ndi

    pixels = rgb.astype(np.float32)
    brightness = pixels.sum(axis=-1)
    background = np.median(pixels[brightness >= np.quantile(brightness, background_quantile)], axis=0)
    density = np.log(np.maximum(background, 1.0) / np.maximum(pixels, 1.0))
    return ndi.gaussian_filter(density, (sigma, sigma, 0)) if sigma > 0 else density


def red_cell_colour(density: np.ndarray, od_min: float) -> np.ndarray:
    """Median optical density (red, green, blue) of the stained pixels, most of them red cells.
    Without any (a blank or grey field) it is neutral grey, and the contrasts are plain differences."""
    stained = density[density.sum(axis=-1) > od_min]
    if len(stained) < 16:
        return np.ones(3, np.float32)
    colour = np.median(stained, axis=0)
    return np.maximum(colour, 0.05 * colour.max(), dtype=np.float32) if colour.max() > 0 else np.ones(3, np.float32)


def segment_cells(violet: np.ndarray, stain: np.ndarray, cfg: StainDetectorConfig,
                  px: float, density: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(regions, nuclei)``: a label image with one label per white cell, and the nucleus mask.
    ``px`` is the size of a BCCD pixel in pixels of these maps."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    cells = white_cell_mask(violet, stain, cfg, px, density)
    darkness = violet + stain  # nuclei: the most red- and green-absorbing pixels, whatever the stain's hue
    nuclei = cells & (darkness > _nucleus_threshold(darkness, cells, cfg.nucleus_otsu_range))
    seeds = _drop_small(ndi.label(nuclei)[0], cfg.min_nucleus_area * px**2)
    if not seeds.any():
        return np.zeros(violet.shape, np.int32), nuclei
    depth = ndi.distance_transform_edt(cells)  # splits along the neck between touching cells
    regions = watershed(-depth, seeds, mask=cells)
    regions = merge_lobes(regions, cfg.lobe_contact)
    return _drop_small(regions, cfg.min_cell_area * px**2), nuclei


def white_cell_mask(violet: np.ndarray, stain: np.ndarray, cfg: StainDetectorConfig, px: float,
                    density: np.ndarray | None = None) -> np.ndarray:
    from scipy import ndimage as ndi

    cells = (violet > cfg.violet_min) | (stain > cfg.stain_min)
    cells |= (stain > cfg.pale_stain_min) & (violet > cfg.pale_violet_min)
    cells |= granule_mask(violet, stain, cfg, px, density)
    cells = binary_opening_disk(cells, cfg.opening_px * px)
    return ndi.binary_fill_holes(cells)


def granule_mask(violet: np.ndarray, stain: np.ndarray, cfg: StainDetectorConfig, px: float,
                 density: np.ndarray | None = None) -> np.ndarray:
    """Pixels absorbing more green than red for their blue (stain - violet), or far denser than a red
    cell, close to a nucleus core: eosinophil granules and pale cytoplasm. Orange granules have a red
    cell's hue, so only their density tells them apart. Noise on red cells reaches it too, hence the leash."""
    from scipy import ndimage as ndi

    core = violet + stain > sum(cfg.nucleus_otsu_range) / 2  # the middle of the nucleus threshold range
    if not core.any():
        return core
    near = ndi.distance_transform_edt(~core) <= cfg.granule_reach_px * px
    granules = stain - violet > cfg.granule_redness_min  # stain - violet = OD_green - OD_red
    if density is not None:
        granules |= density > cfg.granule_density_min
    return near & granules


def binary_opening_disk(mask: np.ndarray, radius: float) -> np.ndarray:
    """Opening by a disk of ``radius`` through two distance transforms: its cost does not grow with the radius."""
    from scipy import ndimage as ndi

    if radius <= 0:
        return mask
    eroded = ndi.distance_transform_edt(mask) > radius
    return ndi.distance_transform_edt(~eroded) <= radius


def _nucleus_threshold(violet: np.ndarray, cells: np.ndarray, clip: tuple[float, float]) -> float:
    from skimage.filters import threshold_otsu

    values = violet[cells]
    if values.size < 2 or values.min() == values.max():
        return clip[1]
    return float(np.clip(threshold_otsu(values), *clip))


def _drop_small(labels: np.ndarray, min_area: float) -> np.ndarray:
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    keep[0] = False
    return np.where(keep[labels], labels, 0)


def merge_lobes(regions: np.ndarray, min_contact: float) -> np.ndarray:
    """Merge neighbouring regions whose shared border is at least ``min_contact`` times the smaller
    one's equivalent diameter: lobes of one nucleus share a long border, touching cells a short neck."""
    regions = regions.copy()
    while (pair := _most_connected_pair(regions, min_contact)) is not None:
        regions[regions == pair[1]] = pair[0]
    return regions


def _most_connected_pair(regions: np.ndarray, min_contact: float) -> tuple[int, int] | None:
    from scipy import ndimage as ndi

    areas = np.bincount(regions.ravel())
    best, best_ratio = None, min_contact
    for label, window in enumerate(ndi.find_objects(regions), 1):
        if window is None:
            continue
        local = regions[tuple(slice(max(0, w.start - 1), w.stop + 1) for w in window)]  # 1 px of neighbours
        own = local == label
        for other in np.unique(local[ndi.binary_dilation(own) & ~own]):
            if other <= label:
                continue
            contact = np.count_nonzero(own & ndi.binary_dilation(local == other))
            ratio = contact / (2 * math.sqrt(min(areas[label], areas[other]) / math.pi))
            if ratio >= best_ratio:
                best, best_ratio = (label, int(other)), ratio
    return best


def _detections(regions: np.ndarray, nuclei: np.ndarray, cfg: StainDetectorConfig,
                size: tuple[int, int], scale: float) -> list[Detection]:
    from skimage.measure import regionprops

    fx, fy = size[0] / regions.shape[1], size[1] / regions.shape[0]  # work pixels -> input pixels
    found = []
    for region in regionprops(regions):
        nucleus_area = np.count_nonzero(nuclei[region.slice] & region.image) * fx * fy / scale**2
        score = 1 - math.exp(-nucleus_area / max(cfg.score_nucleus_area, 1e-9))
        score *= 1 - cfg.truncation_penalty * min(1.0, _border_share(region, regions.shape))
        if score >= cfg.min_score:
            box = _grown_box(region.bbox, cfg.box_margin, fx, fy, size)
            found.append(Detection(_widened_box(box, cfg.min_box_side * scale, size), round(score, 4)))
    return sorted(found, key=lambda d: -d.score)


def _border_share(region, shape: tuple[int, int]) -> float:
    """Pixels of the region on the image border, as a share of its equivalent diameter."""
    y0, x0, y1, x1 = region.bbox
    mask = region.image
    on_border = (mask[0].sum() if y0 == 0 else 0) + (mask[-1].sum() if y1 == shape[0] else 0)
    on_border += (mask[:, 0].sum() if x0 == 0 else 0) + (mask[:, -1].sum() if x1 == shape[1] else 0)
    return float(on_border) / (2 * math.sqrt(region.area / math.pi))


def _grown_box(bbox, margin: float, fx: float, fy: float, size: tuple[int, int]) -> Box:
    y0, x0, y1, x1 = bbox
    x0, x1, y0, y1 = x0 * fx, x1 * fx, y0 * fy, y1 * fy
    grow = margin * max(x1 - x0, y1 - y0)
    return (max(0.0, x0 - grow), max(0.0, y0 - grow), min(float(size[0]), x1 + grow), min(float(size[1]), y1 + grow))


def _widened_box(box: Box, side: float, size: tuple[int, int]) -> Box:
    """``box`` widened and heightened about its centre to at least ``side``, within the image."""
    x0, y0, x1, y1 = box
    grow_x, grow_y = max(0.0, side - (x1 - x0)) / 2, max(0.0, side - (y1 - y0)) / 2
    return (max(0.0, x0 - grow_x), max(0.0, y0 - grow_y), min(float(size[0]), x1 + grow_x),
            min(float(size[1]), y1 + grow_y))


# ------------------------------------------------------------------------------ crops


FIELD_MARGIN = 0.05  # a cell larger than the field still gets this much of its surroundings


def crop_cells(image: ImageLike, detections: Iterable[Detection], size: int | None = 384,
               margin: float = 0.6, field: float | None = None) -> list[Image.Image]:
    """One square RGB crop per detection, centred on its box, resized to ``size`` (the captioner's
    input side; None keeps the pixels). Parts beyond the image border are filled with the slide
    background colour.

    With ``field`` (pixels; ``hemcap.domain.field_side``) each crop is that field of view, the one
    the captioner was trained on at this smear's magnification, so a cell's size shows against
    its surroundings as in training. Without, ``margin`` of the box's longer side is added on each
    side: the cell then spans ~45% of the crop (PBC: ~140 of 360 px), whatever its real size.
    """
    picture = as_pil_rgb(image)
    fill = background_colour(picture)
    if field:
        return [square_crop(picture, d.box, FIELD_MARGIN, size, fill, min_side=field) for d in detections]
    return [square_crop(picture, d.box, margin, size, fill) for d in detections]
