"""From smear to cells: find the white cells on a smear image, crop and caption them in one batch,
parse what each caption states, and report per cell and per smear.

``SmearPipeline(engine).run(image)`` returns a ``SmearReport``: every cell's box, caption,
attributes and confidences, a differential count of cell types, and flags for cells whose caption
contradicts itself, names no cell type, or states an attribute with a confidence below
``min_confidence``. ``write_report`` saves it as ``<stem>.json`` plus ``<stem>_overlay.png``;
``process_images`` does so for folders of thousands of smears, resumable, and split across
processes under ``accelerate launch``.

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

import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from hemcap.smear.detect import Detection, Detector, StainDetector, as_pil_rgb, crop_cells
from hemcap.fileio import save_image, write_json
from hemcap.images import square_crop

log = logging.getLogger(__name__)

UNCLASSIFIED = "unclassified"  # differential row for cells whose caption names no (or no single) cell type
KINDS = ("auto", "smear", "cell")
FRAME_FILLING_SPAN = 0.75  # rule 1: box side / image shorter side
SQUARE_ASPECT = 1.15  # rule 2: long / short side of a square crop (PBC: 363 / 360)
CENTRED_CELL_SPAN = 0.30  # rule 3: box side / image side ...
CENTRE_TOLERANCE = 0.15  # ... box centre's offset from the image centre, share of the side
OTHER_CELL_SCORE = 0.5  # ... and no other whole cell scoring this much (PBC crop fragments: 0.05-0.12)
DEFAULT_CROP_SIZE = 384  # BLIP-base's input side, for an engine that does not say its own
REPORT_KEYS = frozenset({"image", "width", "height", "kind", "cells", "differential", "flagged", "notes"})


# ------------------------------------------------------------------------------ reports


@dataclass
class CellReport:
    """One white cell: where it is, what its caption says, and why a reviewer should look at it."""

    index: int  # the cell's number on the overlay, from 1
    box: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) pixel edges; None when the image was the cell
    detector_score: float | None  # None when the image was the cell
    caption: str
    attributes: dict[str, str | None]  # schema field -> value the caption states, None when it does not
    confidences: dict[str, float | None]  # field -> lowest token probability of the phrase stating it
    contradictions: dict[str, list[str]]  # field -> the conflicting values the caption states
    flags: list[str]  # e.g. "low confidence: cell_size (0.31)", "contradiction: nucleus_shape"
    crop: Image.Image | None = field(default=None, repr=False, compare=False)  # what the captioner saw; not saved

    def to_dict(self) -> dict:
        return {"index": self.index, "box": list(self.box) if self.box else None,
                "detector_score": self.detector_score, "caption": self.caption, "attributes": dict(self.attributes),
                "confidences": dict(self.confidences),
                "contradictions": {k: list(v) for k, v in self.contradictions.items()}, "flags": list(self.flags)}

    @classmethod
    def from_dict(cls, data: dict) -> "CellReport":
        box = tuple(data["box"]) if data.get("box") else None
        return cls(data["index"], box, data.get("detector_score"), data["caption"], dict(data["attributes"]),
                   dict(data["confidences"]), {k: list(v) for k, v in data.get("contradictions", {}).items()},
                   list(data.get("flags", [])))


@dataclass
class SmearReport:
    """One image: its cells, the differential count and the cells a reviewer should look at."""

    image: str  # the name or path the image was given under
    width: int
    height: int
    cells: list[CellReport]
    differential: dict[str, dict]  # cell type -> {"count": n, "percent": p}; every schema type, then unclassified
    flagged: list[int]  # indexes of the cells with flags
    notes: list[str]  # conversions done on the image, detector remarks
    kind: str = "smear"  # smear: cells were detected; cell: the image was captioned as one cell

    def to_dict(self) -> dict:
        return {"image": self.image, "width": self.width, "height": self.height, "kind": self.kind,
                "cells": [cell.to_dict() for cell in self.cells], "differential": self.differential,
                "flagged": list(self.flagged), "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: dict) -> "SmearReport":
        missing = REPORT_KEYS - set(data)
        if missing:
            raise ValueError(f"not a smear report: keys {sorted(missing)} missing")
        return cls(data["image"], data["width"], data["height"], [CellReport.from_dict(c) for c in data["cells"]],
                   data["differential"], list(data["flagged"]), list(data["notes"]), data["kind"])

    def counts(self) -> dict[str, int]:
        """Cell type -> count, only the types present."""
        return {name: row["count"] for name, row in self.differential.items() if row["count"]}


def differential(cells: Sequence[CellReport], cell_types: Sequence[str],
                 cell_type_field: str | None) -> dict[str, dict]:
    """Count and percentage of each cell type (every one of ``cell_types`` listed, zeros included), with
    cells whose caption names none counted as ``unclassified``."""
    counts = Counter((cell.attributes.get(cell_type_field) if cell_type_field else None) or UNCLASSIFIED
                     for cell in cells)
    return counts_table(counts, [*cell_types, UNCLASSIFIED])


def counts_table(counts: dict[str, int], order: Sequence[str] = ()) -> dict[str, dict]:
    """``{name: {"count", "percent"}}`` in ``order``, then any other names; percentages of the total, 1 decimal."""
    total = sum(counts.values())
    names = list(dict.fromkeys([*order, *counts]))
    return {name: {"count": int(counts.get(name, 0)),
                   "percent": round(100.0 * counts.get(name, 0) / total, 1) if total else 0.0} for name in names}


def cell_flags(attributes: dict, confidences: dict, contradictions: dict, cell_type_field: str | None,
               min_confidence: float) -> list[str]:
    """Why a reviewer should look at a cell: contradictions, no cell type, attributes stated with low confidence."""
    flags = [f"contradiction: {name} ({' vs '.join(values)})" for name, values in contradictions.items()]
    if cell_type_field and attributes.get(cell_type_field) is None and cell_type_field not in contradictions:
        flags.append(f"no {cell_type_field.replace('_', ' ')} stated")
    flags += [f"low confidence: {name} ({value:.2f})" for name, value in confidences.items()
              if value is not None and value < min_confidence]
    return flags


# ------------------------------------------------------------------------------ the pipeline


class SmearPipeline:
    """Detector + captioner: ``SmearPipeline(engine).run(smear)`` -> ``SmearReport``."""

    def __init__(self, engine, detector: Detector | None = None, crop_size: int | None = None,
                 margin: float = 0.6, min_confidence: float = 0.5):
        problems = []
        if crop_size is not None and crop_size < 1:
            problems.append(f"crop_size must be >= 1, got {crop_size}")
        if margin < 0:
            problems.append(f"margin must be >= 0, got {margin}")
        if not 0 <= min_confidence <= 1:
            problems.append(f"min_confidence must be in [0, 1], got {min_confidence}")
        if problems:
            raise ValueError("SmearPipeline: " + "; ".join(problems))
        self.engine = engine
        self.detector = detector if detector is not None else StainDetector()
        self.crop_size = crop_size or engine_input_size(engine)
        self.margin = margin
        self.min_confidence = min_confidence
        schema = engine.schema
        self.cell_type_field = schema.cell_type_field if schema.targets else None
        self.cell_types = schema.values(self.cell_type_field) if self.cell_type_field else ()

    def run(self, image: Image.Image, name: str = "", notes: list[str] | None = None) -> SmearReport:
        """Every white cell the detector finds, captioned in one batch."""
        image, notes = self._prepare(image, notes)
        return self._smear(image, name, self._detect(image, name, notes), notes)

    def run_cell(self, image: Image.Image, name: str = "", notes: list[str] | None = None) -> SmearReport:
        """The whole image as one cell (padded to a square with the slide background, then resized)."""
        image, notes = self._prepare(image, notes)

        crop = square_crop(image, (0, 0, image.width, image.height), 0.0, self.crop_size)
        (caption,) = self.engine.caption([crop])
        return self._report(name, image.size, [self._cell(1, None, caption, crop)], notes, "cell")

    def run_auto(self, image: Image.Image, name: str = "", kind: str = "auto",
                 notes: list[str] | None = None) -> SmearReport:
        """``kind`` smear -> ``run``, cell -> ``run_cell``, auto -> whichever ``looks_like_cell`` says."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "cell":
            return self.run_cell(image, name, notes)
        image, notes = self._prepare(image, notes)
        detections = self._detect(image, name, notes)
        if kind == "auto" and looks_like_cell(image.size, detections):
            return self.run_cell(image, name, notes)
        return self._smear(image, name, detections, notes)

    def _prepare(self, image: Image.Image, notes: list[str] | None) -> tuple[Image.Image, list[str]]:
        from hemcap.images import describe_mode, to_rgb

        notes = list(notes or [])
        if isinstance(image, Image.Image) and image.mode != "RGB":
            notes.append(f"converted {describe_mode(image.mode)} image to 8-bit RGB")
            return to_rgb(image), notes
        return as_pil_rgb(image), notes

    def _detect(self, image: Image.Image, name: str, notes: list[str]) -> list[Detection]:
        detections = self.detector(image, path=name or None)
        grey = any("grayscale" in note for note in notes)
        if grey and isinstance(self.detector, StainDetector) and not detections:
            notes.append("the stain detector needs colour, so it finds no cells in a grayscale image")
        return detections

    def _smear(self, image: Image.Image, name: str, detections: list[Detection], notes: list[str]) -> SmearReport:
        crops = crop_cells(image, detections, self.crop_size, self.margin)
        captions = self.engine.caption(crops)
        cells = [self._cell(number, detection, caption, crop)
                 for number, (detection, caption, crop) in enumerate(zip(detections, captions, crops), 1)]
        return self._report(name, image.size, cells, notes, "smear")

    def _cell(self, index: int, detection: Detection | None, caption, crop: Image.Image) -> CellReport:
        confidences = {k: None if v is None else round(float(v), 4) for k, v in caption.confidences.items()}
        contradictions = {k: list(v) for k, v in caption.contradictions.items()}
        flags = cell_flags(caption.attributes, confidences, contradictions, self.cell_type_field, self.min_confidence)
        box = _pixel_box(detection.box) if detection else None
        score = round(float(detection.score), 4) if detection else None
        return CellReport(index, box, score, caption.text, dict(caption.attributes), confidences, contradictions,
                          flags, crop)

    def _report(self, name: str, size: tuple[int, int], cells: list[CellReport], notes: list[str],
                kind: str) -> SmearReport:
        table = differential(cells, self.cell_types, self.cell_type_field)
        flagged = [cell.index for cell in cells if cell.flags]
        return SmearReport(str(name), int(size[0]), int(size[1]), cells, table, flagged, notes, kind)


def engine_input_size(engine) -> int:
    """The side of the square images the captioner takes (its processor resizes to it anyway)."""
    backend = getattr(engine, "backend", None)
    try:
        return max(backend.image_size)
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


# ------------------------------------------------------------------------------ overlay

# Distinct on a pink-and-violet smear; cell types take them in schema order.
PALETTE = [(0, 114, 178), (0, 158, 115), (213, 94, 0), (204, 121, 167), (86, 180, 233), (230, 159, 0),
           (0, 0, 0), (120, 60, 160)]
UNCLASSIFIED_COLOUR = (110, 110, 110)
FLAG_COLOUR = (255, 214, 0)


def draw_overlay(image: Image.Image, report: SmearReport) -> Image.Image:
    """The image with each cell's box, number and cell type; flagged cells get a yellow outer
    frame and a yellow '!' tab. A footer line gives the differential. Lines and text scale with the
    image (2 px lines and 16 px text at 640x480)."""
    from PIL import ImageDraw

    canvas = as_pil_rgb(image).copy()
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) / 240))
    font = _font(max(12, round(min(canvas.size) / 30)))
    colours = _type_colours(report)
    for cell in report.cells:
        box = cell.box or (0, 0, canvas.width - 1, canvas.height - 1)
        cell_type = _cell_type(cell, report)
        colour = colours.get(cell_type, UNCLASSIFIED_COLOUR)
        if cell.flags:
            draw.rectangle(_grow(box, line, canvas.size), outline=FLAG_COLOUR, width=line)
        draw.rectangle(box, outline=colour, width=line)
        _label(draw, f"{cell.index} {cell_type}", box, colour, font, canvas.size, cell.box is None, bool(cell.flags))
    _footer(canvas, report, font)
    return canvas


def _type_colours(report: SmearReport) -> dict[str, tuple[int, int, int]]:
    names = [name for name in report.differential if name != UNCLASSIFIED]
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _cell_type(cell: CellReport, report: SmearReport) -> str:
    known = set(report.differential) - {UNCLASSIFIED}
    return next((value for value in cell.attributes.values() if value in known), UNCLASSIFIED)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _grow(box, by: int, size: tuple[int, int]):
    x0, y0, x1, y1 = box
    return max(0, x0 - by), max(0, y0 - by), min(size[0] - 1, x1 + by), min(size[1] - 1, y1 + by)


def _label(draw, text: str, box, colour, font, size: tuple[int, int], inside: bool, flagged: bool) -> None:
    """Text on a filled tab above the box's top-left corner (inside it when there is no room),
    followed by a yellow '!' tab when the cell is flagged."""
    tabs = [(text, colour)] + ([("!", FLAG_COLOUR)] if flagged else [])
    extents = [draw.textbbox((0, 0), t, font=font) for t, _ in tabs]
    widths = [right - left + 8 for left, _, right, _ in extents]
    height = max(bottom - top for _, top, _, bottom in extents) + 4
    x = min(max(0, box[0]), max(0, size[0] - sum(widths)))
    y = box[1] - height if box[1] - height >= 0 and not inside else box[1]
    for (tab, fill), (left, top, _, _), width in zip(tabs, extents, widths):
        draw.rectangle((x, y, x + width, y + height), fill=fill)
        draw.text((x + 4 - left, y + 2 - top), tab, fill=(0, 0, 0) if sum(fill) > 450 else (255, 255, 255), font=font)
        x += width


def _footer(canvas: Image.Image, report: SmearReport, font) -> None:
    """The differential on a translucent strip along the bottom edge."""
    from PIL import ImageDraw

    counts = ", ".join(f"{n} {name}" for name, n in report.counts().items())
    n = len(report.cells)
    text = f"{n} cell{'s' if n != 1 else ''}" + (f": {counts}" if counts else " found")
    text += f"; {len(report.flagged)} flagged (!)" if report.flagged else ""
    strip = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(strip)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    y = canvas.height - (bottom - top) - 6
    draw.rectangle((0, y, min(canvas.width, right - left + 8), canvas.height), fill=(255, 255, 255, 200))
    draw.text((4 - left, y + 3 - top), text, fill=(0, 0, 0, 255), font=font)
    canvas.paste(Image.alpha_composite(canvas.convert("RGBA"), strip).convert("RGB"))


# ------------------------------------------------------------------------------ files


def report_paths(out_dir: str | Path, stem: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    return {"json": out_dir / f"{stem}.json", "overlay": out_dir / f"{stem}_overlay.png",
            "crops": out_dir / f"{stem}_crops"}


def write_report(report: SmearReport, image: Image.Image, out_dir: str | Path, *, stem: str | None = None,
                 crops: bool = False) -> dict[str, Path]:
    """Write ``<stem>.json`` and ``<stem>_overlay.png`` (and ``<stem>_crops/<index>.png`` with
    ``crops``), each atomically; the JSON goes last, so a JSON on disk means a finished image.
    ``stem`` defaults to the image name's stem."""
    stem = stem or Path(report.image).stem or "image"
    paths = report_paths(out_dir, stem)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    _save_png(draw_overlay(image, report), paths["overlay"])
    written = {"overlay": paths["overlay"]}
    if crops:
        for cell in report.cells:
            if cell.crop is not None:
                _save_png(cell.crop, paths["crops"] / f"{cell.index}.png")
        written["crops"] = paths["crops"]
    written["json"] = write_json(paths["json"], report.to_dict())
    return written


def _save_png(image: Image.Image, path: Path) -> None:
    save_image(image, path, compress_level=1)  # 640x480: 40 ms, vs 160 ms at the default 6 (+13% size)


def read_report(path: str | Path) -> SmearReport | None:
    """The report a JSON file holds, or None when it is missing, unreadable or incomplete."""
    try:
        return SmearReport.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_complete(out_dir: str | Path, stem: str) -> bool:
    """Whether an image's results are all there: a readable report JSON and its overlay."""
    paths = report_paths(out_dir, stem)
    return paths["overlay"].is_file() and read_report(paths["json"]) is not None


def output_stems(paths: Sequence[Path]) -> list[str]:
    """One output name per image: its stem, or stem + a hash of its path where stems repeat."""
    import hashlib

    repeats = Counter(path.stem for path in paths)
    return [path.stem if repeats[path.stem] == 1 else f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
            for path in paths]


# ------------------------------------------------------------------------------ batches


def process_images(paths: Iterable[str | Path], out_dir: str | Path, pipeline: SmearPipeline, *, kind: str = "auto",
                   overwrite: bool = False, crops: bool = False, max_pixels: int | None = None,
                   progress: bool = True) -> dict:
    """Report on every image file named or inside a named folder; return the summary.

    Writes ``<stem>.json`` + ``<stem>_overlay.png`` per image into ``out_dir``, and ``summary.json``:
    the overall differential, per-image counts and every problem (unreadable files, other files in
    a folder, conversions). Images whose results are complete are skipped unless ``overwrite``, so
    an interrupted run resumes. One bad image is recorded and the rest goes on.

    Under ``accelerate launch`` each process takes its share of the images
    (``PartialState.split_between_processes``) and writes their results; the main process merges
    the summary once all are done. Every process returns the summary.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    state = process_state()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = list(_list_images(paths))
    images = [path for path, note in entries if note is None]
    jobs = list(zip(images, output_stems(images)))
    todo = jobs if overwrite else [job for job in jobs if not is_complete(out_dir, job[1])]
    state.wait_for_everyone()  # every process listed the same finished images before any writes more
    _to_device(pipeline.engine, state.device)
    with state.split_between_processes(todo) as mine:
        outcomes = _process_share(mine, out_dir, pipeline, kind, crops, max_pixels,
                                  progress and state.is_local_main_process)
    for outcome in outcomes:
        outcome["process"] = state.process_index
    write_json(out_dir / f".summary-part-{state.process_index}.json", outcomes)
    state.wait_for_everyone()
    if state.is_main_process:
        outcomes = _read_parts(out_dir, state.num_processes)
        order = [*pipeline.cell_types, UNCLASSIFIED]
        summary = merge_summary(entries, jobs, outcomes, out_dir, order)
        write_json(out_dir / "summary.json", {**summary, "processes": state.num_processes})
    state.wait_for_everyone()
    return json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))


def process_state():
    """accelerate's ``PartialState`` for this process. CPU processes started by ``accelerate launch
    --multi_gpu`` or ``torchrun`` on a machine without GPUs join a gloo group only when it is told
    ``cpu=True``, so it is, there; ``accelerate launch --cpu`` starts a single process."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or (launched and not torch.cuda.is_available()))


def _list_images(paths: Iterable[str | Path]):
    from hemcap.images import iter_images

    for path, note in iter_images([paths] if isinstance(paths, (str, Path)) else paths):
        yield Path(path), note


def _to_device(engine, device) -> None:
    """Move the captioner to this process's accelerator (each process has its own GPU), unless
    the engine was given a device of its own."""
    model = getattr(getattr(engine, "backend", None), "model", None)
    settings = getattr(engine, "settings", None)
    if model is None or device.type == "cpu" or getattr(settings, "device", None):
        return
    if next(model.parameters()).device != device:
        model.to(device)


def _process_share(jobs, out_dir: Path, pipeline: SmearPipeline, kind: str, crops: bool,
                   max_pixels: int | None, progress: bool) -> list[dict]:
    from tqdm import tqdm

    outcomes = []
    for path, stem in tqdm(jobs, desc="images", unit="image", disable=not progress):
        outcomes.append(process_one(path, stem, out_dir, pipeline, kind, crops, max_pixels))
    return outcomes


def process_one(path: Path, stem: str, out_dir: Path, pipeline: SmearPipeline, kind: str = "auto",
                crops: bool = False, max_pixels: int | None = None) -> dict:
    """Read, report on and write one image: ``{"file", "stem", "seconds"}`` plus ``"error"`` when it failed."""
    from hemcap.images import MAX_PIXELS, ImageError, load_rgb

    start, notes = time.perf_counter(), []
    outcome = {"file": str(path), "stem": stem}
    try:
        image = load_rgb(path, max_pixels=max_pixels or MAX_PIXELS, notes=notes)
        report = pipeline.run_auto(image, str(path), kind, notes=notes)
        write_report(report, image, out_dir, stem=stem, crops=crops)
    except ImageError as error:
        outcome["error"] = error.reason
    except (ValueError, OSError) as error:  # a detector's or processor's complaint about this image only
        outcome["error"] = f"{type(error).__name__}: {error}"
    if "error" in outcome:
        log.warning("%s: %s", path, outcome["error"])
    outcome["seconds"] = round(time.perf_counter() - start, 3)
    return outcome


def _read_parts(out_dir: Path, n: int) -> list[dict]:
    outcomes = []
    for rank in range(n):
        part = out_dir / f".summary-part-{rank}.json"
        outcomes += json.loads(part.read_text(encoding="utf-8"))
        part.unlink()
    return outcomes


def merge_summary(entries: Sequence[tuple[Path, str | None]], jobs: Sequence[tuple[Path, str]],
                  outcomes: Sequence[dict], out_dir: Path, order: Sequence[str] = ()) -> dict:
    """One summary of a run, from the reports on disk and this run's outcomes (``process_one``).

    ``entries`` are the ``(path, note)`` pairs of ``iter_images``, ``jobs`` the ``(path, stem)`` of
    its images. An image counts when its report is complete, written now or by an earlier run;
    ``order`` lists the cell types first in the differential."""
    from hemcap.images import NOT_AN_IMAGE

    errors = {o["file"]: o["error"] for o in outcomes if "error" in o}
    process = {o["file"]: o["process"] for o in outcomes if "process" in o}
    problems = [{"file": str(path), "skipped" if note == NOT_AN_IMAGE else "error": note}
                for path, note in entries if note is not None]
    per_image, total = [], Counter()
    for path, stem in jobs:
        report = None if str(path) in errors else read_report(report_paths(out_dir, stem)["json"])
        if report is None:
            problems.append({"file": str(path), "error": errors.get(str(path), "no report written")})
            continue
        total.update(report.counts())
        problems += [{"file": str(path), "note": note} for note in report.notes]
        per_image.append({"image": str(path), "report": f"{stem}.json", "kind": report.kind,
                          "cells": len(report.cells), "counts": report.counts(), "flagged": len(report.flagged),
                          "process": process.get(str(path))})  # None: written by an earlier run
    written = sum("error" not in o for o in outcomes)
    return {"images": len(jobs), "reports": len(per_image), "written": written, "reused": len(per_image) - written,
            "failed": len(jobs) - len(per_image), "not_images": len(entries) - len(jobs),
            "cells": sum(total.values()), "flagged_cells": sum(row["flagged"] for row in per_image),
            "differential": counts_table(total, order), "per_image": per_image, "problems": problems}


def summary_lines(summary: dict, out_dir: str | Path, width: int = 28) -> list[str]:
    """A short table of a run: one row per image (cells, flagged, cell types), the caption and
    attributes of images read as one cell, then the totals and problems."""
    lines = [f"{'image':<{width}} {'kind':<5} {'cells':>5} {'flagged':>7}  differential"]
    for row in summary["per_image"]:
        counts = ", ".join(f"{n} {name}" for name, n in row["counts"].items()) or "-"
        lines.append(f"{_fit(Path(row['image']).name, width):<{width}} {row['kind']:<5} {row['cells']:>5} "
                     f"{row['flagged']:>7}  {counts}")
        if row["kind"] == "cell":
            lines += _cell_lines(read_report(Path(out_dir) / row["report"]))
    total = ", ".join(f"{name} {r['count']} ({r['percent']}%)" for name, r in summary["differential"].items()
                      if r["count"]) or "none"
    lines.append(f"{summary['reports']} of {summary['images']} images reported ({summary['reused']} from an earlier "
                 f"run), {summary['cells']} cells, {summary['flagged_cells']} flagged: {total}")
    lines += [f"  {p['file']}: {p['error']}" for p in summary["problems"] if "error" in p]
    lines.append(f"wrote {Path(out_dir) / 'summary.json'} (its 'problems' lists every skipped file and conversion)")
    return lines


def _cell_lines(report: SmearReport | None) -> list[str]:
    if report is None or not report.cells:
        return []
    cell = report.cells[0]
    stated = ", ".join(f"{k}={v}" for k, v in cell.attributes.items() if v is not None) or "none"
    lines = [f"    caption: {cell.caption}", f"    attributes: {stated}"]
    return lines + ([f"    flags: {'; '.join(cell.flags)}"] if cell.flags else [])


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]
