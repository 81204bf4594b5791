"""Another lab's look, for measuring how a captioner copes with it: ``hemcap eval --look DIR``.

A ``Look`` is what a folder of a lab's smears has in common that a cell crop can be given: its
colour statistics (mean and spread of each CIELAB channel, the medians over its images) and its
red-cell diameter in pixels (its magnification; ``hemcap.smear.magnification``). ``restyle``
re-renders an image in a look: Reinhard et al.'s colour transfer (2001: each Lab channel shifted
and scaled from the image's own statistics to the look's), and, when the look's red cells are
smaller in pixels than the image's (a lower magnification), the resolution lost by shrinking to
that magnification and enlarging back. A proxy: real optics (defocus, the camera's noise and
compression) differ more than colour and sampling.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

LOOK_IMAGES = 40  # smears a look is measured on (their medians move < 1 Lab unit beyond ~30 on TXL-PBC)
THUMB_SIDE = 256  # colour statistics on a copy this size: the same means, 10x faster on 640x480


@dataclass(frozen=True)
class Look:
    """A lab's colour statistics and magnification."""

    name: str
    lab_mean: tuple[float, float, float]  # CIELAB L, a, b means, median over the look's images
    lab_std: tuple[float, float, float]  # their spreads, likewise
    red_cell_px: float | None = None  # median red-cell diameter in pixels; None: not measured

    def as_dict(self) -> dict:
        return asdict(self)


def lab_statistics(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each CIELAB channel of an image."""
    from skimage.color import rgb2lab

    small = image.convert("RGB")
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    lab = rgb2lab(np.asarray(small)).reshape(-1, 3)
    return lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-3)


def measure_look(folder: str | Path, name: str | None = None, limit: int = LOOK_IMAGES) -> Look:
    """The look of up to ``limit`` smears in ``folder`` (sorted, searched recursively)."""
    from hemcap.images import iter_images, load_rgb
    from hemcap.smear.magnification import estimate_red_cell_px

    paths = [path for path, note in iter_images([folder]) if note is None][:limit]
    if not paths:
        raise ValueError(f"look folder {folder}: no images found")
    images = [load_rgb(path) for path in paths]
    stats = [lab_statistics(image) for image in images]
    sizes = [size.px for image in images if (size := estimate_red_cell_px(image)).px]
    return Look(name or Path(folder).name, _median_triple([m for m, _ in stats]), _median_triple([s for _, s in stats]),
                statistics.median(sizes) if sizes else None)


def _median_triple(rows: Sequence[np.ndarray]) -> tuple[float, float, float]:
    return tuple(round(float(v), 3) for v in np.median(np.stack(rows), axis=0))


def restyle(image: Image.Image, look: Look, red_cell_px: float | None = None) -> Image.Image:
    """``image`` in ``look``: its colours moved to the look's, and, when ``red_cell_px`` (the image's
    red-cell size) is given and the look's red cells are smaller, its resolution too."""
    from skimage.color import lab2rgb, rgb2lab

    mean, std = lab_statistics(image)
    lab = rgb2lab(np.asarray(image.convert("RGB")))
    lab = (lab - mean) / std * np.asarray(look.lab_std) + np.asarray(look.lab_mean)
    styled = Image.fromarray(np.round(np.clip(lab2rgb(lab), 0, 1) * 255).astype(np.uint8))
    if look.red_cell_px and red_cell_px and look.red_cell_px < red_cell_px:
        styled = _resampled(styled, look.red_cell_px / red_cell_px)
    return styled


def _resampled(image: Image.Image, factor: float) -> Image.Image:
    """Shrunk by ``factor`` and enlarged back: the detail a lower magnification does not record."""
    small = image.resize((max(1, round(image.width * factor)), max(1, round(image.height * factor))), Image.BILINEAR)
    return small.resize(image.size, Image.BICUBIC)
