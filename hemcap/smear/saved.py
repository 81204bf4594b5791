"""Detectors that read boxes other tools saved (YOLO txt, COCO JSON), a score filter, and the
choice the command line makes between them and the stain detector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Collection

from hemcap.smear.detect import (Box, Detection, Detector, ImageLike, StainDetector, StainDetectorConfig,
                                 image_size)


class YoloPredictions:
    """Detections another tool saved in YOLO txt format: one ``<stem>.txt`` per image, one line per
    box, ``class cx cy w h [score]`` in coordinates normalised to the image size. An image without a
    file has no detections (YOLO writes no file then). ``classes`` keeps only those class ids."""

    def __init__(self, directory: str | Path, classes: Collection[int] | None = None, label: str = "WBC"):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"YOLO predictions folder {self.directory} not found")
        self.classes = None if classes is None else {int(c) for c in classes}
        self.label = label

    def __call__(self, image: ImageLike, path: str | Path | None = None,
                 red_cell_px: float | None = None) -> list[Detection]:
        if path is None:
            raise ValueError("YoloPredictions finds boxes by image file name: call it with path=")
        file = self.directory / f"{Path(path).stem}.txt"
        if not file.exists():
            return []
        return read_yolo(file, image_size(image), self.classes, self.label)


def read_yolo(file: str | Path, size: tuple[int, int], classes: Collection[int] | None = None,
              label: str = "WBC") -> list[Detection]:
    """Boxes of one YOLO txt file, in pixels of an image of ``size`` (width, height)."""
    found = []
    for number, line in enumerate(Path(file).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        cls, box, score = _parse_yolo_line(line, f"{file}, line {number}")
        if classes is None or cls in classes:
            found.append(Detection(_yolo_box(box, size), score, label))
    return found


def _parse_yolo_line(line: str, where: str) -> tuple[int, list[float], float]:
    parts = line.split()
    if len(parts) not in (5, 6):
        raise ValueError(f"{where}: expected 'class cx cy w h [score]', got {line.strip()!r}")
    try:
        cls, values = int(float(parts[0])), [float(v) for v in parts[1:]]
    except ValueError:
        raise ValueError(f"{where}: not numbers: {line.strip()!r}") from None
    return cls, values[:4], values[4] if len(values) == 5 else 1.0


def _yolo_box(cxcywh: list[float], size: tuple[int, int]) -> Box:
    cx, cy, w, h = cxcywh
    width, height = size
    return ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)


class CocoPredictions:
    """Detections another tool saved as COCO JSON, found by image file name.

    Reads a dataset-style file (``images`` + ``annotations`` with a ``score``, as ``hemcap detect``
    writes) or a results list (``[{"image_id", "category_id", "bbox", "score"}, ...]``); for a
    results list, ``images`` names the dataset JSON mapping ids to file names, else an ``image_id``
    must equal the file's stem (ultralytics' convention). ``categories`` keeps only those ids or names.
    """

    def __init__(self, file: str | Path, images: str | Path | None = None,
                 categories: Collection[int | str] | None = None, label: str = "WBC"):
        data = _read_json(Path(file))
        names = _image_names(data if isinstance(data, dict) else _read_json(Path(images)) if images else {})
        annotations = data.get("annotations", []) if isinstance(data, dict) else data
        keep = _category_filter(data if isinstance(data, dict) else {}, categories)
        self.by_name: dict[str, list[Detection]] = {}
        for number, ann in enumerate(annotations):
            if keep is None or ann.get("category_id") in keep:
                name = names.get(ann.get("image_id"), str(ann.get("image_id")))
                self.by_name.setdefault(name, []).append(_coco_detection(ann, f"{file}, annotation {number}", label))

    def __call__(self, image: ImageLike, path: str | Path | None = None,
                 red_cell_px: float | None = None) -> list[Detection]:
        if path is None:
            raise ValueError("CocoPredictions finds boxes by image file name: call it with path=")
        path = Path(path)
        for key in (path.name, path.stem, str(path)):
            if key in self.by_name:
                return list(self.by_name[key])
        return []


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"COCO file {path} not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def _image_names(data: dict) -> dict:
    """image id -> file name (without folders), from a COCO dataset's ``images``."""
    return {image["id"]: Path(image["file_name"]).name for image in data.get("images", [])}


def _category_filter(data: dict, categories: Collection[int | str] | None) -> set | None:
    if categories is None:
        return None
    by_name = {c.get("name"): c.get("id") for c in data.get("categories", [])}
    unknown = [c for c in categories if isinstance(c, str) and c not in by_name]
    if unknown:
        raise ValueError(f"categories {unknown} are not among the file's categories {sorted(by_name)}")
    return {by_name[c] if isinstance(c, str) else c for c in categories}


def _coco_detection(ann: dict, where: str, label: str) -> Detection:
    try:
        x, y, w, h = (float(v) for v in ann["bbox"])
        score = float(ann.get("score", 1.0))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: needs a 'bbox' [x, y, w, h] of numbers, got {ann.get('bbox')!r}") from None
    return Detection((x, y, x + w, y + h), score, label)


class MinScore:
    """Another detector's detections scoring at least ``min_score``."""

    def __init__(self, detector: Detector, min_score: float):
        self.detector, self.min_score = detector, min_score

    def __call__(self, image: ImageLike, path: str | Path | None = None,
                 red_cell_px: float | None = None) -> list[Detection]:
        return [d for d in self.detector(image, path=path, red_cell_px=red_cell_px) if d.score >= self.min_score]


def build_detector(yolo_dir: str | Path | None = None, coco_json: str | Path | None = None,
                   detector_dir: str | Path | None = None, min_score: float = 0.0) -> Detector:
    """The detector the command line asks for: saved YOLO or COCO predictions, a learned detector's
    folder, else the weight-free stain detector."""
    sources = (("YOLO txt", yolo_dir), ("COCO JSON", coco_json), ("a detector folder", detector_dir))
    given = [name for name, value in sources if value]
    if len(given) > 1:
        raise ValueError(f"give one source of boxes, not {' and '.join(given)}")
    if detector_dir:
        from hemcap.smear.learned import load_detector

        learned = load_detector(detector_dir)
        learned.info.min_score = max(learned.info.min_score, min_score)  # unwrapped: it still measures red cells
        return learned
    elif yolo_dir or coco_json:
        detector = YoloPredictions(yolo_dir) if yolo_dir else CocoPredictions(coco_json)
    else:
        return StainDetector(StainDetectorConfig(min_score=min_score))
    return MinScore(detector, min_score) if min_score > 0 else detector
