"""The training domain a captioner records, and what inference does with it.

At training (``hemcap.train``) the first ``SAMPLE`` training images are measured
(``measure_domain``): their red-cell diameter and field of view in pixels (the model's
magnification) and their CIELAB colour statistics (its stain). ``ModelInfo.magnification`` and
``ModelInfo.colour`` keep them; ``Domain.from_info`` reads them back. At inference:

- ``field_side``: a smear's cells are cropped over the field the model saw, at the smear's own
  magnification (training field x the smear's red cells / the training red cells), so a
  lymphocyte stays small next to its red cells whatever the microscope and camera;
- ``normalise_stain``: each image (training, validation and every crop captioned) is given the
  training images' colours as ``data.stain_norm`` chose: ``stain`` (the shipped recipe's: its
  optical densities re-mixed so that its red cells and nuclei absorb as the training images'),
  ``anchors`` (background and red cells only) or ``reinhard`` (BENCHMARKS.md, "Any lab's smear",
  measured all three); ``--no-stain-norm`` turns it off;
- ``domain_shift``: how far a smear sits from the training images, in colour, in magnification
  (how much its cells are enlarged to the model's) and in caption confidence, and the warning
  when any of the three passes the limit chosen on the dev looks (``BENCHMARKS.md``).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image

SAMPLE = 40  # training images measured: medians move < 1 Lab unit and < 1 % in red-cell size beyond ~30
MIN_RED_PIXELS = 50  # pixels of red cells (or nuclei) a colour anchor needs: about one red cell at 256 px
WARNING = "this smear looks unlike the training data; check every caption"
NORMALISATIONS = ("none", "reinhard", "anchors", "stain")


@dataclass(frozen=True)
class Domain:
    """What a captioner's training images looked like: magnification and colour."""

    red_cell_px: float | None = None  # median red-cell diameter in training-image pixels; None: not measured
    field_px: float | None = None  # side of a training image in pixels (geometric mean of width and height)
    lab_mean: tuple[float, float, float] | None = None  # CIELAB means, median over the images
    lab_std: tuple[float, float, float] | None = None  # CIELAB spreads within an image, median over the images
    lab_spread: tuple[float, float, float] | None = None  # spread of the images' CIELAB means around ``lab_mean``
    background: tuple[float, float, float] | None = None  # CIELAB of the slide background, median over the images
    red_cells: tuple[float, float, float] | None = None  # CIELAB of the red cells, likewise
    normalisation: str = "none"  # how an image is given the training colours: one of NORMALISATIONS
    background_rgb: tuple[float, float, float] | None = None  # RGB of the slide background, median
    red_cell_od: tuple[float, float, float] | None = None  # red cells' optical density per channel, median
    nucleus_od: tuple[float, float, float] | None = None  # white-cell nuclei's, likewise (``looks.stain_anchors``)
    # A model that sees only each field's centre (``centre_crop``) is warned on whole fields: the centre is
    # mostly the white cell, whose colours differ far less from lab to lab than background and red cells.
    field_lab_mean: tuple[float, float, float] | None = None  # CIELAB means of the whole fields; None: no crop
    field_lab_spread: tuple[float, float, float] | None = None  # their spread around ``field_lab_mean``

    @classmethod
    def from_info(cls, info) -> "Domain | None":
        """The domain a ``ModelInfo`` records; None for a model trained before hemcap recorded it."""
        magnification, colour = info.magnification or {}, info.colour or {}
        if not magnification and not colour:
            return None
        colours = {k: _triple(colour.get(k)) for k in COLOUR_KEYS + FIELD_KEYS}
        return cls(magnification.get("red_cell_px"), magnification.get("field_px"),
                   normalisation=colour.get("normalisation", "none"), **colours)

    def info_fields(self, images: int) -> tuple[dict, dict]:
        """``(magnification, colour)`` as ``ModelInfo`` keeps them."""
        magnification = {"red_cell_px": self.red_cell_px, "field_px": self.field_px, "images": images,
                         "red_cells_by": "hemcap.smear.magnification.estimate_red_cell_px"}
        colour = {**{k: getattr(self, k) for k in COLOUR_KEYS}, "images": images, "normalisation": self.normalisation}
        colour.update({k: getattr(self, k) for k in FIELD_KEYS if getattr(self, k) is not None})
        return magnification, colour

    @property
    def normalises(self) -> bool:
        return self.normalisation != "none" and self.lab_mean is not None

    def normaliser(self) -> "StainNormaliser":
        return StainNormaliser(self)


COLOUR_KEYS = ("lab_mean", "lab_std", "lab_spread", "background", "red_cells", "background_rgb", "red_cell_od",
               "nucleus_od")  # what the normaliser reads (and a cache of normalised pixels is keyed by)
FIELD_KEYS = ("field_lab_mean", "field_lab_spread")  # the shift warning's, for a model that crops


def _triple(values) -> tuple[float, float, float] | None:
    return None if values is None else tuple(float(v) for v in values)


def measure_domain(images: Sequence[Image.Image], normalisation: str = "none", crop: float = 1.0) -> Domain:
    """The domain of a model's training images (the first ``SAMPLE`` are enough): colours on what the
    model sees of each (its ``crop``, ``ModelInfo.centre_crop``), red cells and field on the whole image,
    as a smear's cells are cut over the whole field before that crop (and, with a crop, the whole
    fields' colours for the shift warning)."""
    from hemcap.images import centre_square
    from hemcap.smear.magnification import estimate_red_cell_px

    if normalisation not in NORMALISATIONS:
        raise ValueError(f"stain normalisation must be one of {', '.join(NORMALISATIONS)}, not {normalisation!r}")
    images = [image.convert("RGB") for image in images[:SAMPLE]]
    if not images:
        raise ValueError("measure_domain: no training images")
    seen = [centre_square(image, crop) for image in images] if crop < 1 else images
    sizes = [size.px for image in images if (size := estimate_red_cell_px(image)).px]
    return Domain(_median(sizes), _median([(image.width * image.height) ** 0.5 for image in images]),
                  normalisation=normalisation, **_colours(seen), **(_field_colours(images) if crop < 1 else {}))


def _colours(seen: list[Image.Image]) -> dict:
    """``COLOUR_KEYS`` of the images as the model sees them: CIELAB statistics and stain anchors."""
    from hemcap.looks import stain_anchors

    stats = [colour_statistics(image) for image in seen]
    stains = [stain_anchors(image) for image in seen]
    lab_mean, lab_spread = _mean_and_spread([s[0] for s in stats])
    anchors = {key: _median_of([stain[k] for stain in stains if stain[k] is not None])
               for k, key in enumerate(("background_rgb", "red_cell_od", "nucleus_od"))}
    return {"lab_mean": lab_mean, "lab_std": _median_of([s[1] for s in stats]), "lab_spread": lab_spread,
            "background": _median_of([s[2] for s in stats]),
            "red_cells": _median_of([s[3] for s in stats if s[3] is not None]), **anchors}


def _field_colours(images: list[Image.Image]) -> dict:
    """``FIELD_KEYS``: the whole fields' CIELAB means and their spread."""
    from hemcap.looks import lab_statistics

    mean, spread = _mean_and_spread([lab_statistics(image)[0] for image in images])
    return {"field_lab_mean": mean, "field_lab_spread": spread}


def _mean_and_spread(means: list[np.ndarray]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Median of the images' CIELAB means and their spread (>= 1 Lab unit: a uniform set has no spread)."""
    return _rounded(np.median(means, axis=0)), _rounded(np.maximum(np.std(means, axis=0), 1.0))


def _median_of(rows: Sequence[np.ndarray]) -> tuple[float, float, float] | None:
    return _rounded(np.median(rows, axis=0)) if rows else None


def _median(values: Sequence[float]) -> float | None:
    return round(float(statistics.median(values)), 2) if values else None


def _rounded(values: np.ndarray) -> tuple[float, float, float]:
    return tuple(round(float(v), 3) for v in values)


def colour_statistics(image: Image.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """CIELAB mean and spread of ``image``, and the median CIELAB of its background and of its red
    cells (None when fewer than ``MIN_RED_PIXELS`` of them show), on a copy at most 256 px across."""
    from skimage.color import rgb2lab

    from hemcap.looks import lab_moments, thumbnail_rgb

    rgb = thumbnail_rgb(image)
    lab = rgb2lab(rgb)
    background, red, _ = anchor_masks(rgb)
    reds = np.median(lab[red], axis=0) if red.sum() >= MIN_RED_PIXELS else None
    return *lab_moments(lab), np.median(lab[background], axis=0), reds


def anchor_masks(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background, red-cell and nucleus pixels: cells are stained pixels (``cell_masks``), white cells
    those holding a nucleus; the background is the rest, or the brightest quarter when cells fill the image."""
    from scipy import ndimage as ndi

    from hemcap.smear.magnification import cell_masks

    cells, nuclei = cell_masks(rgb)
    labels, _ = ndi.label(cells)
    white = np.isin(labels, np.unique(labels[nuclei & cells])) & cells | nuclei
    background = ~cells
    if background.mean() < 0.05:
        brightness = rgb.sum(axis=-1)
        background = brightness >= np.quantile(brightness, 0.75)
    return background, cells & ~white, nuclei


# ------------------------------------------------------------------------------ inference


def field_side(domain: Domain | None, red_cell_px: float | None) -> float | None:
    """Side in smear pixels of the field the model saw, at a smear whose red cells are ``red_cell_px``
    across; None when either magnification is unknown (crops are then framed by each cell's box)."""
    if domain is None or not domain.red_cell_px or not domain.field_px or not red_cell_px:
        return None
    return domain.field_px * red_cell_px / domain.red_cell_px


ANCHOR_SCALE = (0.5, 2.0)  # a channel's contrast is changed at most this much (a pale or missing red-cell anchor)


def normalise_stain(image: Image.Image, domain: Domain) -> Image.Image:
    """``image`` in the training images' colours, as ``domain.normalisation`` says.

    reinhard: each CIELAB channel's mean and spread moved to the training images' (Reinhard et
    al. 2001). anchors: each CIELAB channel mapped linearly so the image's background and red
    cells get the training images' colours (both are in every field, whatever the white cell:
    Reinhard's statistics move with the cell type); background alone shifts when no red cell shows.
    stain: red cells and nuclei both, by their optical densities (``_restained``).
    """
    from hemcap.looks import lab_statistics, transfer_colour

    if domain.normalisation == "stain":
        return _restained(image, domain)
    if domain.normalisation == "reinhard":  # whole-image statistics: no cell masks needed
        return transfer_colour(image, *lab_statistics(image), np.asarray(domain.lab_mean), np.asarray(domain.lab_std))
    _, _, background, red = colour_statistics(image)
    target_background = np.asarray(domain.background)
    if red is None or domain.red_cells is None:
        return transfer_colour(image, background, np.ones(3), target_background, np.ones(3))
    own, target = red - background, np.asarray(domain.red_cells) - target_background
    scale = np.clip(target / np.where(np.abs(own) < 1e-3, 1e-3, own), *ANCHOR_SCALE)
    return transfer_colour(image, background, 1 / scale, target_background, np.ones(3))


def _restained(image: Image.Image, domain: Domain) -> Image.Image:
    """stain: the image's optical densities re-mixed (``looks.remix_stain``) so that its red cells and
    its nuclei get the training images' densities (hue and strength, as Macenko et al.'s
    normalisation matches both stains' vectors and their 99th-percentile concentrations), lit by the
    training background. Without a nucleus, red cells alone; without red cells, the background alone."""
    from hemcap.looks import remix_stain, stain_anchors

    background, red, nucleus = stain_anchors(image)
    pairs = []
    if red is not None and domain.red_cell_od is not None:
        pairs.append((red, np.asarray(domain.red_cell_od)))
    if nucleus is not None and domain.nucleus_od is not None and pairs:
        pairs.append((nucleus, np.asarray(domain.nucleus_od)))
    if not pairs:
        pairs = [(np.ones(3), np.ones(3))]  # the identity mixing: only the lamp changes
    return remix_stain(image, background, [own for own, _ in pairs], domain.background_rgb,
                       [target for _, target in pairs])


@dataclass(frozen=True)
class StainNormaliser:
    """``normalise_stain`` for a domain, as a transform with a ``key`` (for caches of normalised pixels)."""

    domain: Domain

    def __call__(self, image: Image.Image) -> Image.Image:
        return normalise_stain(image, self.domain) if self.domain.normalises else image

    @property
    def key(self) -> str:
        d = self.domain
        return f"{d.normalisation}:{[getattr(d, k) for k in COLOUR_KEYS]}" if d.normalises else ""


def colour_distance(image: Image.Image, domain: Domain, field: Image.Image | None = None) -> float:
    """How far ``image`` (what the model sees) sits from the training images in CIELAB means, in training
    spreads (root mean square over L, a and b; 1 = a typical training image). Given the whole ``field``
    it was cut from, a model that sees only each field's centre is measured on the field instead."""
    from hemcap.looks import lab_statistics

    on_field = field is not None and domain.field_lab_mean is not None
    mean, spread = (domain.field_lab_mean, domain.field_lab_spread) if on_field else (domain.lab_mean, domain.lab_spread)
    z = (lab_statistics(field if on_field else image)[0] - np.asarray(mean)) / np.asarray(spread)
    return float(np.sqrt(np.mean(z**2)))


# ------------------------------------------------------------------------------ domain shift

# Limits chosen on dev data (eval/bench_domain_shift.py, BENCHMARKS.md "Domain-shift warning"): about 1 %
# of in-domain WBCAtt validation cells pass each (colour: 99th percentile 3.57; confidence: 1st
# percentile 0.72), while the median BCCD, BCD and Raabin-WBC smear of TXL-PBC train sits at 4.2-5.2.
COLOUR_LIMIT = 3.6  # training spreads
UPSCALE_LIMIT = 1.5  # a smear's cells enlarged more than this lose the detail the model learnt from
CONFIDENCE_LIMIT = 0.7  # mean caption confidence of the smear's cells


@dataclass
class DomainShift:
    """How far one smear (or cell image) sits from a captioner's training images."""

    colour: float | None  # median colour distance of its cell crops (training spreads)
    upscale: float | None  # training red-cell size / its own (> 1: its cells are enlarged to the model's)
    confidence: float | None  # mean caption confidence of its cells
    score: float  # the largest of the three over its limit: >= 1 warns
    warning: str | None  # ``WARNING`` when score >= 1, else None
    reasons: list[str]  # which measures passed their limits, in words

    def as_dict(self) -> dict:
        return asdict(self)


def domain_shift(colours: Sequence[float], upscale: float | None, confidences: Sequence[float],
                 unknown_magnification: bool = False) -> DomainShift:
    """The shift of a smear from its crops' colour distances, how much its fields are enlarged to the
    model's input, and its cells' caption confidences. A smear whose magnification is a guess warns."""
    colour = float(statistics.median(colours)) if colours else None
    confidence = float(statistics.fmean(confidences)) if confidences else None
    ratios = {"colour": (colour or 0) / COLOUR_LIMIT, "magnification": (upscale or 0) / UPSCALE_LIMIT,
              "confidence": (1 - confidence) / (1 - CONFIDENCE_LIMIT) if confidence is not None else 0.0}
    reasons = [_reason(name, colour, upscale, confidence) for name, ratio in ratios.items() if ratio >= 1]
    if unknown_magnification and colours:
        reasons.append("its magnification could not be measured (no red cells found)")
    score = round(max(ratios.values()), 3)
    return DomainShift(_round(colour), _round(upscale), _round(confidence), score, WARNING if reasons else None,
                       reasons)


def _reason(name: str, colour, upscale, confidence) -> str:
    if name == "colour":
        return f"its colours are {colour:.1f} training spreads away (limit {COLOUR_LIMIT:g})"
    if name == "magnification":
        return f"its cells are enlarged {upscale:.2f}x to the model's input (limit {UPSCALE_LIMIT:g}x)"
    return f"mean caption confidence {confidence:.2f} (limit {CONFIDENCE_LIMIT:g})"


def mean_confidence(confidences: dict) -> float | None:
    """A caption's mean attribute confidence (unstated attributes count 0); None without attributes."""
    values = [value or 0.0 for value in confidences.values()]
    return float(statistics.fmean(values)) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
