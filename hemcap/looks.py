"""Another lab's look, for measuring how a captioner copes with it: ``hemcap eval --look DIR``.

A ``Look`` is what a folder of a lab's smears has in common that a cell crop can be given: its
stain (background colour, optical densities of red cells and of white-cell nuclei), its colour
statistics (mean and spread of each CIELAB channel, the medians over its images), its red-cell
diameter in pixels (its magnification; ``hemcap.smear.magnification``) and its sharpness.
``restyle`` re-renders an image in a look: its stain re-mixed (its optical densities mapped by the
matrix closest to the identity that takes its red cells' and nuclei's densities to the look's,
lit by the look's background; Reinhard et al.'s CIELAB transfer for looks measured before the
stain was, or images without red cells or a nucleus). Red cells and nuclei move independently:
a captioner whose input is normalised on background and red cells (``hemcap.domain``) still sees
the look's nucleus colours, as on the lab's own smears (BCCD's and BCD's nuclei are bluer against
their red cells than PBC's, Raabin-WBC's redder). ``hemcap eval --look`` re-mixes every cell by one
matrix, from the split's own stain (its ``look_of``) to the look's, as a lab's stain acts on all its
cells alike: a dense nucleus stays denser than a pale one. (Each image's own densities taken to the
look's would erase that, and be undone exactly by a normaliser that measures each image the same
way.) When the look's red cells are smaller in pixels than the image's (a lower magnification), the
resolution lost by shrinking to that magnification and enlarging back; and, when the look is softer
than the image, a Gaussian blur that brings the image's sharpness down to the look's.

Sharpness (``sharpness``) is compared across labs at one physical scale: the grey image, its
borders trimmed, is resized so that its red cells are 32 px across; it is the share of the detail
energy (finer than 4 px, ~1 um) that lies in the finest detail (finer than 1 px, ~0.25 um), from
the image's DCT power spectrum. A ratio of energies, it ignores brightness and contrast: on 20 PBC
crops it moves by a median <= 2.4 % (the worst crop 12 %) when they are Reinhard-restyled into
BCCD's, BCD's or Raabin-WBC's colours, < 1 % when darkened, their contrast or saturation lowered,
and rises ~20 % only when brightening clips their background. Measured on 40 train smears per
TXL-PBC source: PBC 0.142 (40 PBC crops: 0.137; blurred by sigma 1 px: 0.098, 2 px: 0.049),
BCCD 0.073, BCD 0.076, Raabin-WBC 0.048 (interquartile ranges do not overlap across the sharp and
soft groups). A Gaussian blur multiplies the spectrum by a known curve, so the blur that brings an
image to a look's sharpness is found by bisection on its spectrum, computed once: ~8 ms per 360 px
crop; a crop sharper than the look lands within 8 % of its sharpness (20 PBC crops, 4 looks). On
PBC crops (red cells 74 px) that sigma is ~1.3 px for BCCD's and BCD's looks, ~1.9 px for
Raabin-WBC's; PBC's own look blurs its sharper half (its median) by < 0.4 px.
Still a proxy: JPEG blocking and camera noise are not given (the noise in the flattest 30 % of
pixels is 0.07-0.23 grey levels in every source, under the 8-bit step: nothing measurable to add),
nor defocus that varies across a field.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

LOOK_IMAGES = 40  # smears a look is measured on (their medians move < 1 Lab unit beyond ~30 on TXL-PBC)
THUMB_SIDE = 256  # colour statistics on a copy this size: the same means, 10x faster on 640x480
# Sharpness is measured with red cells this many px across: every TXL source is shrunk to it (their
# red cells are 71-124 px); 48 or 64 px order the sources alike (values within 0.01), at 2-4x the cost.
SHARP_RED_CELL_PX = 32.0
FINE_SIGMA = 1.0  # px at that scale (~0.25 um): Gaussian high-pass of the finest detail
DETAIL_SIGMA = 4.0  # px (~1 um): all detail; coarser structure (cell layout) is left out of the total
TRIM = 0.02  # share of each side cut off first: BCD smears' 1-px black border line doubled their sharpness
MAX_BLUR = 8.0  # px at that scale (a quarter red cell): the bisection's upper bound, sharpness ~0.005
BISECTIONS = 12  # 8 px / 2^12: sigma to 0.002 px, far below what moves sharpness 1 %
MIN_BLUR = 0.05  # image px: a smaller blur changes no 8-bit pixel


@dataclass(frozen=True)
class Look:
    """A lab's colour statistics and magnification."""

    name: str
    lab_mean: tuple[float, float, float]  # CIELAB L, a, b means, median over the look's images
    lab_std: tuple[float, float, float]  # their spreads, likewise
    red_cell_px: float | None = None  # median red-cell diameter in pixels; None: not measured
    # median sharpness of its images at one physical scale (``sharpness``: the share of their detail
    # energy that is finest; PBC ~0.14, BCCD ~0.07); None: not measured (no red-cell size, older looks)
    sharpness: float | None = None
    # the stain: median background colour (RGB) and optical densities of red cells and of white-cell
    # nuclei against it (``stain_anchors``); None: not measured (older looks: Reinhard's transfer only)
    background_rgb: tuple[float, float, float] | None = None
    red_cell_od: tuple[float, float, float] | None = None
    nucleus_od: tuple[float, float, float] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def thumbnail_rgb(image: Image.Image) -> np.ndarray:
    """uint8 RGB of ``image`` at most ``THUMB_SIDE`` across: colour statistics are measured on it."""
    small = image.convert("RGB")
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    return np.asarray(small)


def lab_statistics(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each CIELAB channel of an image."""
    from skimage.color import rgb2lab

    return lab_moments(rgb2lab(thumbnail_rgb(image)))


def lab_moments(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (at least 1e-3) of each channel of a CIELAB array."""
    flat = lab.reshape(-1, 3)
    return flat.mean(axis=0), np.maximum(flat.std(axis=0), 1e-3)


def measure_look(folder: str | Path, name: str | None = None, limit: int = LOOK_IMAGES) -> Look:
    """The look of up to ``limit`` smears in ``folder`` (sorted, searched recursively)."""
    from hemcap.images import iter_images, load_rgb

    paths = [path for path, note in iter_images([folder]) if note is None][:limit]
    if not paths:
        raise ValueError(f"look folder {folder}: no images found")
    return look_of([load_rgb(path) for path in paths], name or Path(folder).name)


def look_of(images: Sequence[Image.Image], name: str) -> Look:
    """The look of ``images`` (RGB; ``LOOK_IMAGES`` of them are enough): of a lab's smears, or of the
    cells a look re-renders (``restyle``'s ``source``)."""
    from hemcap.smear.magnification import estimate_red_cell_px

    stats = [lab_statistics(image) for image in images]
    sizes = [size.px for image in images if (size := estimate_red_cell_px(image)).px]
    red_cell_px = statistics.median(sizes) if sizes else None
    return Look(name, _median_triple([m for m, _ in stats]), _median_triple([s for _, s in stats]),
                red_cell_px, _look_sharpness(images, red_cell_px), *_look_stain(images))


def stain_anchors(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """An image's background colour (RGB) and the median optical densities (``ln(background / I)``
    per channel) of its red cells and of its white-cell nuclei; None where fewer than 50 pixels show."""
    from hemcap.domain import MIN_RED_PIXELS, anchor_masks

    rgb = thumbnail_rgb(image)
    background, red, nuclei = anchor_masks(rgb)
    colour = np.median(rgb[background].astype(np.float64), axis=0)
    od = np.log(np.maximum(colour, 1)) - np.log(np.maximum(rgb.astype(np.float64), 1))
    return colour, *(np.median(od[mask], axis=0) if mask.sum() >= MIN_RED_PIXELS else None for mask in (red, nuclei))


def _look_stain(images: Sequence[Image.Image]) -> tuple:
    """(background_rgb, red_cell_od, nucleus_od) of a look: medians over its images."""
    anchors = [stain_anchors(image) for image in images]
    return tuple(_median_triple(values) if (values := [a[k] for a in anchors if a[k] is not None]) else None
                 for k in range(3))


def _look_sharpness(images: Sequence[Image.Image], red_cell_px: float | None) -> float | None:
    """The median sharpness of the images, all at the look's median red-cell size: one lab has one
    magnification, and single-image estimates are off by > 10 % on 17-45 % of TXL-PBC images."""
    if not red_cell_px:
        return None
    return round(statistics.median(sharpness(image, red_cell_px) for image in images), 5)


def _median_triple(rows: Sequence[np.ndarray]) -> tuple[float, float, float]:
    return tuple(round(float(v), 3) for v in np.median(np.stack(rows), axis=0))


def restyle(image: Image.Image, look: Look, red_cell_px: float | None = None,
            source: Look | None = None) -> Image.Image:
    """``image`` in ``look``: its colours moved to the look's; when ``red_cell_px`` (the image's
    red-cell size) is given and the look's red cells are smaller, its resolution too; and when the
    look has a sharpness below the image's, blurred to it (the image's red cells, when not given,
    are measured; an image without a measurable one is not blurred). ``source``, the look of the
    images' own lab, re-stains every image by one matrix (its lab's stain to the look's), as a
    stain acts on every cell of a slide alike, and gives their red-cell size when ``red_cell_px``
    is not; without it, each image's own stain is measured and taken to the look's, which a
    per-image normaliser undoes."""
    red_cell_px = red_cell_px or (source.red_cell_px if source is not None else None)
    styled = _restained(image, look, source)
    if styled is None:
        mean, std = lab_statistics(image)
        styled = transfer_colour(image, mean, std, np.asarray(look.lab_mean), np.asarray(look.lab_std))
    if look.red_cell_px and red_cell_px and look.red_cell_px < red_cell_px:
        styled = _resampled(styled, look.red_cell_px / red_cell_px)
    if look.sharpness:
        styled = _softened(styled, look.sharpness, red_cell_px or _red_cell_px(image))
    return styled


def _restained(image: Image.Image, look: Look, source: Look | None = None) -> Image.Image | None:
    """``image`` under the look's stain and lamp: its optical densities mapped by the matrix closest to
    the identity that takes its red cells' and nuclei's densities (``source``'s medians when given: its
    lab's) to the look's (Beer-Lambert: a stain change mixes the channels' densities), lit by the look's
    background. None when either is missing."""
    if look.nucleus_od is None or look.red_cell_od is None or look.background_rgb is None:
        return None
    background, red, nuclei = stain_anchors(image)
    if source is not None:  # the lab's stain, the image's own lamp
        red, nuclei = source.red_cell_od, source.nucleus_od
    if red is None or nuclei is None:
        return None
    return remix_stain(image, background, [red, nuclei], look.background_rgb, [look.red_cell_od, look.nucleus_od])


def remix_stain(image: Image.Image, background, densities, to_background, to_densities) -> Image.Image:
    """``image`` (lit by ``background``, RGB) with its optical densities mapped by the matrix closest to
    the identity that takes each of ``densities`` (3-vectors: red cells, nuclei, ...) to the matching
    one of ``to_densities``, lit by ``to_background``."""
    own, target = np.stack(densities, axis=1), np.stack([np.asarray(d, float) for d in to_densities], axis=1)
    mixing = np.eye(3) + (target - own) @ np.linalg.pinv(own)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    od = np.log(np.maximum(background, 1)) - np.log(np.maximum(rgb, 1))
    out = np.asarray(to_background, float) * np.exp(-(od @ mixing.T))
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def transfer_colour(image: Image.Image, mean: np.ndarray, std: np.ndarray, to_mean: np.ndarray,
                    to_std: np.ndarray) -> Image.Image:
    """Reinhard et al.'s transfer: each CIELAB channel of ``image`` (statistics ``mean``, ``std``)
    shifted and scaled to ``to_mean``, ``to_std``."""
    from skimage.color import lab2rgb, rgb2lab

    lab = (rgb2lab(np.asarray(image.convert("RGB"))) - mean) / std * to_std + to_mean
    return Image.fromarray(np.round(np.clip(lab2rgb(lab), 0, 1) * 255).astype(np.uint8))


def _resampled(image: Image.Image, factor: float) -> Image.Image:
    """Shrunk by ``factor`` and enlarged back: the detail a lower magnification does not record."""
    small = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BILINEAR)
    return small.resize(image.size, Image.BICUBIC)


def _red_cell_px(image: Image.Image) -> float | None:
    """The image's own red-cell diameter (hemcap.smear.magnification), None when unmeasurable."""
    from hemcap.smear.magnification import estimate_red_cell_px

    return estimate_red_cell_px(image).px


def sharpness(image: Image.Image, red_cell_px: float) -> float:
    """The share of the image's detail energy that is finest, at one physical scale (module docstring):
    ~0.14 for PBC's crops and smears, ~0.07 for BCCD's and BCD's, ~0.05 for Raabin-WBC's."""
    return _sharpness_of(_detail_spectrum(image, red_cell_px))


def _detail_spectrum(image: Image.Image, red_cell_px: float) -> tuple[np.ndarray, np.ndarray]:
    """The DCT power spectrum of the grey image at the common scale (the DCT mirrors the borders: no
    wrap-around edge), and each coefficient's squared frequency in cycles per px."""
    from scipy.fft import dctn

    grey = np.asarray(_at_common_scale(image, red_cell_px).convert("L"), float)
    fy, fx = (np.arange(n) / (2 * n) for n in grey.shape)
    return dctn(grey, norm="ortho") ** 2, fy[:, None] ** 2 + fx[None, :] ** 2


def _at_common_scale(image: Image.Image, red_cell_px: float) -> Image.Image:
    """Borders trimmed, resized so that its red cells are ``SHARP_RED_CELL_PX`` across."""
    cut = max(2, round(TRIM * min(image.size)))
    image = image.crop((cut, cut, image.width - cut, image.height - cut))
    factor = SHARP_RED_CELL_PX / red_cell_px
    return image.resize((max(8, round(image.width * factor)), max(8, round(image.height * factor))), Image.LANCZOS)


def _sharpness_of(spectrum: tuple[np.ndarray, np.ndarray], blur: float = 0.0) -> float:
    """Fine over all detail energy, after a Gaussian blur of ``blur`` px (at the common scale): the
    blur multiplies the power by its transfer function squared, exp(-4 pi^2 sigma^2 f^2)."""
    power, f2 = spectrum
    if blur:
        power = power * np.exp(-4 * np.pi**2 * blur**2 * f2)
    return float((power * _high_pass(f2, FINE_SIGMA)).sum() / max((power * _high_pass(f2, DETAIL_SIGMA)).sum(), 1e-12))


def _high_pass(f2: np.ndarray, sigma: float) -> np.ndarray:
    """Power response of image minus its Gaussian blur of ``sigma``: the detail finer than sigma."""
    return (1 - np.exp(-2 * np.pi**2 * sigma**2 * f2)) ** 2


def _blur_for(spectrum: tuple[np.ndarray, np.ndarray], target: float) -> float:
    """The Gaussian sigma (common-scale px) that brings the spectrum's sharpness down to ``target``:
    bisection, as blur moves energy to low frequencies and sharpness falls with sigma."""
    low, high = 0.0, MAX_BLUR
    if _sharpness_of(spectrum) <= target:
        return 0.0
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if _sharpness_of(spectrum, middle) > target else (low, middle)
    return (low + high) / 2


def _softened(image: Image.Image, target: float, red_cell_px: float | None) -> Image.Image:
    """Blurred to sharpness ``target`` when sharper; unchanged without a red-cell size to scale by."""
    if not red_cell_px:
        return image
    sigma = _blur_for(_detail_spectrum(image, red_cell_px), target) * red_cell_px / SHARP_RED_CELL_PX
    return image.filter(ImageFilter.GaussianBlur(sigma)) if sigma >= MIN_BLUR else image
