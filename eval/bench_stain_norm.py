"""Stain normalisations (hemcap.domain) on other labs' real smears: how close they bring them to training.

    python eval/bench_stain_norm.py --data runs/data/wbcatt --smears 20

For each normalisation and each TXL-PBC source (train split; no labels used), the first
``--smears`` smears are normalised to the training images' domain (measured on ``--data``'s train
split, as ``hemcap train`` does), then their stain is measured again (``hemcap.looks.stain_anchors``):
the background colour, and the optical densities of red cells and of white-cell nuclei. Printed:
each one's median relative distance from the training images' (0 = the same), and milliseconds per
smear. Unlike the look proxy (``hemcap eval --look``) this runs on the labs' own pixels; it says
how far the colours the model is given still are from the ones it learnt, not what it then says.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from hemcap.domain import NORMALISATIONS, measure_domain, normalise_stain
from hemcap.images import load_rgb
from hemcap.looks import stain_anchors
from hemcap.recipes import get_split, load_prepared
from hemcap.smear.labelled import load_smears

DEFAULT_TXL = Path(__file__).resolve().parents[2] / "shared" / "data" / "txl_pbc"


def distances(image, domain) -> tuple[float | None, ...]:
    """Relative distances of an image's background, red-cell and nucleus stain from the domain's."""
    measured = stain_anchors(image)
    targets = (domain.background_rgb, domain.red_cell_od, domain.nucleus_od)
    return tuple(None if got is None else float(np.linalg.norm(got - np.asarray(want)) / np.linalg.norm(want))
                 for got, want in zip(measured, targets))


def source_row(paths: list[Path], domain, method: str) -> tuple[list[float | None], float]:
    """Median distances over a source's smears after ``method``, and ms per smear."""
    rows, spent = [], 0.0
    for path in paths:
        image = load_rgb(path)
        start = time.perf_counter()
        normalised = normalise_stain(image, domain) if method != "none" else image
        spent += time.perf_counter() - start
        rows.append(distances(normalised, domain))
    medians = [statistics.median(v) if (v := [r[k] for r in rows if r[k] is not None]) else None for k in range(3)]
    return medians, 1000 * spent / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="prepared dataset: its train split is the training domain")
    parser.add_argument("--txl", type=Path, default=DEFAULT_TXL)
    parser.add_argument("--smears", type=int, default=20, help="train smears per source")
    args = parser.parse_args()
    dataset, _ = load_prepared(args.data)
    images = get_split(dataset, "train").select(range(40))["image"]
    by_source: dict[str, list[Path]] = {}
    for smear in load_smears(args.txl, "train"):
        if len(by_source.setdefault(smear.source, [])) < args.smears:
            by_source[smear.source].append(smear.path)
    print(f"{'normalisation':14s} {'source':12s} {'background':>10s} {'red cells':>9s} {'nuclei':>7s} {'ms':>5s}")
    for method in NORMALISATIONS:
        domain = measure_domain(images, method)
        for source, paths in sorted(by_source.items()):
            medians, ms = source_row(paths, domain, method)
            cells = " ".join(f"{m:>{w}.2f}" if m is not None else f"{'-':>{w}s}" for m, w in zip(medians, (10, 9, 7)))
            print(f"{method:14s} {source:12s} {cells} {ms:5.0f}")


if __name__ == "__main__":
    main()
