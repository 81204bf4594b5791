"""Smears: find the white cells, crop and caption them, and report per cell and per smear.

- ``magnification``: a smear's red-cell diameter (its magnification): estimated, given or defaulted;
- ``detect``: the ``Detector`` protocol, the weight-free ``StainDetector``, square cell crops;
- ``learned``: the learned ``CenterNetDetector`` and its folder; ``train_detector`` trains it;
- ``saved``: boxes other tools saved (YOLO txt, COCO JSON), ``build_detector``;
- ``labelled`` and ``scoring``: labelled smears (TXL-PBC, BCCD) and AP / recall / IoU per source lab;
- ``cell_types``: cell types scored end to end on a lab's own labelled smears (``hemcap eval-smears``);
- ``coco``: COCO detection JSON of a batch;
- ``report``: ``SmearReport`` and ``CellReport``, the differential count, flags, report files;
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
from hemcap.smear.labelled import LabelledSmear, load_smears
from hemcap.smear.learned import CenterNetDetector, DetectorInfo, load_detector
from hemcap.smear.magnification import (DEFAULT_RED_CELL_PX, RedCellSize, estimate_red_cell_px, measure_red_cells,
                                        resolve_red_cell_size)
from hemcap.smear.overlay import draw_overlay
from hemcap.smear.pipeline import SmearPipeline, looks_like_cell
from hemcap.smear.report import (UNCLASSIFIED, CellReport, SmearReport, cell_flags, counts_table, describe_red_cells,
                                 differential, is_complete, read_report, write_report)
from hemcap.smear.saved import CocoPredictions, MinScore, YoloPredictions, build_detector, read_yolo
from hemcap.smear.scoring import detection_metrics, metrics_by_source

__all__ = [
    "DEFAULT_RED_CELL_PX", "UNCLASSIFIED", "CellReport", "CenterNetDetector", "CocoPredictions", "Detection",
    "Detector", "DetectorInfo", "LabelledSmear", "MinScore", "RedCellSize", "SmearPipeline", "SmearReport",
    "StainDetector", "StainDetectorConfig", "YoloPredictions", "build_detector", "cell_flags", "counts_table",
    "crop_cells", "describe_red_cells", "detect", "detection_metrics", "differential", "draw_overlay",
    "estimate_red_cell_px", "find_cells", "is_complete", "load_detector", "load_smears", "looks_like_cell",
    "measure_red_cells", "metrics_by_source", "output_stems", "process_images", "process_state", "read_report",
    "read_yolo", "resolve_red_cell_size", "run_batch", "summary_lines", "to_coco", "write_detections",
    "write_report",
]
