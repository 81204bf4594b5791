"""A learned white-cell detector small enough to train from random weights on a CPU.

The network is CenterNet-style (Zhou et al. 2019, "Objects as Points"): a heat map of cell centres
and, at each centre, the box's offset and size, on a grid of stride 4. It never sees the image at
its own magnification: every smear is resized so its red cells are ``work_red_cell_px`` across
(``hemcap.smear.magnification``: estimated from the image, or given), so a lab's magnification is
the one thing it need not learn. Its input is the image divided by its own background colour, so
a lamp's or camera's colour cast is gone before the network sees it; training's colour
augmentation (``hemcap.smear.train_detector``) covers the stain.

A detector folder holds ``detector.safetensors`` and ``hemcap_detector.json`` (``DetectorInfo``),
which says everything about it: the network's shape, the working magnification, the score
threshold and how it was trained. ``load_detector(folder)`` needs nothing else.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from hemcap.smear.detect import Box, Detection, ImageLike, as_pil_rgb
from hemcap.smear.labelled import RBC, WBC
from hemcap.smear.magnification import (MIN_CELLS, RedCellSize, estimate_red_cell_px,
                                        resolve_red_cell_size)

WEIGHTS, INFO = "detector.safetensors", "hemcap_detector.json"
INFO_VERSION = 1
STRIDE = 4  # output grid: one cell per 4 working pixels (a white cell spans 10-20 of them)
RED_CELL_MIN_SCORE = 0.5  # red cells measured for the magnification score at least this (0.3: 0.05 worse)
RED_CELL_PASSES = 4  # most looks at the red cells after the first
FIELD_SHARES = (0.12, 0.2, 0.32)  # first guesses, x the image's short side (TXL-PBC's four labs: 0.18-0.22)


@dataclass(frozen=True)
class NetConfig:
    """The network's shape."""

    widths: tuple[int, ...] = (16, 32, 64, 96)  # channels at strides 2, 4, 8, 16
    work_red_cell_px: float = 24.0  # images are resized so red cells span this many px (BCCD: 97 -> 24, x0.25)
    classes: tuple[str, ...] = (WBC, RBC)  # one centre map each; red cells give the magnification


@dataclass
class DetectorInfo:
    """Everything about a saved detector (``hemcap_detector.json``)."""

    kind: str = "centernet"
    net: NetConfig = field(default_factory=NetConfig)
    min_score: float = 0.1  # detections scoring below are dropped
    max_detections: int = 50  # most cells reported per smear
    training: dict = field(default_factory=dict)  # data, steps, minutes, validation figures
    version: int = INFO_VERSION


# ------------------------------------------------------------------------------ network


def _conv(cin: int, cout: int, stride: int = 1):
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def build_net(config: NetConfig):
    """The CenterNet-style network: a 4-stage encoder to stride 16, a light top-down path back to
    stride 4, and one head: a centre logit map per class, then x/y offset and log width/height in
    red cells, shared by the classes."""
    import torch.nn as nn

    class CenterNet(nn.Module):
        def __init__(self, widths: tuple[int, ...], classes: int):
            super().__init__()
            chans = (3, *widths)
            self.stages = nn.ModuleList(
                nn.Sequential(_conv(chans[i], chans[i + 1], 2), _conv(chans[i + 1], chans[i + 1])) for i in range(4))
            self.lateral = nn.ModuleList(nn.Conv2d(widths[i], widths[1], 1) for i in (1, 2, 3))
            self.head = nn.Sequential(_conv(widths[1], widths[1]), nn.Conv2d(widths[1], classes + 4, 1))
            self.head[-1].bias.data[:classes] = -4.0  # start near p = 0.02: few centres, stable focal loss

        def forward(self, x):
            feats = []
            for stage in self.stages:
                x = stage(x)
                feats.append(x)
            top = self.lateral[2](feats[3])
            for level, lateral in ((2, self.lateral[1]), (1, self.lateral[0])):
                top = nn.functional.interpolate(top, size=feats[level].shape[-2:], mode="nearest")
                top = top + lateral(feats[level])
            return self.head(top)

    return CenterNet(config.widths, len(config.classes))


# ------------------------------------------------------------------------------ inputs and outputs


def white_balance(pixels: np.ndarray) -> np.ndarray:
    """The image divided by its background colour (median of the brightest quarter), centred: float32 CHW."""
    values = pixels.astype(np.float32)
    brightness = values.sum(axis=-1)
    background = np.median(values[brightness >= np.quantile(brightness, 0.75)], axis=0)
    balanced = values / np.maximum(background, 1.0) - 0.75  # background -> 0.25, nuclei -> about -0.4
    return np.ascontiguousarray(balanced.transpose(2, 0, 1))


def work_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """The working image's size: scaled by ``factor``, then padded up to a multiple of 16 by the caller."""
    return max(16, round(size[0] * factor)), max(16, round(size[1] * factor))


def padded(tensor, multiple: int = 16):
    """Pad a CHW tensor's height and width up to a multiple of ``multiple`` with the background (0.25)."""
    import torch.nn.functional as F

    height, width = tensor.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    return F.pad(tensor, (0, pad_w, 0, pad_h), value=0.25) if pad_h or pad_w else tensor


def decode(maps, config: NetConfig, label: str, min_score: float, max_detections: int) -> list[tuple[Box, float]]:
    """Boxes of ``label`` in working pixels and their scores, from one image's output maps (peaks of its centre map)."""
    import torch
    import torch.nn.functional as F

    classes = len(config.classes)
    heat = torch.sigmoid(maps[config.classes.index(label)])
    peaks = heat == F.max_pool2d(heat[None, None], 3, 1, 1)[0, 0]
    scores = torch.where(peaks, heat, torch.zeros_like(heat)).flatten()
    top = torch.topk(scores, min(max_detections, scores.numel()))
    width = heat.shape[1]
    found = []
    for score, index in zip(top.values.tolist(), top.indices.tolist()):
        if score < min_score:
            break
        y, x = divmod(index, width)
        found.append((_box_at(maps[classes:, y, x].tolist(), x, y, config.work_red_cell_px), score))
    return found


def _box_at(values: list[float], x: int, y: int, red_cell_px: float) -> Box:
    dx, dy, log_w, log_h = values
    cx, cy = (x + dx) * STRIDE, (y + dy) * STRIDE
    w, h = np.exp(log_w) * red_cell_px, np.exp(log_h) * red_cell_px
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


# ------------------------------------------------------------------------------ the detector


class CenterNetDetector:
    """``CenterNetDetector(net, info)(image, red_cell_px=...) -> list[Detection]``. Red cells of
    unknown size are measured on the image by ``estimate_red_cells``."""

    def __init__(self, net, info: DetectorInfo):
        self.net, self.info = net.eval(), info

    def __call__(self, image: ImageLike, path: str | Path | None = None,
                 red_cell_px: float | None = None) -> list[Detection]:
        picture = as_pil_rgb(image)
        if red_cell_px is None:
            red_cell_px = resolve_red_cell_size(picture, estimate=self.estimate_red_cells).px
        return self.find(picture, WBC, red_cell_px, self.info.min_score)

    def find(self, picture: Image.Image, label: str, red_cell_px: float, min_score: float) -> list[Detection]:
        """``label``'s boxes in input pixels, the image looked at as if its red cells were ``red_cell_px`` across."""
        import torch

        factor = self.info.net.work_red_cell_px / red_cell_px
        small = picture.resize(work_size(picture.size, factor), Image.BILINEAR)
        with torch.inference_mode():
            maps = self.net(padded(torch.from_numpy(white_balance(np.asarray(small))))[None])[0]
        boxes = decode(maps, self.info.net, label, min_score, self.info.max_detections)
        fx, fy = picture.width / small.width, picture.height / small.height
        return [Detection(_clip((b[0] * fx, b[1] * fy, b[2] * fx, b[3] * fy), picture.size), round(s, 4), label)
                for b, s in boxes]

    def estimate_red_cells(self, image: ImageLike) -> RedCellSize:
        """The red cells' size as this network sees them: looked for at the disc estimate and at
        three magnifications from the image's size, kept where it finds the most, then looked for
        again at what it measured until that moves by under 3 % (each look leaves ~15 % of the
        error: seen 25 % too small, it measures them 4 % too small)."""
        picture = as_pil_rgb(image)
        start = estimate_red_cell_px(picture)
        if RBC not in self.info.net.classes:
            return start
        guesses = [start.px] if start.px else []
        guesses += [min(picture.size) * share for share in FIELD_SHARES]
        px, sides = max(((guess, self.red_cell_sides(picture, guess)) for guess in guesses), key=lambda r: len(r[1]))
        for _ in range(RED_CELL_PASSES):
            if len(sides) < MIN_CELLS:
                return RedCellSize(None, 0.0, len(sides), "estimated", "could not estimate the red-cell size: "
                                   f"the detector found {len(sides)} red cells (need {MIN_CELLS})", "learned detector")
            found, px = px, interquartile_mean(sides)
            if abs(math.log(px / found)) < 0.03:
                break
            sides = self.red_cell_sides(picture, px)
        return RedCellSize(round(px, 1), round(min(1.0, len(sides) / 12), 3), len(sides), "estimated",
                           method="learned detector")

    def red_cell_sides(self, picture: Image.Image, red_cell_px: float) -> list[float]:
        """Mean of width and height of each red cell found with a score >= ``RED_CELL_MIN_SCORE``."""
        return [(d.width + d.height) / 2 for d in self.find(picture, RBC, red_cell_px, RED_CELL_MIN_SCORE)]


def interquartile_mean(values: list[float]) -> float:
    """Mean of the middle half: border-cut and merged red cells sit in the tails."""
    ordered = sorted(values)
    quarter = len(ordered) // 4
    middle = ordered[quarter:len(ordered) - quarter]
    return float(sum(middle) / len(middle))


def _clip(box: Box, size: tuple[int, int]) -> Box:
    x0, y0, x1, y1 = box
    return max(0.0, x0), max(0.0, y0), min(float(size[0]), x1), min(float(size[1]), y1)


# ------------------------------------------------------------------------------ saving and loading


def save_detector(folder: str | Path, net, info: DetectorInfo) -> Path:
    """Weights (safetensors) and ``hemcap_detector.json``, each written atomically, the info last."""
    from safetensors.torch import save_file

    from hemcap.fileio import atomic_path, write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    write_json(folder / INFO, asdict(info))
    return folder


def read_detector_info(folder: str | Path) -> DetectorInfo:
    """A detector folder's ``hemcap_detector.json``; one sentence naming what is wrong otherwise."""
    file = Path(folder) / INFO
    if not file.exists():
        raise FileNotFoundError(f"{folder} is not a hemcap detector folder: it has no {INFO} "
                                f"(train one with `hemcap train-detector`)")
    data = json.loads(file.read_text(encoding="utf-8"))
    if data.get("version") != INFO_VERSION:
        raise ValueError(f"{file}: format version {data.get('version')!r}, this hemcap reads {INFO_VERSION}")
    net = data.pop("net", {})
    net = {**net, **{k: tuple(net[k]) for k in ("widths", "classes") if k in net}}  # JSON has lists
    return DetectorInfo(net=NetConfig(**net), **data)


def load_detector(folder: str | Path) -> CenterNetDetector:
    """The detector saved in ``folder`` (``hemcap train-detector``'s output)."""
    from safetensors.torch import load_file

    info = read_detector_info(folder)
    net = build_net(info.net)
    net.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    return CenterNetDetector(net, info)
