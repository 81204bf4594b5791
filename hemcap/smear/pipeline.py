"""From smear to cells: find the white cells on a smear image, crop and caption them in one batch,
parse what each caption states, and report per cell and per smear.

``SmearPipeline(engine).run(image)`` returns a ``SmearReport`` (``hemcap.smear.report``): every
cell's box, caption, attributes and confidences, a differential count of cell types, and flags for
cells whose caption contradicts itself, names no cell type, or states an attribute with a
confidence below ``min_confidence``. For a captioner that records its training domain
(``hemcap.domain``) each cell is cropped over the training field at the image's red-cell size, and
the report says how far the image sits from the training images, with a warning past the limits. ``hemcap.smear.batch.process_images`` runs it over folders.
``max_cells`` caps the cells captioned per image (the demo's limit), keeping the highest-scoring
ones, and says so in the report's notes.

``run_auto`` decides whether an image is a smear or a crop of one cell, from the image's shape and
what the detector finds (``looks_like_cell``):

1. a detected cell spanning >= 75% of the image's shorter side fills the frame: a cell crop,
   whatever the image's shape;
2. otherwise an image that is not about square (long / short side > 1.15; camera frames are 4:3,
   3:2 or 16:9) is a smear, even with no cell found: an empty smear gives an empty report;
3. a square image is a cell crop when nothing is found in it (a crop too small or too pale for
   the detector), or when a detected cell sits at its centre (box centre within 15% of the side),
   spans >= 30% of its side, and every other detection is cut by the image border (a neighbour)
   or scores < 0.5 (a fragment); a square tile of a smear, its cells small, off centre or several,
   is a smear.

Measured with the stain detector at scale 1: all 364 BCCD smears (640x480) are read as smears
(one white cell spans 23-65% of the shorter side); 394 of 400 random PBC crops (360x363) are read
as cells, the other 6 small centred lymphocytes spanning 27-29%, which are then detected and
captioned from a re-crop. Square 480x480 tiles cut from the BCCD smears are read as cells when
one white cell sits at their centre and no other whole one is found (64 of 364 tiles): both
paths then caption that one cell. Mistaking a crop for a smear costs little; the other way round
would lose every cell but one, hence the conservative thresholds.
"""

from __future__ import annotations

import math
from typing import Sequence

from PIL import Image

from hemcap.domain import colour_distance, domain_shift, field_side, mean_confidence
from hemcap.images import square_crop
from hemcap.smear.detect import Detection, Detector, StainDetector, as_pil_rgb, crop_cells, find_cells
from hemcap.smear.magnification import RedCellSize, measure_red_cells
from hemcap.smear.report import CellReport, SmearReport, cell_flags, differential

KINDS = ("auto", "smear", "cell")
FRAME_FILLING_SPAN = 0.75  # rule 1: box side / image shorter side
SQUARE_ASPECT = 1.15  # rule 2: long / short side of a square crop (PBC: 363 / 360)
CENTRED_CELL_SPAN = 0.30  # rule 3: box side / image side ...
CENTRE_TOLERANCE = 0.15  # ... box centre's offset from the image centre, share of the side
OTHER_CELL_SCORE = 0.5  # ... and no other whole cell scoring this much (PBC crop fragments: 0.05-0.12)
DEFAULT_CROP_SIZE = 384  # BLIP-base's input side, for an engine that does not say its own
CAPPED = "captioned the first {kept} of {found} white cells found (by detector score): the count covers those {kept}"
BOX_CROPS = ("crops framed by each cell's box: the smear's magnification is a guess, so cell sizes are too "
             "(give --red-cell-px)")


class SmearPipeline:
    """Detector + captioner: ``SmearPipeline(engine).run(smear)`` -> ``SmearReport``."""

    def __init__(self, engine, detector: Detector | None = None, crop_size: int | None = None,
                 margin: float = 0.6, min_confidence: float = 0.5, red_cell_px: float | None = None,
                 max_cells: int | None = None):
        problems = []
        if crop_size is not None and crop_size < 1:
            problems.append(f"crop_size must be >= 1, got {crop_size}")
        if margin < 0:
            problems.append(f"margin must be >= 0, got {margin}")
        if not 0 <= min_confidence <= 1:
            problems.append(f"min_confidence must be in [0, 1], got {min_confidence}")
        if red_cell_px is not None and not red_cell_px > 0:
            problems.append(f"red_cell_px must be > 0 (the red-cell diameter in pixels), got {red_cell_px}")
        if max_cells is not None and max_cells < 1:
            problems.append(f"max_cells must be >= 1, got {max_cells}")
        if problems:
            raise ValueError("SmearPipeline: " + "; ".join(problems))
        self.engine = engine
        self.detector = detector if detector is not None else StainDetector()
        self.crop_size = crop_size or engine_input_size(engine)
        self.margin = margin
        self.min_confidence = min_confidence
        self.red_cell_px = red_cell_px  # None: measured on each image
        self.max_cells = max_cells  # None: every cell found is captioned
        self.domain = getattr(engine, "domain", None)  # the captioner's training magnification and colour
        schema = engine.schema
        self.cell_type_field = schema.cell_type_field if schema.targets else None
        self.cell_types = schema.values(self.cell_type_field) if self.cell_type_field else ()

    def run(self, image: Image.Image, name: str = "", notes: list[str] | None = None) -> SmearReport:
        """Every white cell the detector finds, captioned in one batch."""
        image, notes = self._prepare(image, notes)
        return self._smear(image, name, *self._detect(image, name, notes), notes)

    def run_cell(self, image: Image.Image, name: str = "", notes: list[str] | None = None) -> SmearReport:
        """The whole image as one cell (padded to a square with the slide background, then resized)."""
        image, notes = self._prepare(image, notes)
        red_cells = measure_red_cells(image, self.red_cell_px, self.detector)  # a crop rarely shows enough: no note
        return self._whole_image(image, name, red_cells, notes)

    def run_auto(self, image: Image.Image, name: str = "", kind: str = "auto",
                 notes: list[str] | None = None) -> SmearReport:
        """``kind`` smear -> ``run``, cell -> ``run_cell``, auto -> whichever ``looks_like_cell`` says."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "cell":
            return self.run_cell(image, name, notes)
        image, notes = self._prepare(image, notes)
        detections, red_cells = self._detect(image, name, notes)
        if kind == "auto" and looks_like_cell(image.size, detections):
            return self._whole_image(image, name, red_cells, notes)
        return self._smear(image, name, detections, red_cells, notes)

    def _prepare(self, image: Image.Image, notes: list[str] | None) -> tuple[Image.Image, list[str]]:
        from hemcap.images import describe_mode, to_rgb

        notes = list(notes or [])
        if isinstance(image, Image.Image) and image.mode != "RGB":
            notes.append(f"converted {describe_mode(image.mode)} image to 8-bit RGB")
            return to_rgb(image), notes
        return as_pil_rgb(image), notes

    def _detect(self, image: Image.Image, name: str, notes: list[str]) -> tuple[list[Detection], RedCellSize]:
        return find_cells(self.detector, image, name or None, notes, self.red_cell_px)

    def _whole_image(self, image: Image.Image, name: str, red_cells: RedCellSize, notes: list[str]) -> SmearReport:
        """The image as one cell: the training field about its centre when its red cells are measured or
        given, else the whole image, taken to be at the training magnification (notes say which)."""
        field = self._field(red_cells)
        if self.domain is not None and self.domain.red_cell_px:
            notes.append(f"cell image cropped to the training field ({field:.0f} px) at its red cells' size"
                         if field else "no red cells measured on this cell image: taken to be at the training "
                                       "magnification")
        centre = (image.width / 2, image.height / 2) * 2  # a point: the crop is then exactly the field
        crop = square_crop(image, centre if field else (0, 0, image.width, image.height), 0.0, self.crop_size,
                           min_side=field)
        (caption,) = self.engine.caption([crop])
        return self._report(name, image.size, [self._cell(1, None, caption, crop)], notes, "cell", red_cells,
                            self._domain_report([crop], [caption], field))

    def _smear(self, image: Image.Image, name: str, detections: list[Detection], red_cells: RedCellSize,
               notes: list[str]) -> SmearReport:
        field = self._field(red_cells)
        if not field and detections and self.domain is not None and self.domain.red_cell_px:
            notes.append(BOX_CROPS)
        detections = self._capped(detections, notes)
        crops = crop_cells(image, detections, self.crop_size, self.margin, field)
        captions = self.engine.caption(crops)
        cells = [self._cell(number, detection, caption, crop)
                 for number, (detection, caption, crop) in enumerate(zip(detections, captions, crops), 1)]
        return self._report(name, image.size, cells, notes, "smear", red_cells,
                            self._domain_report(crops, captions, field, red_cells.origin == "default"))

    def _capped(self, detections: list[Detection], notes: list[str]) -> list[Detection]:
        """The ``max_cells`` detections of highest score, in the detector's order, with a note when some are left."""
        if self.max_cells is None or len(detections) <= self.max_cells:
            return detections
        notes.append(CAPPED.format(kept=self.max_cells, found=len(detections)))
        best = sorted(range(len(detections)), key=lambda i: -detections[i].score)[:self.max_cells]
        return [detections[i] for i in sorted(best)]

    def _field(self, red_cells: RedCellSize) -> float | None:
        """The training field of view in this image's pixels; None when its magnification is a guess."""
        return field_side(self.domain, red_cells.px) if red_cells.origin != "default" else None

    def _domain_report(self, crops: list[Image.Image], captions, field: float | None,
                       unknown_magnification: bool = False) -> dict | None:
        """How the image met the captioner's training domain: the field cropped, the stain normalisation,
        and its domain shift (``hemcap.domain``); None for a model that does not record its domain."""
        if self.domain is None:
            return None
        colours = [colour_distance(self.engine.seen(crop), self.domain, field=crop)  # what it saw, or the field
                   for crop in crops] if self.domain.lab_mean else []
        upscale = self.crop_size / field if field else None
        confidences = [mean_confidence(caption.confidences) for caption in captions]
        shift = domain_shift(colours, upscale, [c for c in confidences if c is not None], unknown_magnification)
        return {"field_px": round(field, 1) if field else None, "stain_norm": self._stain_norm(),
                "shift": shift.as_dict()}

    def _stain_norm(self) -> str:
        return self.domain.normalisation if getattr(self.engine, "normalises_stain", False) else "off"

    def _cell(self, index: int, detection: Detection | None, caption, crop: Image.Image) -> CellReport:
        confidences = {k: None if v is None else round(float(v), 4) for k, v in caption.confidences.items()}
        contradictions = {k: list(v) for k, v in caption.contradictions.items()}
        flags = cell_flags(caption.attributes, confidences, contradictions, self.cell_type_field, self.min_confidence)
        box = _pixel_box(detection.box) if detection else None
        score = round(float(detection.score), 4) if detection else None
        return CellReport(index, box, score, caption.text, dict(caption.attributes), confidences, contradictions,
                          flags, crop)

    def _report(self, name: str, size: tuple[int, int], cells: list[CellReport], notes: list[str],
                kind: str, red_cells: RedCellSize | None = None, domain: dict | None = None) -> SmearReport:
        table = differential(cells, self.cell_types, self.cell_type_field)
        flagged = [cell.index for cell in cells if cell.flags]
        return SmearReport(str(name), int(size[0]), int(size[1]), cells, table, flagged, notes, kind,
                           red_cells.as_dict() if red_cells else None, domain)


def engine_input_size(engine) -> int:
    """The side of the square crops to give the captioner: its input size, before its centre crop
    (``ModelInfo.centre_crop``) keeps the middle of each at that size."""
    backend = getattr(engine, "backend", None)
    try:
        return round(max(backend.image_size) / backend.info.centre_crop)
    except (AttributeError, ValueError, TypeError):
        return DEFAULT_CROP_SIZE


def looks_like_cell(size: tuple[int, int], detections: Sequence[Detection]) -> bool:
    """Whether an image of ``size`` (width, height) with these detections is a single-cell crop
    rather than a smear: the three rules of the module docstring."""
    width, height = size
    short = max(1, min(width, height))
    spans = [max(d.width, d.height) / short for d in detections]
    if any(span >= FRAME_FILLING_SPAN for span in spans):
        return True
    if max(width, height) / short > SQUARE_ASPECT:
        return False
    centred = [span >= CENTRED_CELL_SPAN and _centre_offset(d, size) <= CENTRE_TOLERANCE
               for d, span in zip(detections, spans)]
    others_minor = all(is_centred or d.score < OTHER_CELL_SCORE or _on_border(d, size)
                       for d, is_centred in zip(detections, centred))
    return not detections or (any(centred) and others_minor)


def _centre_offset(detection: Detection, size: tuple[int, int]) -> float:
    x0, y0, x1, y1 = detection.box
    return max(abs((x0 + x1) / 2 - size[0] / 2) / size[0], abs((y0 + y1) / 2 - size[1] / 2) / size[1])


def _on_border(detection: Detection, size: tuple[int, int]) -> bool:
    x0, y0, x1, y1 = detection.box
    return min(x0, y0) <= 1 or x1 >= size[0] - 1 or y1 >= size[1] - 1


def _pixel_box(box) -> tuple[int, int, int, int]:
    """Integer pixel edges holding the whole box."""
    x0, y0, x1, y1 = box
    return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)
