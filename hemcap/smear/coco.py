"""COCO detection JSON of a batch: one image entry per image read, one box per cell with its score
and the name of its crop, so another tool (or ``hemcap.smear.saved.CocoPredictions``) can read them."""

from __future__ import annotations

from typing import Iterable

from hemcap.smear.detect import Detection


def coco_box(detection: Detection) -> dict:
    """A detection as a COCO annotation's box fields: ``bbox`` ``[x, y, w, h]``, area and score."""
    x0, y0, x1, y1 = (round(float(v), 2) for v in detection.box)
    return {"bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)], "area": round((x1 - x0) * (y1 - y0), 2),
            "iscrowd": 0, "score": float(detection.score)}


def to_coco(images: Iterable[dict], label: str = "WBC") -> dict:
    """A COCO detection dataset from rows ``{"image", "width", "height", "boxes": [coco_box(...), ...]}``."""
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": label}]}
    for image_id, row in enumerate(images, 1):
        extra = {"red_cells": row["red_cells"]} if "red_cells" in row else {}  # the magnification the boxes used
        coco["images"].append({"id": image_id, "file_name": row["image"], "width": row["width"],
                               "height": row["height"], **extra})
        for box in row["boxes"]:
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "category_id": 1, **box})
    return coco
