"""What the pipeline says about one image: each cell's box, caption, attributes, confidences and
flags, the differential count, and the files a report is saved as (``<stem>.json`` and
``<stem>_overlay.png``, the JSON last, so a JSON on disk means a finished image)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from hemcap.fileio import save_image, write_json
from hemcap.smear.overlay import draw_overlay

UNCLASSIFIED = "unclassified"  # differential row for cells whose caption names no (or no single) cell type
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
    red_cells: dict | None = None  # the red-cell size used: px, origin (estimated/given/default), confidence, ...
    domain: dict | None = None  # field cropped, stain normalisation, domain shift and warning (hemcap.domain)

    def to_dict(self) -> dict:
        return {"image": self.image, "width": self.width, "height": self.height, "kind": self.kind,
                "red_cells": self.red_cells, "domain": self.domain, "cells": [cell.to_dict() for cell in self.cells],
                "differential": self.differential, "flagged": list(self.flagged), "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: dict) -> "SmearReport":
        missing = REPORT_KEYS - set(data)
        if missing:
            raise ValueError(f"not a smear report: keys {sorted(missing)} missing")
        return cls(data["image"], data["width"], data["height"], [CellReport.from_dict(c) for c in data["cells"]],
                   data["differential"], list(data["flagged"]), list(data["notes"]), data["kind"],
                   data.get("red_cells"), data.get("domain"))  # older reports have neither

    @property
    def warning(self) -> str | None:
        """The domain-shift warning with its reasons, when the image looks unlike the training data."""
        shift = (self.domain or {}).get("shift") or {}
        return f"{shift['warning']}: {'; '.join(shift['reasons'])}" if shift.get("warning") else None

    def counts(self) -> dict[str, int]:
        """Cell type -> count, only the types present."""
        return {name: row["count"] for name, row in self.differential.items() if row["count"]}

    def cell_types(self) -> list[str]:
        """The differential's cell types, in schema order, without ``unclassified``."""
        return [name for name in self.differential if name != UNCLASSIFIED]

    def cell_type(self, cell: CellReport) -> str:
        """The cell type a cell's caption states, else ``unclassified``."""
        known = set(self.cell_types())
        return next((value for value in cell.attributes.values() if value in known), UNCLASSIFIED)


def describe_red_cells(red_cells: dict | None) -> str:
    """The red-cell size a report used, in words: "red cells 97 px (estimated, confidence 0.86)"."""
    if not red_cells or red_cells.get("px") is None:
        return "red-cell size not recorded"
    origin = red_cells.get("origin", "")
    if origin == "estimated":
        origin = f"estimated: {red_cells.get('method') or 'measured'}, confidence {red_cells['confidence']:.2f}"
    return f"red cells {red_cells['px']:.0f} px ({origin})"


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


# ------------------------------------------------------------------------------ files


def report_paths(out_dir: str | Path, stem: str) -> dict[str, Path]:
    """Where an image's report JSON, overlay and crops folder go."""
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


def complete_report(out_dir: str | Path, stem: str) -> SmearReport | None:
    """An image's report when its results are all there (a readable report JSON and its overlay), else None."""
    paths = report_paths(out_dir, stem)
    return read_report(paths["json"]) if paths["overlay"].is_file() else None


def is_complete(out_dir: str | Path, stem: str) -> bool:
    """Whether an image's results are all there: a readable report JSON and its overlay."""
    return complete_report(out_dir, stem) is not None
