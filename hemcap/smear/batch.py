"""The one batch runner: ``hemcap detect`` and ``hemcap caption`` both go through ``run_batch``.

``run_batch(paths, out_dir, task)`` lists every file named or inside a named folder
(``hemcap.images.iter_images``; other files are skipped with a note), names each image's outputs
by one rule (``output_stems``), reads each image as 8-bit RGB (conversions noted) and hands it to
``task``, which writes that image's outputs and returns a row. An image that cannot be read or
worked on is recorded with its reason and the batch goes on. Images whose outputs an earlier run
completed are reused (``Task.reuse``) unless ``overwrite``. Under ``accelerate launch`` each
process takes its share of the images (``PartialState.split_between_processes``); the shares'
outcomes merge into one summary (per-image rows and every problem), which the task completes and
the main process writes.

The two tasks:

- ``write_detections`` (``hemcap detect``): ``crops/<stem>_<n>.png``, ``detections.json`` (COCO,
  each box naming its crop) and ``problems.json``, built in a staging folder renamed into place;
- ``process_images`` (``hemcap caption``): ``<stem>.json`` + ``<stem>_overlay.png`` per image and
  ``summary.json``; resumable, and split across processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from PIL import Image

from hemcap.fileio import staging_dir, write_json
from hemcap.images import MAX_PIXELS, NOT_AN_IMAGE, ImageError, iter_images, load_rgb
from hemcap.smear.coco import coco_box, to_coco
from hemcap.smear.detect import Detector, StainDetector, crop_cells, find_cells
from hemcap.smear.pipeline import KINDS, SmearPipeline
from hemcap.smear.report import (UNCLASSIFIED, SmearReport, complete_report, counts_table, read_report,
                                 write_report)

log = logging.getLogger(__name__)

RUN_FILES = {"summary", "detections", "problems"}  # the run's own <name>.json beside the per-image outputs
PART = ".summary-part-{}.json"  # one process's outcomes, read by every process once all are written


class Job(NamedTuple):
    """One image and the stem its outputs are named by."""

    path: Path
    stem: str


class Task:
    """What a batch does with each image, and with the merged summary at the end."""

    def reuse(self, stem: str) -> dict | None:
        """The row of an earlier run's complete outputs named ``stem``; None: work on the image."""
        return None

    def __call__(self, image: Image.Image, path: Path, stem: str, notes: list[str]) -> dict:
        """Work on one image, write its outputs, return its row (JSON data; ``notes`` become problems)."""
        raise NotImplementedError

    def summarise(self, summary: dict) -> dict:
        """The merged summary with the task's own totals (on every process)."""
        return summary

    def write(self, summary: dict) -> None:
        """Write the run's own files from the summary (on the main process only)."""


class LocalState:
    """A batch in this process alone: the part of accelerate's ``PartialState`` ``run_batch`` uses."""

    process_index, num_processes = 0, 1
    is_main_process = is_local_main_process = True

    def wait_for_everyone(self) -> None:
        """Nobody to wait for."""

    @contextlib.contextmanager
    def split_between_processes(self, items):
        """All of them."""
        yield items


def process_state():
    """accelerate's ``PartialState`` for this process. CPU processes started by ``accelerate launch
    --multi_gpu`` or ``torchrun`` on a machine without GPUs join a gloo group only when it is told
    ``cpu=True``, so it is, there; ``accelerate launch --cpu`` starts a single process."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or (launched and not torch.cuda.is_available()))


# ------------------------------------------------------------------------------ the runner


def run_batch(paths: Iterable[str | Path] | str | Path, out_dir: str | Path, task: Task, *, overwrite: bool = False,
              max_pixels: int | None = None, progress: bool = True, state=None) -> dict:
    """Run ``task`` over every image named or inside a named folder; every process returns the summary.
    ``state``: accelerate's ``PartialState`` to split the images between processes (default: this one alone)."""
    state = state or LocalState()
    entries, jobs = plan(paths)
    earlier = {} if overwrite else {job.stem: row for job in jobs if (row := task.reuse(job.stem)) is not None}
    state.wait_for_everyone()  # every process listed the same finished images before any writes more
    with state.split_between_processes([job for job in jobs if job.stem not in earlier]) as mine:
        outcomes = run_share(mine, task, max_pixels, progress and state.is_local_main_process)
    for outcome in outcomes:
        outcome["process"] = state.process_index
    outcomes = gather(outcomes, Path(out_dir), state)
    summary = task.summarise({**merge_summary(entries, jobs, outcomes, earlier), "processes": state.num_processes})
    if state.is_main_process:
        task.write(summary)
    state.wait_for_everyone()  # the run's files exist before any process returns
    return summary


def plan(paths: Iterable[str | Path] | str | Path) -> tuple[list[tuple[Path, str | None]], list[Job]]:
    """``(entries, jobs)``: every file with its note (``iter_images``), and the images with their stems."""
    entries = list(iter_images([paths] if isinstance(paths, (str, Path)) else paths))
    images = [path for path, note in entries if note is None]
    return entries, [Job(path, stem) for path, stem in zip(images, output_stems(images))]


def output_stems(paths: Sequence[Path]) -> list[str]:
    """One output name per image: its stem, or stem + a hash of its path where stems repeat or name
    one of the run's own files (an image called summary.jpg would lose its report to summary.json)."""
    repeats = Counter(path.stem.lower() for path in paths)  # x.jpg and X.png collide on case-blind disks
    return [path.stem if repeats[path.stem.lower()] == 1 and path.stem.lower() not in RUN_FILES
            else f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}" for path in paths]


def run_share(jobs: Sequence[Job], task: Task, max_pixels: int | None, progress: bool) -> list[dict]:
    """This process's outcomes, one per job, with a progress bar when ``progress``."""
    from tqdm import tqdm

    return [run_one(job, task, max_pixels) for job in tqdm(jobs, desc="images", unit="image", disable=not progress)]


def run_one(job: Job, task: Task, max_pixels: int | None = None) -> dict:
    """Read one image and hand it to ``task``: ``{"file", "stem", "seconds"}`` plus its ``row`` or an ``error``."""
    start, notes = time.perf_counter(), []
    outcome = {"file": str(job.path), "stem": job.stem}
    try:
        image = load_rgb(job.path, max_pixels=max_pixels or MAX_PIXELS, notes=notes)
        outcome["row"] = task(image, job.path, job.stem, notes)
    except ImageError as error:
        outcome["error"] = error.reason
    except (ValueError, OSError) as error:  # a detector's or captioner's complaint about this image only
        outcome["error"] = f"{type(error).__name__}: {error}"
    if "error" in outcome:
        log.warning("%s: %s", job.path, outcome["error"])
    outcome["seconds"] = round(time.perf_counter() - start, 3)
    return outcome


def gather(outcomes: list[dict], out_dir: Path, state) -> list[dict]:
    """Every process's outcomes, on every process: each writes its own to a file in ``out_dir``."""
    if state.num_processes == 1:
        return outcomes
    write_json(out_dir / PART.format(state.process_index), outcomes)
    state.wait_for_everyone()
    parts = [out_dir / PART.format(rank) for rank in range(state.num_processes)]
    merged = [outcome for part in parts for outcome in json.loads(part.read_text(encoding="utf-8"))]
    state.wait_for_everyone()  # every process read every part before the main one removes them
    if state.is_main_process:
        for part in parts:
            part.unlink()
    return merged


def merge_summary(entries: Sequence[tuple[Path, str | None]], jobs: Sequence[Job], outcomes: Sequence[dict],
                  earlier: dict[str, dict]) -> dict:
    """One summary of a run from this run's ``outcomes`` (``run_one``, all processes) and the rows of
    outputs an ``earlier`` run completed (by stem): per-image rows and every problem."""
    now = {outcome["stem"]: outcome for outcome in outcomes}
    problems = [{"file": str(path), "skipped" if note == NOT_AN_IMAGE else "error": note}
                for path, note in entries if note is not None]
    rows = []
    for job in jobs:
        outcome = now.get(job.stem, {"row": earlier.get(job.stem), "process": None})
        if outcome.get("row") is None:
            problems.append({"file": str(job.path), "error": outcome.get("error", "no output written")})
            continue
        row = dict(outcome["row"])
        problems += [{"file": str(job.path), "note": note} for note in row.pop("notes", [])]
        rows.append({"image": str(job.path), **row, "process": outcome["process"]})  # process None: an earlier run
    written = sum("row" in outcome for outcome in outcomes)
    return {"images": len(jobs), "written": written, "reused": len(rows) - written, "failed": len(jobs) - len(rows),
            "not_images": len(entries) - len(jobs), "per_image": rows, "problems": problems}


# ------------------------------------------------------------------------------ hemcap detect


class DetectTask(Task):
    """Each image's cells as square crops ``crops/<stem>_<n>.png`` in ``folder``; COCO boxes and problems at the end."""

    def __init__(self, detector: Detector, folder: Path, crop_size: int | None = 384, margin: float = 0.6,
                 red_cell_px: float | None = None):
        self.detector, self.folder, self.crop_size, self.margin = detector, Path(folder), crop_size, margin
        self.red_cell_px = red_cell_px  # None: measured on each image

    def __call__(self, image: Image.Image, path: Path, stem: str, notes: list[str]) -> dict:
        detections, red_cells = find_cells(self.detector, image, path, notes, self.red_cell_px)
        names = [f"crops/{stem}_{number}.png" for number in range(len(detections))]
        (self.folder / "crops").mkdir(exist_ok=True)
        for name, crop in zip(names, crop_cells(image, detections, self.crop_size, self.margin)):
            crop.save(self.folder / name)  # inside the staging folder: it appears whole with the rest
        boxes = [{**coco_box(detection), "crop": name} for detection, name in zip(detections, names)]
        return {"width": image.width, "height": image.height, "red_cells": red_cells.as_dict(),
                "cells": len(detections), "boxes": boxes, "notes": notes}

    def write(self, summary: dict) -> None:
        write_json(self.folder / "detections.json", to_coco(summary["per_image"]))
        write_json(self.folder / "problems.json", summary["problems"])


def write_detections(paths: Iterable[str | Path], out_dir: str | Path, detector: Detector | None = None,
                     crop_size: int | None = 384, margin: float = 0.6, overwrite: bool = False,
                     max_pixels: int | None = None, red_cell_px: float | None = None) -> tuple[Path, dict]:
    """Detect cells in every image and write ``out_dir`` atomically (a staging folder, then a rename);
    return it and the batch's summary (``merge_summary``):

    - ``detections.json``: COCO boxes with scores for the images that were read; each
      annotation names its crop;
    - ``crops/<stem>_<n>.png``: one square crop per cell, ``crop_size`` pixels a side (``output_stems``);
    - the summary's per-image rows: size, red-cell size used (``red_cell_px`` given, else measured
      on the image) and the number of cells;
    - ``problems.json``: ``{"file", "error"}`` for each file that could not be read,
      ``{"file", "skipped"}`` for a folder's other files, ``{"file", "note"}`` for conversions
      (grayscale, 16-bit, alpha, CMYK).
    """
    out_dir = Path(out_dir)
    with staging_dir(out_dir, overwrite) as staging:
        task = DetectTask(detector or StainDetector(), staging, crop_size, margin, red_cell_px)
        summary = run_batch(paths, staging, task, max_pixels=max_pixels, progress=False)
    return out_dir, summary


# ------------------------------------------------------------------------------ hemcap caption


class CaptionTask(Task):
    """Each image's report as ``<stem>.json`` + ``<stem>_overlay.png`` in ``out_dir``; ``summary.json`` at the end."""

    def __init__(self, pipeline: SmearPipeline, out_dir: Path, kind: str = "auto", crops: bool = False):
        self.pipeline, self.out_dir, self.kind, self.crops = pipeline, Path(out_dir), kind, crops

    def reuse(self, stem: str) -> dict | None:
        report = complete_report(self.out_dir, stem)
        return None if report is None else report_row(report, stem)

    def __call__(self, image: Image.Image, path: Path, stem: str, notes: list[str]) -> dict:
        report = self.pipeline.run_auto(image, str(path), self.kind, notes=notes)
        write_report(report, image, self.out_dir, stem=stem, crops=self.crops)
        return report_row(report, stem)

    def summarise(self, summary: dict) -> dict:
        rows, total = summary["per_image"], Counter()
        for row in rows:
            total.update(row["counts"])
        order = [*self.pipeline.cell_types, UNCLASSIFIED]
        return {**summary, "reports": len(rows), "cells": sum(total.values()),
                "flagged_cells": sum(row["flagged"] for row in rows), "differential": counts_table(total, order),
                "unlike_training": sum(bool(row.get("warning")) for row in rows)}

    def write(self, summary: dict) -> None:
        write_json(self.out_dir / "summary.json", summary)


def report_row(report: SmearReport, stem: str) -> dict:
    """A report's row in the summary: its file, kind, cell counts, flagged cells, notes and domain warning."""
    return {"report": f"{stem}.json", "kind": report.kind, "cells": len(report.cells), "counts": report.counts(),
            "flagged": len(report.flagged), "notes": list(report.notes), "warning": report.warning}


def process_images(paths: Iterable[str | Path], out_dir: str | Path, pipeline: SmearPipeline, *, kind: str = "auto",
                   overwrite: bool = False, crops: bool = False, max_pixels: int | None = None,
                   progress: bool = True) -> dict:
    """Report on every image file named or inside a named folder; return the summary.

    Writes ``<stem>.json`` + ``<stem>_overlay.png`` per image into ``out_dir``, and ``summary.json``:
    the overall differential, per-image counts and every problem (unreadable files, other files in
    a folder, conversions). Images whose results are complete are skipped unless ``overwrite``, so
    an interrupted run resumes. One bad image is recorded and the rest goes on.

    Under ``accelerate launch`` each process takes its share of the images and writes their
    results; the main process writes the summary once all are done. Every process returns it.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    state = process_state()
    _to_device(pipeline.engine, state.device)
    task = CaptionTask(pipeline, Path(out_dir), kind, crops)
    return run_batch(paths, out_dir, task, overwrite=overwrite, max_pixels=max_pixels, progress=progress, state=state)


def _to_device(engine, device) -> None:
    """Move the captioner to this process's accelerator (each process has its own GPU), unless
    the engine was given a device of its own."""
    model = getattr(getattr(engine, "backend", None), "model", None)
    settings = getattr(engine, "settings", None)
    if model is None or device.type == "cpu" or getattr(settings, "device", None):
        return
    if next(model.parameters()).device != device:
        model.to(device)


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
        if row.get("warning"):
            lines.append(f"    warning: {row['warning']}")
    total = ", ".join(f"{name} {r['count']} ({r['percent']}%)" for name, r in summary["differential"].items()
                      if r["count"]) or "none"
    lines.append(f"{summary['reports']} of {summary['images']} images reported ({summary['reused']} from an earlier "
                 f"run), {summary['cells']} cells, {summary['flagged_cells']} flagged: {total}")
    if summary.get("unlike_training"):
        lines.append(f"{summary['unlike_training']} images look unlike the model's training data: check every caption")
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
