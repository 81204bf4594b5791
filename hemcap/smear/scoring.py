"""How well a detector finds the labelled white cells: AP@0.5 (pycocotools' COCOeval), recall@0.5
and the mean IoU of the matched boxes, pooled and per source lab."""

from __future__ import annotations

import contextlib
import io
from typing import Mapping, Sequence

import numpy as np

from hemcap.smear.detect import Detection
from hemcap.smear.labelled import WBC, LabelledSmear


def detection_metrics(smears: Sequence[LabelledSmear], found: Mapping[str, list[Detection]],
                      label: str = WBC) -> dict:
    """``smears``' ``label`` boxes against ``found`` (smear name -> detections): counts, AP@0.5,
    recall@0.5 and mean IoU of the pairs COCOeval matched at IoU 0.5."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth, results = _ground_truth(smears, label), _results(smears, found)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results) if results else COCO(), "bbox")
        evaluation.params.iouThrs = np.array([0.5])
        evaluation.params.areaRng, evaluation.params.areaRngLbl = [[0, 1e10]], ["all"]
        evaluation.params.maxDets = [100]
        evaluation.evaluate()
        evaluation.accumulate()
    precision = evaluation.eval["precision"][0, :, 0, 0, 0]
    ious, n_truth = _matched_ious(evaluation), len(truth["annotations"])
    return {"smears": len(smears), "wbc": n_truth, "detections": len(results),
            "ap50": float(precision[precision > -1].mean()) if results and n_truth else 0.0,
            "recall50": len(ious) / max(n_truth, 1), "mean_iou": float(np.mean(ious)) if ious else 0.0}


def metrics_by_source(smears: Sequence[LabelledSmear], found: Mapping[str, list[Detection]],
                      label: str = WBC) -> dict[str, dict]:
    """``detection_metrics`` per source lab, then ``"all"`` pooled over every smear."""
    sources = sorted({smear.source for smear in smears})
    table = {source: detection_metrics([s for s in smears if s.source == source], found, label) for source in sources}
    table["all"] = detection_metrics(smears, found, label)
    return table


def _ground_truth(smears: Sequence[LabelledSmear], label: str) -> dict:
    images, annotations = [], []
    for image_id, smear in enumerate(smears, 1):
        images.append({"id": image_id, "file_name": smear.path.name, "width": smear.size[0], "height": smear.size[1]})
        for x0, y0, x1, y1 in smear.of(label):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": label}]}


def _results(smears: Sequence[LabelledSmear], found: Mapping[str, list[Detection]]) -> list[dict]:
    return [{"image_id": image_id, "category_id": 1, "score": d.score, "bbox": [d.box[0], d.box[1], d.width, d.height]}
            for image_id, smear in enumerate(smears, 1) for d in found.get(smear.name, [])]


def _matched_ious(evaluation) -> list[float]:
    """IoU of every ground-truth box COCOeval matched at IoU 0.5."""
    from pycocotools import mask

    ious = []
    for image in evaluation.evalImgs:
        if image is None:
            continue
        for gt_id, dt_id in zip(image["gtIds"], image["gtMatches"][0]):
            if dt_id:
                gt_box = evaluation.cocoGt.anns[gt_id]["bbox"]
                dt_box = evaluation.cocoDt.anns[int(dt_id)]["bbox"]
                ious.append(float(mask.iou([dt_box], [gt_box], [0])[0, 0]))
    return ious
