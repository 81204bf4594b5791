"""What a model's refiner costs at captioning time: the same cells with it and without, side by side.

The refiner (``hemcap.models.refiner``) adds the nucleus geometry of every cell (``hemcap.morphometry``)
and the attribute heads on the captioning pass's vision features (``Generated.heads``). Timed beside it:
the same refiner on a second vision pass for the heads, as it ran before that. All three share one
loaded model; rounds alternate so that other load on the machine falls on each alike.

    python eval/bench_refiner.py --model runs/blip_small_scratch/model --data runs/data/wbcatt --images 256
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from hemcap.engine import CaptionEngine
from hemcap.evaluation import batches
from hemcap.morphometry import nucleus_geometry
from hemcap.recipes import get_split, load_prepared
from hemcap.refine import seen_rgb

RUNS = {"without": "without the refiner", "with": "with the refiner",
        "second pass": "with it on a second vision pass"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder with a refiner (train.refine, hemcap refine)")
    parser.add_argument("--data", required=True, help="prepared dataset")
    parser.add_argument("--split", default="val")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engine = CaptionEngine.from_dir(args.model)
    refiner = engine.backend.refiner
    if refiner is None:
        raise SystemExit(f"{args.model} has no refiner: fit one with `hemcap refine` first")
    split = get_split(load_prepared(args.data)[0], args.split)
    rows = next(batches(split.select(range(min(args.images, len(split)))), args.images))
    seen = engine.model_rows(rows)
    started = time.perf_counter()
    for row in seen:
        nucleus_geometry(seen_rgb(engine.backend, row))
    print(f"nucleus geometry: {1000 * (time.perf_counter() - started) / len(seen):.1f} ms per cell")
    rates = {run: [] for run in RUNS}
    for _ in range(args.rounds):
        for run in RUNS:
            rates[run].append(len(rows) / _seconds(engine, rows, refiner, run))
    best = {run: max(r) for run, r in rates.items()}
    for run, r in rates.items():
        print(f"{RUNS[run]}: best {best[run]:.1f} cells/s, median {np.median(r):.1f} ({args.rounds} rounds)")
    print(f"ratio (with / without, best): {best['with'] / best['without']:.2f}; "
          f"on a second pass: {best['second pass'] / best['without']:.2f}")


def _seconds(engine, rows, refiner, run: str) -> float:
    """Seconds to caption ``rows`` as ``run`` says; "second pass" captions unrefined, then refines
    (``_refined`` without the captioning pass's heads encodes the images again)."""
    import torch

    engine.backend.refiner = refiner if run == "with" else None
    started = time.perf_counter()
    captions = engine.caption_rows(rows)
    engine.backend.refiner = refiner
    if run == "second pass":
        with torch.inference_mode():
            engine._refined(captions, engine.model_rows(rows))
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
