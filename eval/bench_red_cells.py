"""Red-cell size estimates (hemcap.smear.magnification) against labelled red-cell boxes, per source.

    python eval/bench_red_cells.py --data /work/shared/data/txl_pbc --split val
    python eval/bench_red_cells.py --data /work/shared/data/bccd --split train
    python eval/bench_red_cells.py --split train --fit     # the calibration factor (train only)
    python eval/bench_red_cells.py --split val --detector runs/detector --threads 2   # a learned detector's red cells

Target per image: the median labelled red-cell box side (mean of width and height). Printed per
source: images, share within +-10 %, median |error|, share that could not be estimated, share
resolve_red_cell_size would send to the default, and mean ms per image (estimate only, JPEG decode
excluded; one core unless --threads). With --detector, the learned detector measures the red cells
(``estimate_red_cells``: its red-cell boxes, looked for at the disc estimate, then at what it found).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, before numpy loads
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

from hemcap.images import load_rgb  # noqa: E402
from hemcap.smear.labelled import load_smears  # noqa: E402
from hemcap.smear.magnification import CALIBRATION, MIN_CONFIDENCE, estimate_red_cell_px  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "txl_pbc"
TOLERANCE = 0.10


def measure(root: Path, split: str, estimate=estimate_red_cell_px) -> dict[str, list[tuple]]:
    """Source -> (target px, estimate px or None, confidence, ms) per image with labelled red cells."""
    rows: dict[str, list] = defaultdict(list)
    for smear in load_smears(root, split):
        target = smear.median_red_cell_px()
        if target is None:
            continue
        image = load_rgb(smear.path)
        start = time.perf_counter()
        size = estimate(image)
        rows[smear.source].append((target, size.px, size.confidence, 1000 * (time.perf_counter() - start)))
    return rows


def table(rows: dict[str, list]) -> list[str]:
    lines = [f"{'source':12s} {'images':>6s} {'within10%':>9s} {'med|err|':>8s} {'no est.':>7s} "
             f"{'default':>7s} {'ms/img':>6s}"]
    for source, items in sorted(rows.items()):
        errors = [abs(px / target - 1) for target, px, _, _ in items if px is not None]
        within = sum(e <= TOLERANCE for e in errors) / len(items)
        failed = sum(px is None for _, px, _, _ in items) / len(items)
        default = sum(px is None or conf < MIN_CONFIDENCE for _, px, conf, _ in items) / len(items)
        median = 100 * statistics.median(errors) if errors else float("nan")
        ms = statistics.mean(ms for *_, ms in items)
        lines.append(f"{source:12s} {len(items):6d} {within:9.2f} {median:7.1f}% {failed:7.2f} {default:7.2f} "
                     f"{ms:6.1f}")
    return lines


def fitted_calibration(rows: dict[str, list]) -> float:
    """Median of target / uncalibrated estimate over all images (one global factor)."""
    return statistics.median(target / (px / CALIBRATION) for items in rows.values()
                             for target, px, _, _ in items if px is not None)


def _estimator(detector: Path | None, threads: int):
    if detector is None:
        return estimate_red_cell_px
    import torch

    from hemcap.smear.learned import load_detector

    torch.set_num_threads(threads)
    return load_detector(detector).estimate_red_cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", default="val")
    parser.add_argument("--fit", action="store_true", help="print the calibration factor (train split only)")
    parser.add_argument("--detector", type=Path, help="a learned detector's folder: it measures the red cells")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --detector")
    args = parser.parse_args(argv)
    if args.fit and (args.split != "train" or args.detector):
        parser.error("--fit fits the disc estimate's calibration, on the train split only")
    rows = measure(args.data, args.split, _estimator(args.detector, args.threads))
    print(f"{args.data} {args.split}: estimate within {TOLERANCE:.0%} of the median red-cell box side")
    print("\n".join(table(rows)))
    if args.fit:
        print(f"calibration: {fitted_calibration(rows):.3f} (now {CALIBRATION})")


if __name__ == "__main__":
    main()
