"""Procedural white-blood-cell images and blood smears with exact ground truth.

Everything here is drawn from numbers, not copied from any data set: a cell is a set of
soft shapes (outline, nucleus, granules, vacuoles) built from signed-distance fields, coloured
with a Beer-Lambert stain model (each stain layer adds optical density, so overlapping
red cells darken where they overlap, as on a real slide) and tuned by eye against PBC
CellaVision images (May-Grünwald Giemsa): a beige background, salmon red cells with pale
centres, violet nuclei, lilac-to-blue cytoplasm.

Every WBCAtt attribute has its own visible cue, and every random choice is drawn from a
stream of its own (geometry, nucleus, chromatin, ...), so two cells with the same seed that
differ in one attribute differ only where that attribute shows. Same seed, same pixels.

Public API: ATTRIBUTE_VALUES, CELL_TYPES, sample_attributes, draw_cell, make_cells,
draw_smear, write_smears.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt, gaussian_filter, zoom

from hemcap.fileio import staging_dir
from hemcap.schema import load_schema



def _wbcatt_values() -> dict[str, tuple[str, ...]]:
    """Field -> values, cell type first, read from data_recipes/wbcatt.yaml (the one vocabulary)."""
    schema = load_schema("wbcatt")
    return {name: schema.values(name) for name in (schema.cell_type_field, *schema.attribute_names)}


ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = _wbcatt_values()
CELL_TYPES: tuple[str, ...] = ATTRIBUTE_VALUES["cell_type"]

# ---------------------------------------------------------------------------------------
# Attribute sampling
# ---------------------------------------------------------------------------------------

# Per-type priors, shaped like WBCAtt's train split but flattened: every attribute keeps at
# least ~10% of its minority values inside most types, so a model has to read the picture
# rather than guess the attributes from the cell type. Granule attributes stay tied to the
# type (as in WBCAtt) because they are what makes the five types tell-apart.
_GRANULOCYTE_DEFAULTS = {
    "cell_shape": {"round": 0.8, "irregular": 0.2},
    "nuclear_cytoplasmic_ratio": {"low": 0.9, "high": 0.1},
    "chromatin_density": {"densely": 0.85, "loosely": 0.15},
    "cytoplasm_vacuole": {"no": 0.9, "yes": 0.1},
    "cytoplasm_texture": {"clear": 0.85, "frosted": 0.15},
    "cytoplasm_colour": {"light blue": 0.8, "blue": 0.1, "purple blue": 0.1},
}
_TYPE_PRIORS: dict[str, dict[str, dict]] = {
    "Neutrophil": {
        **_GRANULOCYTE_DEFAULTS,
        "cell_size": {"big": 0.6, "small": 0.4},
        "cell_shape": {"round": 0.75, "irregular": 0.25},
        "cytoplasm_vacuole": {"no": 0.85, "yes": 0.15},
        "nucleus_shape": {"unsegmented-band": 0.5, "segmented-bilobed": 0.2,
                          "segmented-multilobed": 0.25, "irregular": 0.05},
        "granules": {("small", "pink", "yes"): 0.9, ("small", "purple", "yes"): 0.1},
    },
    "Eosinophil": {
        **_GRANULOCYTE_DEFAULTS,
        "cell_size": {"big": 0.65, "small": 0.35},
        "nucleus_shape": {"segmented-bilobed": 0.65, "segmented-multilobed": 0.15,
                          "unsegmented-band": 0.15, "irregular": 0.05},
        "granules": {("round", "red", "yes"): 0.95, ("round", "pink", "yes"): 0.05},
    },
    "Basophil": {
        **_GRANULOCYTE_DEFAULTS,
        "cell_size": {"big": 0.3, "small": 0.7},
        "nuclear_cytoplasmic_ratio": {"low": 0.85, "high": 0.15},
        "chromatin_density": {"densely": 0.9, "loosely": 0.1},
        "nucleus_shape": {"irregular": 0.4, "segmented-bilobed": 0.25,
                          "segmented-multilobed": 0.15, "unsegmented-band": 0.1,
                          "unsegmented-indented": 0.05, "unsegmented-round": 0.05},
        "granules": {("coarse", "purple", "yes"): 1.0},
    },
    "Lymphocyte": {
        "cell_size": {"small": 0.9, "big": 0.1},
        "cell_shape": {"round": 0.7, "irregular": 0.3},
        "nucleus_shape": {"unsegmented-round": 0.7, "unsegmented-indented": 0.2, "irregular": 0.1},
        "nuclear_cytoplasmic_ratio": {"high": 0.85, "low": 0.15},
        "chromatin_density": {"densely": 0.85, "loosely": 0.15},
        "cytoplasm_vacuole": {"no": 0.9, "yes": 0.1},
        "cytoplasm_texture": {"frosted": 0.5, "clear": 0.5},
        "cytoplasm_colour": {"blue": 0.6, "purple blue": 0.3, "light blue": 0.1},
        # ~10% large granular lymphocytes: a few fine azurophilic (purple) granules.
        "granules": {("nil", "nil", "no"): 0.9, ("small", "purple", "yes"): 0.1},
    },
    "Monocyte": {
        "cell_size": {"big": 0.85, "small": 0.15},
        "cell_shape": {"irregular": 0.55, "round": 0.45},
        "nucleus_shape": {"unsegmented-indented": 0.6, "irregular": 0.2,
                          "unsegmented-round": 0.1, "unsegmented-band": 0.1},
        "nuclear_cytoplasmic_ratio": {"low": 0.9, "high": 0.1},
        "chromatin_density": {"loosely": 0.6, "densely": 0.4},
        "cytoplasm_vacuole": {"no": 0.55, "yes": 0.45},
        "cytoplasm_texture": {"frosted": 0.85, "clear": 0.15},
        "cytoplasm_colour": {"blue": 0.45, "purple blue": 0.45, "light blue": 0.1},
        "granules": {("nil", "nil", "no"): 0.92, ("small", "purple", "yes"): 0.08},
    },
}


def _choose(rng: np.random.Generator, weights: dict):
    """One key of `weights`, drawn with probability proportional to its value."""
    keys = list(weights)
    cumulative = np.cumsum([weights[k] for k in keys])
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return keys[min(index, len(keys) - 1)]


def sample_attributes(rng: np.random.Generator, cell_type: str | None = None) -> dict[str, str]:
    """A plausible WBCAtt attribute set (all 12 keys, cell_type included) for one cell."""
    if cell_type is None:
        cell_type = CELL_TYPES[rng.integers(len(CELL_TYPES))]
    if cell_type not in _TYPE_PRIORS:
        raise ValueError(f"unknown cell_type {cell_type!r}; expected one of {CELL_TYPES}")
    priors = _TYPE_PRIORS[cell_type]
    attributes = {"cell_type": cell_type}
    for name in ATTRIBUTE_VALUES:
        if name in priors:
            attributes[name] = _choose(rng, priors[name])
    granules = _choose(rng, priors["granules"])
    attributes.update(zip(("granule_type", "granule_colour", "granularity"), granules))
    return {name: attributes[name] for name in ATTRIBUTE_VALUES}


def _check_attributes(attributes: dict[str, str]) -> None:
    for name, values in ATTRIBUTE_VALUES.items():
        if name == "cell_type" and name not in attributes:
            continue  # the drawing never needs the type itself
        if attributes.get(name) not in values:
            raise ValueError(f"{name}={attributes.get(name)!r} is not one of {values}")


# ---------------------------------------------------------------------------------------
# Stain model: colours are "what a layer of density 1 looks like over the background".
# ---------------------------------------------------------------------------------------

_BACKGROUND_RGB = np.array([250.0, 228.0, 204.0])  # PBC background: brightest 10% of 200 images


def _od(rgb) -> np.ndarray:
    """Optical density that turns the background into `rgb` (negative = adds that light).

    Images are composed channel-first, (3, h, w): numpy's inner loops then run along
    rows instead of over 3 channels, which makes compositing ~5x faster.
    """
    od = -np.log(np.asarray(rgb, dtype=float) / _BACKGROUND_RGB)
    return od.astype(np.float32).reshape(3, 1, 1)  # channel-first: broadcasts over (h, w)


_BACKGROUND_OD = (-np.log(_BACKGROUND_RGB / 255.0)).astype(np.float32).reshape(3, 1, 1)
_RBC_OD = _od([210, 158, 160])  # rim colour; the pale centre has density ~0.3
_PLATELET_OD = _od([150, 95, 170])
_CYTOPLASM_OD = {  # pale blue (hue ~225), mid blue (hue ~222), violet blue (hue ~265)
    "light blue": _od([218, 222, 240]),
    "blue": _od([152, 170, 224]),
    "purple blue": _od([160, 130, 205]),
}
_FROST_OD = np.array([0.26, 0.28, 0.19], np.float32).reshape(3, 1, 1)  # grey-violet specks
# Loose chromatin is paler than dense but stays a clear step darker than the darkest
# (purple-blue) cytoplasm: at [140, 98, 182] a loose nucleus all but vanished in it at 96 px.
_NUCLEUS_OD = {"densely": _od([78, 30, 128]), "loosely": _od([118, 70, 166])}
_GRANULE_OD = {
    "pink": _od([222, 118, 168]),
    "red": _od([214, 86, 58]),  # eosinophil orange-red
    "purple": _od([50, 14, 88]),  # a shade darker and bluer than the nucleus
    "nil": _od([200, 130, 170]),  # only for odd combos (granules drawn, colour nil)
}


@dataclass
class _Layers:
    """Stain densities of one or more WBCs on a canvas, before compositing."""

    od: np.ndarray  # (3, h, w) optical density of cytoplasm + nucleus + granules
    cell: np.ndarray  # (h, w) 0..1 cell coverage (used to put red cells underneath)
    clear: np.ndarray  # (h, w) 0..1 vacuole holes (optical density removed there)


# ---------------------------------------------------------------------------------------
# Small numeric helpers
# ---------------------------------------------------------------------------------------

_STREAMS = ("geometry", "nucleus", "chromatin", "cytoplasm", "granules", "vacuoles",
            "rbc", "stain", "noise")


def _streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent generators per drawing step, so one attribute cannot shift another."""
    children = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, children)}


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _soft(sdf_px: np.ndarray, edge: float = 1.2) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (negative = inside)."""
    return np.clip(0.5 - sdf_px / edge, 0.0, 1.0)


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth Gaussian noise with unit standard deviation and feature size ~sigma px.

    Wide features are made on a coarse grid and upsampled: a sigma-11 blur at full
    resolution would cost more than the whole rest of a cell.
    """
    step = max(1, int(sigma / 2.0))
    coarse_shape = (shape[0] // step + 2, shape[1] // step + 2)
    field = gaussian_filter(rng.standard_normal(coarse_shape, dtype=np.float32),
                            sigma / step, mode="wrap")
    if step > 1:
        field = zoom(field, step, order=1)[: shape[0], : shape[1]]
    else:
        field = field[: shape[0], : shape[1]]
    return field / (field.std() + 1e-6)


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _capsule_sdf(x, y, a, b, radius: float) -> np.ndarray:
    """Distance to the segment a-b minus radius: a sausage, used for strands and lobes."""
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((x - ax) * dx + (y - ay) * dy) / (dx * dx + dy * dy + 1e-9), 0.0, 1.0)
    return np.hypot(x - ax - t * dx, y - ay - t * dy) - radius


def _ellipse_sdf(x, y, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse (exact for circles)."""
    return (np.hypot((x - cx) / rx, (y - cy) / ry) - 1.0) * min(rx, ry)


def _dot_field(shape, ys, xs, weights, sigma: float) -> np.ndarray:
    """Sum of Gaussian dots (peak = weight) at the given points: granules in one blur."""
    impulses = np.zeros(shape, dtype=np.float32)
    iy = np.clip(np.round(ys).astype(int), 0, shape[0] - 1)
    ix = np.clip(np.round(xs).astype(int), 0, shape[1] - 1)
    np.add.at(impulses, (iy, ix), weights)
    return gaussian_filter(impulses, sigma, mode="constant") * (2.0 * math.pi * sigma * sigma)


def _sample_pixels(rng, allowed: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n random (y, x) positions, with sub-pixel jitter, among the True pixels of allowed."""
    flat = np.flatnonzero(allowed)
    if flat.size == 0 or n <= 0:
        return np.zeros(0), np.zeros(0)
    picks = flat[rng.integers(flat.size, size=n)]
    ys, xs = np.divmod(picks, allowed.shape[1])
    return ys + rng.uniform(-0.5, 0.5, n), xs + rng.uniform(-0.5, 0.5, n)


# ---------------------------------------------------------------------------------------
# Cell geometry
# ---------------------------------------------------------------------------------------

# Cell diameter as a fraction of the "unit" (the crop width for draw_cell): the two ranges
# leave a gap so big and small never meet, even after the outline wobble.
_DIAMETER_FRAC = {"big": (0.70, 0.78), "small": (0.46, 0.52)}
_RBC_DIAMETER_FRAC = (0.38, 0.44)  # a red cell is ~0.85x a small lymphocyte, as in PBC
# Nucleus extent in cell radii: high N:C fills most of the cell, low leaves a wide rim.
_NUCLEUS_SCALE = {"high": (0.84, 0.90), "low": (0.60, 0.66)}


def _cell_diameter(cell_size: str, unit: float, rng: np.random.Generator) -> float:
    low, high = _DIAMETER_FRAC[cell_size]
    return unit * (low + (high - low) * rng.uniform())


def _harmonics(phi: np.ndarray, amplitudes, phases, first_k: int = 2) -> np.ndarray:
    """sum_k a_k cos(k phi + p_k), looked up in a 1024-entry table (10x faster per pixel)."""
    table_phi = np.linspace(-math.pi, math.pi, 1025, dtype=np.float32)
    ks = np.arange(first_k, first_k + len(amplitudes))[:, None]
    phases = np.asarray(phases)[:, None]
    table = np.asarray(amplitudes)[:, None] * np.cos(ks * table_phi + phases)
    index = np.rint((phi + math.pi) * (1024 / (2 * math.pi))).astype(np.intp)
    return table.sum(axis=0).astype(np.float32)[index]


def _outline_radius(phi: np.ndarray, cell_shape: str, rng) -> np.ndarray:
    """Cell radius (in mean radii) per angle: near-circle, or a lobulated blob."""
    ks = np.arange(2, 8)
    phases = rng.uniform(0, 2 * math.pi, ks.size)
    weights = rng.uniform(0.3, 1.0, ks.size) * np.array([0.5, 1.0, 1.0, 0.9, 0.6, 0.4])
    wobble = _harmonics(phi, weights, phases)
    wobble /= np.abs(wobble).max()
    if cell_shape == "round":
        return 1.0 + 0.025 * wobble  # a trace of oval
    return 0.97 + 0.22 * wobble  # 3-7 lobes and dents of up to 22% of the radius


def _nucleus_round(x, y, rng):
    return _ellipse_sdf(x, y, 0.0, 0.0, 0.95, rng.uniform(0.78, 0.92))


def _nucleus_indented(x, y, rng):
    """Kidney: a wide oval with a round bite out of one long side."""
    half_height = rng.uniform(0.68, 0.76)
    body = _ellipse_sdf(x, y, 0.0, 0.0, 1.0, half_height)
    bite_r = rng.uniform(0.38, 0.46)
    bite = np.hypot(x - rng.uniform(-0.1, 0.1), y - (half_height + bite_r * 0.2)) - bite_r
    return np.maximum(body, -bite)


def _nucleus_band(x, y, rng):
    """Thick C/U sausage: distance to a circular arc, minus the half-thickness."""
    arc_r, half_span = rng.uniform(0.56, 0.64), math.radians(rng.uniform(110, 140))
    x = x - 0.2  # shift so the C, not its centre of curvature, sits in the middle
    phi, rho = np.arctan2(y, x), np.hypot(x, y)
    along = np.abs(rho - arc_r)
    end_x, end_y = arc_r * math.cos(half_span), arc_r * math.sin(half_span)
    to_end = np.hypot(x - end_x, np.abs(y) - end_y)
    thickness = rng.uniform(0.26, 0.32) * (1.0 + 0.1 * np.cos(2 * phi))
    return np.where(np.abs(phi) <= half_span, along, to_end) - thickness


def _lobes_sdf(x, y, centres, radii, strand: float) -> np.ndarray:
    """Round lobes joined one to the next by thin strands of chromatin."""
    sdf = np.full(x.shape, np.inf, dtype=np.float32)
    for (cx, cy), r in zip(centres, radii):
        sdf = np.minimum(sdf, _ellipse_sdf(x, y, cx, cy, r * 1.1, r * 0.92))
    for a, b in zip(centres[:-1], centres[1:]):
        sdf = np.minimum(sdf, _capsule_sdf(x, y, a, b, strand))
    return sdf


def _nucleus_bilobed(x, y, rng):
    tilt = rng.uniform(-0.2, 0.2)
    centres = [(-0.55, -tilt), (0.55, tilt)]
    return _lobes_sdf(x, y, centres, rng.uniform(0.38, 0.44, 2), strand=0.06)


def _nucleus_multilobed(x, y, rng):
    """3-5 lobes strung along a curve, like a mature neutrophil."""
    n_lobes = int(rng.integers(3, 6))
    half_span = math.radians(55 + 25 * n_lobes)  # more lobes, longer curve, gaps stay open
    angles = np.linspace(-half_span, half_span, n_lobes) + rng.normal(0, 0.08, n_lobes)
    centres = [(0.62 * math.cos(a) - 0.15, 0.62 * math.sin(a)) for a in angles]
    radii = rng.uniform(0.27, 0.33, n_lobes) * (1.0 if n_lobes < 5 else 0.88)
    return _lobes_sdf(x, y, centres, radii, strand=0.05)


def _nucleus_irregular(x, y, rng):
    """Amorphous blotch: a bumpy core with 2-3 lumps bulging out of it at random."""
    phi, rho = np.arctan2(y, x), np.hypot(x, y)
    amps = rng.uniform(0.06, 0.13, 6)  # harmonics 2..7
    radius = 0.68 * (1.0 + _harmonics(phi, amps, rng.uniform(0, 2 * math.pi, 6)))
    sdf = rho - radius
    for angle in rng.uniform(0, 2 * math.pi, int(rng.integers(2, 4))):
        lump_x, lump_y = 0.58 * math.cos(angle), 0.58 * math.sin(angle)
        sdf = np.minimum(sdf, np.hypot(x - lump_x, y - lump_y) - rng.uniform(0.26, 0.36))
    return sdf


_NUCLEUS_SHAPES = {
    "unsegmented-round": _nucleus_round,
    "unsegmented-indented": _nucleus_indented,
    "unsegmented-band": _nucleus_band,
    "segmented-bilobed": _nucleus_bilobed,
    "segmented-multilobed": _nucleus_multilobed,
    "irregular": _nucleus_irregular,
}


@dataclass
class _Geometry:
    """Where the cell is on its canvas, in pixels and in cell radii."""

    rows: np.ndarray  # canvas pixel coordinates
    cols: np.ndarray
    x: np.ndarray  # the same relative to the centre, in mean cell radii
    y: np.ndarray
    radius_px: float
    cell_sdf_px: np.ndarray  # signed distance to the outline (negative inside)
    cell: np.ndarray  # soft coverage 0..1


def _geometry(shape, centre, diameter: float, cell_shape: str, rng) -> _Geometry:
    radius = diameter / 2.0
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    x, y = (cols - centre[1]) / radius, (rows - centre[0]) / radius
    rho, phi = np.hypot(x, y), np.arctan2(y, x)
    cell_sdf_px = (rho - _outline_radius(phi, cell_shape, rng)) * radius
    return _Geometry(rows, cols, x, y, radius, cell_sdf_px, _soft(cell_sdf_px))


def _nucleus_mask(geo: _Geometry, attributes: dict[str, str], rng) -> np.ndarray:
    """Soft nucleus coverage, rotated and offset at random, clipped to the cell."""
    low, high = _NUCLEUS_SCALE[attributes["nuclear_cytoplasmic_ratio"]]
    scale = low + (high - low) * rng.uniform()
    slack = max(0.0, 0.9 - scale - 0.05)  # room to sit off-centre, as real nuclei do
    offset_angle, offset = rng.uniform(0, 2 * math.pi), slack * rng.uniform(0.3, 1.0)
    x = geo.x - offset * math.cos(offset_angle)
    y = geo.y - offset * math.sin(offset_angle)
    x, y = _rotate(x, y, rng.uniform(0, 2 * math.pi))
    shape_fn = _NUCLEUS_SHAPES[attributes["nucleus_shape"]]
    sdf_px = shape_fn(x / scale, y / scale, rng) * scale * geo.radius_px
    return _soft(sdf_px) * geo.cell


# ---------------------------------------------------------------------------------------
# Texture, granules, vacuoles
# ---------------------------------------------------------------------------------------


def _chromatin(nucleus: np.ndarray, density: str, radius_px: float, rng) -> np.ndarray:
    """Nucleus stain density: dense = dark clumps with pale gaps; loose = even, fine."""
    if density == "densely":
        clumps = _noise(rng, nucleus.shape, max(1.0, 0.07 * radius_px))
        fine = _noise(rng, nucleus.shape, 0.7)
        return nucleus * (0.65 + 0.7 * _smoothstep(-0.6, 0.8, clumps) + 0.08 * fine)
    fine = _noise(rng, nucleus.shape, max(0.7, 0.03 * radius_px))
    return nucleus * (1.0 + 0.1 * fine)


def _cytoplasm(geo: _Geometry, nucleus: np.ndarray, texture: str, rng):
    """Cytoplasm stain density, and the grey-violet specks of a frosted (ground-glass) one.

    The specks have their own colour so that frosting reads the same on every
    cytoplasm colour (modulating a pale colour alone would only make it blotchy).
    """
    area = geo.cell * (1.0 - nucleus)
    membrane = 0.35 * np.clip(1.0 + geo.cell_sdf_px / 2.0, 0.0, 1.0)  # slightly darker rim
    if texture == "clear":
        body = 1.0 + 0.05 * _noise(rng, geo.cell.shape, 0.25 * geo.radius_px)
        return area * (body + membrane), np.zeros_like(area)
    # specks ~1-1.3 px at 96 px: finer ones were lost in the blur and sensor noise there
    grain = _noise(rng, geo.cell.shape, max(0.9, 0.035 * geo.radius_px))
    specks = np.clip(grain - 0.3, 0.0, None)  # ~40% of pixels carry a speck
    return area * (1.05 + 0.15 * grain + membrane), area * specks


# Granule kinds: size (dust sigma or bead radius, in cell radii), fraction of the cytoplasm
# they cover, beads per granule (>1 makes lumpy blobs), share lying over the nucleus, strength.
_GRANULE_SPECS = {
    "small": dict(size=0.022, coverage=0.45, lumps=1, on_nucleus=0.1, strength=0.85),
    "round": dict(size=0.055, coverage=1.1, lumps=1, on_nucleus=0.05, strength=1.0),
    # basophil granules are the nucleus's colour: few over it, or its shape is unreadable
    "coarse": dict(size=0.085, coverage=0.45, lumps=3, on_nucleus=0.03, strength=1.15),
}


def _bead_field(shape, ys, xs, radii) -> np.ndarray:
    """Solid discs (radius per disc) that never blur into each other, via one distance map."""
    centres = np.zeros(shape, dtype=bool)
    radius_at = np.zeros(shape, dtype=np.float32)
    iy = np.clip(np.rint(ys).astype(int), 0, shape[0] - 1)
    ix = np.clip(np.rint(xs).astype(int), 0, shape[1] - 1)
    centres[iy, ix], radius_at[iy, ix] = True, radii
    if iy.size == 0:
        return np.zeros(shape, dtype=np.float32)
    dist, (ny, nx) = distance_transform_edt(~centres, return_indices=True)
    radius = radius_at[ny, nx]
    shading = 0.8 + 0.2 * np.clip(1.0 - dist / radius, 0.0, 1.0)  # a touch darker mid-bead
    return (_soft(dist - radius, edge=1.0) * shading).astype(np.float32)


def _granule_positions(geo: _Geometry, nucleus, spec: dict, dot_area: float, rng):
    """Granule centres: mostly over the cytoplasm, a share over the nucleus.

    Cytoplasmic granules keep a granule's width off the nucleus: the pale seam this leaves
    keeps the nucleus outline readable at 64 px even under packed eosinophil granules.
    """
    margin = max(1.0, 0.5 * math.sqrt(dot_area))
    inside = geo.cell_sdf_px < -margin
    off_nucleus = distance_transform_edt(nucleus < 0.5) > margin + 1.0
    cytoplasm, karyon = inside & off_nucleus, inside & (nucleus >= 0.5)
    count = int(spec["coverage"] * cytoplasm.sum() / (dot_area * spec["lumps"] ** 0.5))
    on_nucleus = int(count * spec["on_nucleus"] / (1.0 - spec["on_nucleus"]))
    parts = zip(_sample_pixels(rng, cytoplasm, count), _sample_pixels(rng, karyon, on_nucleus))
    return (np.concatenate(p) for p in parts)


def _granules(geo: _Geometry, nucleus: np.ndarray, granule_type: str, rng) -> np.ndarray:
    """Granule stain density: fine dust / packed round beads / coarse lumpy dark blobs."""
    if granule_type == "nil":
        return np.zeros_like(geo.cell)
    spec = _GRANULE_SPECS[granule_type]
    size = max(0.7, spec["size"] * geo.radius_px)
    if granule_type == "small":  # soft Gaussian dust whose overlaps saturate
        ys, xs = _granule_positions(geo, nucleus, spec, 2.0 * math.pi * size**2, rng)
        weights = rng.uniform(0.7, 1.3, ys.size).astype(np.float32)
        field = _dot_field(nucleus.shape, ys, xs, weights, size)
        return spec["strength"] * (1.0 - np.exp(-1.6 * field)) * geo.cell
    ys, xs = _granule_positions(geo, nucleus, spec, math.pi * size**2, rng)
    lumps = spec["lumps"]
    jitter = 0.6 * size * (lumps > 1)
    ys = np.repeat(ys, lumps) + rng.normal(0, 1, ys.size * lumps) * jitter
    xs = np.repeat(xs, lumps) + rng.normal(0, 1, xs.size * lumps) * jitter
    radii = size * rng.uniform(0.8, 1.2, ys.size)
    return spec["strength"] * _bead_field(nucleus.shape, ys, xs, radii) * geo.cell


def _vacuoles(geo: _Geometry, nucleus: np.ndarray, rng) -> np.ndarray:
    """3-7 clear round holes, in the cytoplasm when there is room for them."""
    count = int(rng.integers(3, 8))
    radii = geo.radius_px * rng.uniform(0.08, 0.13, count)
    inside = geo.cell_sdf_px < -radii.max() - 1.0
    cytoplasm = inside & (nucleus < 0.2)
    ys, xs = _sample_pixels(rng, cytoplasm if cytoplasm.sum() > 20 else inside, count)
    holes = np.zeros_like(geo.cell)
    for vy, vx, r in zip(ys, xs, radii):
        window = (slice(max(0, int(vy - r - 2)), int(vy + r + 3)),
                  slice(max(0, int(vx - r - 2)), int(vx + r + 3)))
        dist = np.hypot(geo.rows[window] - vy, geo.cols[window] - vx)
        holes[window] = np.maximum(holes[window], _soft(dist - r, edge=1.0))
    return holes * geo.cell


def _render_wbc(attributes: dict[str, str], diameter: float, shape, centre, streams) -> _Layers:
    """All stain layers of one WBC centred at `centre` on a canvas of `shape`."""
    geo = _geometry(shape, centre, diameter, attributes["cell_shape"], streams["geometry"])
    nucleus = _nucleus_mask(geo, attributes, streams["nucleus"])
    chromatin = _chromatin(nucleus, attributes["chromatin_density"], geo.radius_px,
                           streams["chromatin"])
    cytoplasm, specks = _cytoplasm(geo, nucleus, attributes["cytoplasm_texture"],
                                   streams["cytoplasm"])
    granules = _granules(geo, nucleus, attributes["granule_type"], streams["granules"])
    holes = np.zeros_like(geo.cell)
    if attributes["cytoplasm_vacuole"] == "yes":
        holes = _vacuoles(geo, nucleus, streams["vacuoles"])
    od = (cytoplasm * _CYTOPLASM_OD[attributes["cytoplasm_colour"]]
          + specks * _FROST_OD
          + chromatin * _NUCLEUS_OD[attributes["chromatin_density"]]
          + granules * _GRANULE_OD[attributes["granule_colour"]])
    return _Layers(od, geo.cell, holes)


# ---------------------------------------------------------------------------------------
# Red cells, platelets, compositing
# ---------------------------------------------------------------------------------------


def _place_rbcs(rng, shape, wbcs, mean_radius: float, tries: int) -> list[tuple]:
    """Red-cell discs by dart throwing: they may touch each other and the WBC edges.

    `wbcs` is a list of (cy, cx, radius). Returns (cy, cx, radius, aspect, angle) tuples.
    """
    placed: list[tuple] = []
    for _ in range(tries):
        r = mean_radius * rng.uniform(0.92, 1.08)
        cy = rng.uniform(-0.5 * r, shape[0] + 0.5 * r)
        cx = rng.uniform(-0.5 * r, shape[1] + 0.5 * r)
        # up to ~40% of a red cell may slide under a WBC edge, as on a crowded smear
        if any(math.hypot(cy - wy, cx - wx) < 1.02 * wr + 0.6 * r for wy, wx, wr in wbcs):
            continue
        if any(math.hypot(cy - py, cx - px) < 0.8 * (r + pr) for py, px, pr, *_ in placed):
            continue
        placed.append((cy, cx, r, rng.uniform(0.88, 1.0), rng.uniform(0, math.pi)))
    return placed


def _rbc_density(shape, rbcs) -> np.ndarray:
    """Red-cell stain density: dark rim, pale centre; overlaps add up."""
    density = np.zeros(shape, dtype=np.float32)
    for cy, cx, r, aspect, angle in rbcs:
        y0, y1 = max(0, int(cy - r - 2)), min(shape[0], int(cy + r + 3))
        x0, x1 = max(0, int(cx - r - 2)), min(shape[1], int(cx + r + 3))
        if y0 >= y1 or x0 >= x1:
            continue
        rows, cols = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        u, v = _rotate(cols - cx, rows - cy, angle)
        rho = np.hypot(u, v / aspect) / r
        disc = _soft((rho - 1.0) * r) * (0.3 + 0.7 * _smoothstep(0.25, 0.92, rho))
        density[y0:y1, x0:x1] += disc
    return density


def _platelets(rng, shape, count: int, radius: float) -> np.ndarray:
    """Density of a few small lumpy platelets (smears only, not annotated, like BCCD's)."""
    ys = np.repeat(rng.uniform(0, shape[0], count), 3) + rng.normal(0, radius * 0.5, 3 * count)
    xs = np.repeat(rng.uniform(0, shape[1], count), 3) + rng.normal(0, radius * 0.5, 3 * count)
    field = _dot_field(shape, ys, xs, np.ones(ys.size, dtype=np.float32), radius * 0.6)
    return _smoothstep(0.3, 0.8, field)


def _composite(rbc: np.ndarray, wbc: _Layers, rng, noise_rng, blur: float) -> Image.Image:
    """Beer-Lambert: background + red cells (under the WBC) + WBC stains, blur, noise."""
    h, w = rbc.shape
    stain = np.float32(rng.uniform(0.9, 1.1))  # overall stain intensity of this slide
    background = _BACKGROUND_OD * rng.uniform(0.85, 1.15, (3, 1, 1)).astype(np.float32)  # tint
    gx, gy = rng.uniform(-0.08, 0.08, 2).astype(np.float32)  # uneven illumination
    ramp = (1.0 + gx * np.linspace(-1, 1, w, dtype=np.float32)[None, :]
            + gy * np.linspace(-1, 1, h, dtype=np.float32)[:, None])
    under_wbc = rbc * (1.0 - 0.85 * wbc.cell)  # the WBC lies on top of red cells
    od = ramp * background + stain * (under_wbc * _RBC_OD + wbc.od)
    od *= 1.0 - 0.9 * wbc.clear  # vacuoles let almost all light through
    od = gaussian_filter(od, (0, blur, blur))
    rgb = 255.0 * np.exp(-od) + 2.0 * noise_rng.standard_normal(od.shape, dtype=np.float32)
    pixels = np.clip(rgb, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


# ---------------------------------------------------------------------------------------
# Public: single cells
# ---------------------------------------------------------------------------------------


def draw_cell(attributes: dict[str, str], size: int = 128, seed: int = 0) -> Image.Image:
    """One WBC centred in a size x size RGB crop, with a few red cells around it."""
    _check_attributes(attributes)
    streams = _streams(seed)
    geometry_rng = streams["geometry"]
    diameter = _cell_diameter(attributes["cell_size"], size, geometry_rng)
    centre = tuple(size / 2.0 + geometry_rng.uniform(-0.03, 0.03, 2) * size)
    wbc = _render_wbc(attributes, diameter, (size, size), centre, streams)
    rbc_radius = size * streams["rbc"].uniform(*_RBC_DIAMETER_FRAC) / 2.0
    rbcs = _place_rbcs(streams["rbc"], (size, size), [(*centre, diameter / 2.0)], rbc_radius, 40)
    blur = 0.45 * size / 128.0
    return _composite(_rbc_density((size, size), rbcs), wbc, streams["stain"],
                      streams["noise"], blur)


CELLS_PER_WORKER = 250  # a 96 px cell takes ~11 ms on a 2-core EPYC, starting a process ~1 s


def make_cells(n: int, seed: int = 0, size: int = 128, workers: int = 1) -> list[tuple[Image.Image, dict[str, str]]]:
    """n (image, attributes) pairs, cell types in turn (balanced to within one).

    Cell i depends only on (seed, i), so make_cells(10)[:5] == make_cells(5), whatever the number of
    ``workers``: processes that draw them in parts of at least ``CELLS_PER_WORKER``. They are spawned,
    so they import the caller's main module.
    """
    if workers <= 1 or n < CELLS_PER_WORKER * workers:
        return _draw_cells(n, seed, size, 0, n)
    bounds = np.linspace(0, n, workers + 1).astype(int).tolist()
    spawn = multiprocessing.get_context("spawn")  # not fork: the caller may hold torch's OpenMP threads
    with ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        parts = pool.map(_draw_cells, [n] * workers, [seed] * workers, [size] * workers, bounds[:-1], bounds[1:])
        return [cell for part in parts for cell in part]


def _draw_cells(n: int, seed: int, size: int, start: int, stop: int) -> list[tuple[Image.Image, dict[str, str]]]:
    """Cells start..stop-1 of make_cells(n, seed, size)."""
    cells = []
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)[start:stop], start):
        rng = np.random.default_rng(child)
        attributes = sample_attributes(rng, CELL_TYPES[i % len(CELL_TYPES)])
        cells.append((draw_cell(attributes, size, int(rng.integers(2**31))), attributes))
    return cells


# ---------------------------------------------------------------------------------------
# Public: smears
# ---------------------------------------------------------------------------------------

_SMEAR_UNIT = 0.29  # one "crop width" = 0.29 x the short side: a 640x480 WBC is 65-110 px
_BOX_GAP = 6  # px kept free between WBC boxes, and between a box and the border


def _place_wbcs(rng, size_wh, diameters) -> list[tuple[float, float]]:
    """Centres (cy, cx) whose bounding squares stay apart and inside the image."""
    width, height = size_wh
    centres: list[tuple[float, float, float]] = []
    for d in diameters:
        half = 0.6 * d  # the outline reaches at most 1.19 mean radii (< 0.6 d)
        for _ in range(500):
            cy = rng.uniform(half + _BOX_GAP, height - half - _BOX_GAP)
            cx = rng.uniform(half + _BOX_GAP, width - half - _BOX_GAP)
            if all(abs(cy - y) > half + h + _BOX_GAP or abs(cx - x) > half + h + _BOX_GAP
                   for y, x, h in centres):
                centres.append((cy, cx, half))
                break
        else:
            raise ValueError(f"cannot fit {len(diameters)} WBCs into a {width}x{height} smear")
    return [(cy, cx) for cy, cx, _ in centres]


def _paste_wbc(canvas: _Layers, attributes, diameter, centre, seed) -> tuple[int, ...]:
    """Render one WBC on a local tile, add it into the smear canvas, return its box."""
    half = int(math.ceil(0.6 * diameter)) + 3
    top, left = int(round(centre[0])) - half, int(round(centre[1])) - half
    local_centre = (centre[0] - top, centre[1] - left)
    tile = _render_wbc(attributes, diameter, (2 * half + 1, 2 * half + 1), local_centre,
                       _streams(seed))
    window = (slice(top, top + 2 * half + 1), slice(left, left + 2 * half + 1))
    canvas.od[(slice(None), *window)] += tile.od
    canvas.cell[window] = np.maximum(canvas.cell[window], tile.cell)
    canvas.clear[window] = np.maximum(canvas.clear[window], tile.clear)
    rows, cols = np.nonzero(tile.cell > 0.5)
    return (left + int(cols.min()), top + int(rows.min()),
            left + int(cols.max()) + 1, top + int(rows.max()) + 1)


def draw_smear(seed: int, n_wbc: int | None = None,
               size: tuple[int, int] = (640, 480)) -> tuple[Image.Image, list[dict]]:
    """A blood-smear field (width, height) = size with n_wbc WBCs among many red cells.

    Returns the image and one {"box": (xmin, ymin, xmax, ymax), "attributes": {...}} per
    WBC. Boxes are tight around the whole cell (cytoplasm included), in pixel edges
    (xmax - xmin = width), entirely inside the image, and never overlap each other.
    """
    image, cells, _ = draw_smear_with_red_cells(seed, n_wbc, size)
    return image, cells


def draw_smear_with_red_cells(seed: int, n_wbc: int | None = None, size: tuple[int, int] = (640, 480)
                              ) -> tuple[Image.Image, list[dict], list[tuple[int, int, int, int]]]:
    """``draw_smear``'s image and white cells, and a box per red cell (clipped to the image, as
    BCCD's are; cells mostly outside it are left out)."""
    width, height = size
    streams = _streams(seed)
    rng = streams["geometry"]
    n_wbc = int(rng.integers(1, 5)) if n_wbc is None else n_wbc
    if n_wbc < 0:
        raise ValueError(f"n_wbc must be >= 0, got {n_wbc}")
    unit = _SMEAR_UNIT * min(width, height)
    attributes = [sample_attributes(rng) for _ in range(n_wbc)]
    diameters = [_cell_diameter(a["cell_size"], unit, rng) for a in attributes]
    centres = _place_wbcs(rng, size, diameters)
    canvas = _Layers(np.zeros((3, height, width), np.float32),
                     np.zeros((height, width), np.float32), np.zeros((height, width), np.float32))
    cells = [{"box": _paste_wbc(canvas, a, d, c, int(rng.integers(2**31))), "attributes": a}
             for a, d, c in zip(attributes, diameters, centres)]
    rbc_radius = unit * streams["rbc"].uniform(*_RBC_DIAMETER_FRAC) / 2.0
    wbc_discs = [(cy, cx, d / 2.0) for (cy, cx), d in zip(centres, diameters)]
    rbcs = _place_rbcs(streams["rbc"], (height, width), wbc_discs, rbc_radius, 600)
    platelet_count = int(streams["rbc"].integers(0, 4))
    canvas.od += _platelets(streams["rbc"], (height, width), platelet_count, 0.035 * unit) \
        * _PLATELET_OD
    image = _composite(_rbc_density((height, width), rbcs), canvas, streams["stain"],
                       streams["noise"], blur=0.6)
    return image, cells, [box for rbc in rbcs if (box := _red_cell_box(rbc, size))]


def _red_cell_box(rbc: tuple, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The clipped box of an elliptic red cell, None when under half its width or height is inside."""
    cy, cx, r, aspect, angle = rbc
    half_w = math.hypot(r * math.cos(angle), r * aspect * math.sin(angle))
    half_h = math.hypot(r * math.sin(angle), r * aspect * math.cos(angle))
    x0, x1 = max(0, round(cx - half_w)), min(size[0], round(cx + half_w))
    y0, y1 = max(0, round(cy - half_h)), min(size[1], round(cy + half_h))
    return (x0, y0, x1, y1) if x1 - x0 >= half_w and y1 - y0 >= half_h else None


def _voc_xml(image_id: str, size_wh, cells: list[dict], red_cells: list[tuple] = ()) -> ET.ElementTree:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size_el = ET.SubElement(root, "size")
    for tag, value in zip(("width", "height", "depth"), (*size_wh, 3)):
        ET.SubElement(size_el, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, box_values in [("WBC", cell["box"]) for cell in cells] + [("RBC", box) for box in red_cells]:
        obj = ET.SubElement(root, "object")
        for tag, value in (("name", name), ("pose", "Unspecified"),
                           ("truncated", "0"), ("difficult", "0")):
            ET.SubElement(obj, tag).text = value
        box = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box_values):
            ET.SubElement(box, tag).text = str(value)
    tree = ET.ElementTree(root)
    ET.indent(tree)
    return tree


def _coco_entries(image_index: int, image_id: str, size_wh, cells, first_ann_id: int):
    image = {"id": image_index, "file_name": f"{image_id}.jpg",
             "width": size_wh[0], "height": size_wh[1]}
    annotations = []
    for k, cell in enumerate(cells):
        x0, y0, x1, y1 = cell["box"]
        annotations.append({
            "id": first_ann_id + k, "image_id": image_index, "category_id": 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
            "iscrowd": 0, "attributes": dict(cell["attributes"]),
        })
    return image, annotations


def _write_smear_files(root: Path, n: int, seed: int, size_wh) -> None:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    coco = {"info": {"description": "hemcap synthetic smears", "seed": seed},
            "images": [], "annotations": [], "categories": [{"id": 1, "name": "WBC"}]}
    ids = []
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        image_id = f"synth_{i:05d}"
        image, cells, red_cells = draw_smear_with_red_cells(int(child.generate_state(1)[0]), size=size_wh)
        image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=92)
        _voc_xml(image_id, size_wh, cells, red_cells).write(root / "Annotations" / f"{image_id}.xml")
        entry, annotations = _coco_entries(i + 1, image_id, size_wh, cells,
                                           len(coco["annotations"]) + 1)
        coco["images"].append(entry)
        coco["annotations"].extend(annotations)
        ids.append(image_id)
    (root / "ImageSets/Main/all.txt").write_text("\n".join(ids) + "\n")
    (root / "annotations.json").write_text(json.dumps(coco, indent=1))


def write_smears(out_dir: str | Path, n: int, seed: int = 0, size=(640, 480)) -> Path:
    """Write n smears as a VOC + COCO detection set; out_dir appears complete or not at all.

    Layout: JPEGImages/<id>.jpg, Annotations/<id>.xml (classes "WBC" and "RBC", as BCCD's), annotations.json (COCO,
    category WBC = 1, each annotation with its "attributes"), ImageSets/Main/all.txt.
    """
    out_dir = Path(out_dir)
    with staging_dir(out_dir, overwrite=True) as staging:
        _write_smear_files(staging, n, seed, tuple(size))
    return out_dir
