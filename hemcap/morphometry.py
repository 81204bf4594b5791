"""Nucleus geometry measured on the image a model sees: a lobe count a ViT from scratch does not learn.

On WBCAtt the captioner states nucleus_shape no better on its training cells than on validation
(70.6 % against 71.6 %): it does not tell a band from a bilobed neutrophil, which two annotators
agree on 90 % of the time. What tells them apart is topology: eroded by a few pixels, a segmented
nucleus falls apart at its thin filaments and a band does not. The numbers here, beside the
attribute heads' probabilities, take nucleus_shape from 71.6 % to 75.8 % on validation
(``hemcap.models.refiner``; BENCHMARKS.md "Nucleus geometry").

The nucleus is the haematoxylin channel (``skimage.color.rgb2hed``), smoothed over the chromatin's
grain, above its Otsu threshold, holes filled, pieces whose centre lies within 30 % of the image
side from the image centre (a crop is centred on its cell; a neighbour's nucleus is not). Lengths
are in pixels of the model's input, so a model's features are measured at its own ``image_size``.
"""

from __future__ import annotations

import numpy as np

EROSIONS = (0, 2, 4, 6, 8, 10)  # disk radii in px: a 256 px input's filaments go at 2-4, bands hold past 6
NAMES = (*(f"pieces_{r}" for r in EROSIONS), *(f"second_piece_{r}" for r in EROSIONS),
         "solidity", "eccentricity", "perimeter2_per_area", "skeleton_per_side", "thickness_mean", "thickness_low")
SMOOTHING = 1.5  # Gaussian sigma in px over the chromatin's grain, which splits a raw threshold into specks
SMALLEST = 100  # px: pieces smaller than this are stain specks, not lobes
HOLES = 200  # px: gaps in the chromatin smaller than this are filled


def nucleus_geometry(rgb: np.ndarray) -> np.ndarray:
    """The ``NAMES`` features of the nucleus in an RGB image (H x W x 3, uint8); zeros when none is found."""
    from scipy import ndimage

    nucleus = nucleus_mask(rgb)
    if not nucleus.any():
        return np.zeros(len(NAMES), dtype=np.float32)
    depth = ndimage.distance_transform_edt(nucleus)  # eroding by a disk of radius r keeps depth > r
    return np.array([*_erosion_pieces(depth), *_shape(nucleus, depth)], dtype=np.float32)


def nucleus_mask(rgb: np.ndarray) -> np.ndarray:
    """The central nucleus (boolean H x W), as the module docstring says."""
    from skimage import color, filters, measure, morphology

    stain = filters.gaussian(color.rgb2hed(rgb)[..., 0], SMOOTHING)
    if np.ptp(stain) == 0:
        return np.zeros(stain.shape, dtype=bool)
    mask = morphology.remove_small_holes(stain > filters.threshold_otsu(stain), max_size=HOLES)
    labels = measure.label(morphology.remove_small_objects(mask, max_size=SMALLEST))
    centre, reach = np.array(labels.shape) / 2, 0.3 * min(labels.shape)
    near = [p.label for p in measure.regionprops(labels) if np.hypot(*(np.array(p.centroid) - centre)) < reach]
    return np.isin(labels, near)


def _erosion_pieces(depth: np.ndarray) -> list[float]:
    """Per erosion radius: how many pieces remain, and the second largest's size over the largest's."""
    from skimage import measure

    counts, seconds = [], []
    for radius in EROSIONS:
        areas = sorted(np.bincount(measure.label(depth > radius).ravel())[1:], reverse=True)
        areas = [a for a in areas if a >= 30]  # an eroded lobe keeps more than 30 px; crumbs do not count
        counts.append(float(len(areas)))
        seconds.append(areas[1] / areas[0] if len(areas) > 1 else 0.0)
    return counts + seconds


def _shape(nucleus: np.ndarray, depth: np.ndarray) -> list[float]:
    """Solidity, the largest piece's eccentricity and perimeter^2 / area, skeleton length per side of
    the nucleus' area, and its half-thickness along the skeleton (mean and 10th percentile)."""
    from skimage import measure, morphology

    area = float(nucleus.sum())
    solidity = area / max(float(morphology.convex_hull_image(nucleus).sum()), 1.0)
    largest = max(measure.regionprops(measure.label(nucleus)), key=lambda p: p.area)
    skeleton = morphology.skeletonize(nucleus)
    thickness = depth[skeleton]
    return [solidity, largest.eccentricity, largest.perimeter ** 2 / max(largest.area, 1),
            skeleton.sum() / np.sqrt(area), float(thickness.mean()), float(np.percentile(thickness, 10))]
