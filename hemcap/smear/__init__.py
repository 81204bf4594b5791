"""Smears: find the white cells, crop and caption them, and report per cell and per smear.

- ``detect``: the ``Detector`` protocol, the weight-free ``StainDetector``, square cell crops;
- ``saved``: boxes other tools saved (YOLO txt, COCO JSON), ``build_detector``;
- ``coco``: COCO detection JSON of a batch;
- ``report``: ``SmearReport`` and ``CellReport``, the differential count, flags, report files;
- ``magnification``: ``estimate_red_cell_px``: the red-cell diameter, hence the magnification, of a smear;
- ``overlay``: the numbered-box picture a reviewer checks;
- ``pipeline``: ``SmearPipeline``: detector + captioner, smear or single cell;
- ``batch``: the one batch runner behind ``hemcap detect`` (``write_detections``) and
  ``hemcap caption`` (``process_images``).
"""

from hemcap.smear.batch import (output_stems, process_images, process_state, run_batch, summary_lines,
                                write_detections)
from hemcap.smear.coco import to_coco
from hemcap.smear.detect import (Detection, Detector, StainDetector, StainDetectorConfig, crop_cells, detect,
                                 find_cells)
from hemcap.smear.magnification import (DEFAULT_RED_CELL_PX, RedCellSize, estimate_red_cell_px,
                                        resolve_red_cell_size)
from hemcap.smear.overlay import draw_overlay
from hemcap.smear.pipeline import SmearPipeline, looks_like_cell
from hemcap.smear.report import (UNCLASSIFIED, CellReport, SmearReport, cell_flags, counts_table, differential,
                                 is_complete, read_report, write_report)
from hemcap.smear.saved import CocoPredictions, MinScore, YoloPredictions, build_detector, read_yolo

__all__ = [
    "DEFAULT_RED_CELL_PX", "RedCellSize", "estimate_red_cell_px", "resolve_red_cell_size", "UNCLASSIFIED", "CellReport", "CocoPredictions", "Detection", "Detector", "MinScore", "SmearPipeline",
    "SmearReport", "StainDetector", "StainDetectorConfig", "YoloPredictions", "build_detector", "cell_flags",
    "counts_table", "crop_cells", "detect", "differential", "draw_overlay", "find_cells", "is_complete",
    "looks_like_cell", "output_stems", "process_images", "process_state", "read_report", "read_yolo", "run_batch",
    "summary_lines", "to_coco", "write_detections", "write_report",
]
