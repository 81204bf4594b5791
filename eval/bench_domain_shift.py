"""The domain-shift measures (hemcap.domain) in domain and on other labs' smears: where to put the limits.

    python eval/bench_domain_shift.py --model runs/x/model --data runs/data/wbcatt --limit 400 --smears 30

In domain: each validation cell of ``--data`` is one image (its colour distance from the training
images, and its caption's mean confidence). Other labs: the first ``--smears`` TXL-PBC train
smears of each source, their labelled white-cell boxes cropped over the training field at their
measured red-cell size (so detection does not enter), captioned, and scored as a report is.
Printed per group: images, the median and the 99th / 1st percentile of each measure, and the share
each limit warns. The limits in ``hemcap.domain`` are chosen so that ~1 % of in-domain images warn.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from hemcap.domain import COLOUR_LIMIT, CONFIDENCE_LIMIT, colour_distance, mean_confidence
from hemcap.engine import CaptionEngine
from hemcap.images import load_rgb
from hemcap.recipes import get_split, load_prepared
from hemcap.smear import Detection, SmearPipeline
from hemcap.smear.labelled import load_smears

DEFAULT_TXL = Path(__file__).resolve().parents[2] / "shared" / "data" / "txl_pbc"


class LabelledBoxes:
    """A detector that returns a smear's labelled white-cell boxes."""

    def __init__(self, boxes):
        self.boxes = [Detection(tuple(box), 1.0) for box in boxes]

    def __call__(self, image, path=None, red_cell_px=None):
        return list(self.boxes)


def in_domain(engine: CaptionEngine, data: Path, split: str, limit: int) -> list[tuple[float, float]]:
    """(colour distance, mean confidence) per validation image."""
    dataset, _ = load_prepared(data)
    rows = get_split(dataset, split).select(range(limit))
    images = [image.convert("RGB") for image in rows["image"]]
    colours = [colour_distance(engine.seen(image), engine.domain, field=image) for image in images]
    confidences = [mean_confidence(caption.confidences) for caption in engine.caption(images)]
    return list(zip(colours, confidences))


def other_labs(engine: CaptionEngine, root: Path, per_source: int) -> dict[str, list[dict]]:
    """Source -> the domain-shift record of each of its first ``per_source`` train smears with white cells."""
    shifts: dict[str, list[dict]] = {}
    for smear in load_smears(root, "train"):
        boxes = smear.of("WBC")
        if not boxes or len(shifts.setdefault(smear.source, [])) >= per_source:
            continue
        report = SmearPipeline(engine, LabelledBoxes(boxes)).run(load_rgb(smear.path), smear.name)
        shifts[smear.source].append(report.domain["shift"])
    return shifts


def row(name: str, colours: list[float], confidences: list[float], warned: list[bool]) -> str:
    return (f"{name:24s} {len(colours):5d} {statistics.median(colours):7.2f} {np.percentile(colours, 99):7.2f} "
            f"{np.mean(np.asarray(colours) >= COLOUR_LIMIT):7.1%} {statistics.median(confidences):7.3f} "
            f"{np.percentile(confidences, 1):7.3f} {np.mean(np.asarray(confidences) <= CONFIDENCE_LIMIT):7.1%} "
            f"{np.mean(warned):7.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="the model's prepared dataset (its validation split)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=400, help="validation images")
    parser.add_argument("--txl", type=Path, default=DEFAULT_TXL, help="TXL-PBC (its train split only)")
    parser.add_argument("--smears", type=int, default=30, help="train smears per source")
    args = parser.parse_args()
    engine = CaptionEngine.from_dir(args.model)
    print(f"limits: colour {COLOUR_LIMIT:g} training spreads, mean confidence {CONFIDENCE_LIMIT:g}")
    print(f"{'group':24s} {'n':>5s} {'colour':>7s} {'p99':>7s} {'warns':>7s} {'conf.':>7s} {'p1':>7s} "
          f"{'warns':>7s} {'any':>7s}")
    own = in_domain(engine, Path(args.data), args.split, args.limit)
    colours, confidences = zip(*own)
    print(row("in domain (validation)", list(colours), list(confidences),
              [c >= COLOUR_LIMIT or f <= CONFIDENCE_LIMIT for c, f in own]))
    for source, shifts in sorted(other_labs(engine, args.txl, args.smears).items()):
        print(row(f"TXL-PBC {source}", [s["colour"] for s in shifts], [s["confidence"] for s in shifts],
                  [bool(s["warning"]) for s in shifts]))


if __name__ == "__main__":
    main()
