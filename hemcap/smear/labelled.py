"""Smears with labelled boxes, for training and measuring detectors: TXL-PBC (YOLO txt, four labs)
and BCCD (Pascal VOC).

``load_smears(root, split)`` reads either layout into ``LabelledSmear`` rows: the image path, its
size, its boxes per class (pixel edges) and its source lab. TXL-PBC names no source per image; its
four labs are told apart by image size (``TXL_SOURCES``, from the data set's README).
"""

from __future__ import annotations

import statistics
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from hemcap.smear.detect import Box

WBC, RBC, PLATELET = "WBC", "RBC", "Platelets"
YOLO_CLASSES = {0: WBC, 1: RBC, 2: PLATELET}  # TXL-PBC labels/classes.txt
VOC_NAMES = {"WBC": WBC, "RBC": RBC, "Platelets": PLATELET}  # BCCD's object names
# TXL-PBC's labs by image size (width, height): its README names them so.
TXL_SOURCES = {(575, 575): "Raabin-WBC", (360, 363): "PBC", (366, 369): "PBC", (640, 480): "BCCD",
               (416, 416): "BCD"}


@dataclass(frozen=True)
class LabelledSmear:
    """One smear image and its labelled boxes."""

    name: str  # file stem
    path: Path
    size: tuple[int, int]  # (width, height)
    boxes: dict[str, list[Box]] = field(default_factory=dict)  # class name -> boxes in pixel edges
    source: str = ""  # lab the image comes from ("" when unknown)

    def of(self, label: str) -> list[Box]:
        return self.boxes.get(label, [])

    def median_red_cell_px(self) -> float | None:
        """Median side of the labelled red-cell boxes (mean of width and height); None without any."""
        sides = [((x1 - x0) + (y1 - y0)) / 2 for x0, y0, x1, y1 in self.of(RBC)]
        return statistics.median(sides) if sides else None


def load_smears(root: str | Path, split: str) -> list[LabelledSmear]:
    """A split of a TXL-PBC-style (``images/<split>``, ``labels/<split>``) or BCCD (VOC) folder."""
    root = Path(root)
    if (root / "Annotations").is_dir():
        return load_voc(root, split)
    if (root / "labels" / split).is_dir():
        return load_yolo(root, split)
    raise FileNotFoundError(f"{root}: neither a VOC folder (Annotations/) nor YOLO labels (labels/{split}/)")


def load_yolo(root: Path, split: str) -> list[LabelledSmear]:
    smears = []
    for path in sorted((root / "images" / split).glob("*.jpg")):
        with Image.open(path) as image:
            size = image.size
        boxes = read_yolo_labels(root / "labels" / split / f"{path.stem}.txt", size)
        smears.append(LabelledSmear(path.stem, path, size, boxes, TXL_SOURCES.get(size, f"{size[0]}x{size[1]}")))
    return smears


def read_yolo_labels(file: Path, size: tuple[int, int]) -> dict[str, list[Box]]:
    """Boxes per class name of one YOLO label file (``class cx cy w h``, normalised)."""
    width, height = size
    boxes: dict[str, list[Box]] = {}
    if not file.exists():
        return boxes
    for number, line in enumerate(file.read_text(encoding="utf-8").split("\n"), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5:
            raise ValueError(f"{file}, line {number}: expected 'class cx cy w h', got {line.strip()!r}")
        cls, (cx, cy, w, h) = int(parts[0]), (float(v) for v in parts[1:])
        box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        boxes.setdefault(YOLO_CLASSES.get(cls, str(cls)), []).append(box)
    return boxes


def load_voc(root: Path, split: str) -> list[LabelledSmear]:
    names = (root / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
    return [_voc_smear(root, name) for name in names]


def _voc_smear(root: Path, name: str) -> LabelledSmear:
    tree = ET.parse(root / "Annotations" / f"{name}.xml").getroot()
    size = tree.find("size")
    width, height = (int(size.findtext(k)) for k in ("width", "height")) if size is not None else (640, 480)
    boxes: dict[str, list[Box]] = {}
    for obj in tree.iter("object"):
        label = VOC_NAMES.get((obj.findtext("name") or "").strip())
        bb = obj.find("bndbox")
        if label and bb is not None:
            boxes.setdefault(label, []).append(tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")))
    return LabelledSmear(name, root / "JPEGImages" / f"{name}.jpg", (width, height), boxes, "BCCD")


def fingerprint(path: Path) -> np.ndarray:
    """A 16x12 grey thumbnail: equal for copies of one image under other names, sizes or JPEG settings."""
    with Image.open(path) as image:
        return np.asarray(image.convert("L").resize((16, 12), Image.BILINEAR), np.float32).ravel()


def without_copies(train: list[LabelledSmear], held_out: list[LabelledSmear],
                   tolerance: float = 3.0) -> tuple[list[LabelledSmear], int]:
    """``train`` less the smears that are copies of a ``held_out`` one (mean grey difference under
    ``tolerance`` of 255), and the number dropped. TXL-PBC's val split holds 26 of BCCD's train smears
    under other names: training on both would measure on training images. Other smears differ by 12+."""
    if not train or not held_out:
        return train, 0
    kept_out = np.stack([fingerprint(s.path) for s in held_out])
    keep = [s for s in train if np.abs(kept_out - fingerprint(s.path)).mean(axis=1).min() >= tolerance]
    return keep, len(train) - len(keep)
