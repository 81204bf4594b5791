"""Train the learned white-cell detector (``hemcap.smear.learned``) from random weights on a CPU:
``hemcap train-detector --data ../shared/data/txl_pbc --data ../shared/data/bccd --out runs/detector``.

Every training smear is resized so its labelled red cells (median box side) span the network's
``work_red_cell_px``, then jittered in scale by up to ``scale_jitter`` either way (which also covers
the estimator's error at inference, about 10 %), flipped, turned and cropped to ``crop`` pixels.
Colour is where labs differ most, so each sample's stain is redrawn: its optical density is mixed
by a random matrix near the identity and scaled (another stain's hue and strength), then a lamp
colour, gamma, defocus blur and sensor noise are added. The loss is CenterNet's, per class (white
cells, and red cells, which give the magnification at inference): a penalty-reduced focal loss on
the class's centre map, L1 on offsets and log sizes at its centres.

The run stops after ``epochs`` or ``minutes``, whichever comes first, then measures the detector on
the validation smears (per source lab) and saves it with those figures in its info file.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

from hemcap.fileio import staging_dir
from hemcap.smear.labelled import LabelledSmear, load_smears, without_copies
from hemcap.smear.learned import (STRIDE, CenterNetDetector, DetectorInfo, NetConfig, build_net, save_detector,
                                  white_balance)


@dataclass(frozen=True)
class DetectorTrainingConfig:
    """How ``hemcap train-detector`` trains."""

    data: tuple[str, ...] = ()  # labelled folders (TXL-PBC YOLO layout or BCCD VOC), their train split
    val_data: tuple[str, ...] = ()  # folders whose val split measures the result (default: data)
    out: str = "runs/detector"  # folder the detector is saved to
    net: NetConfig = field(default_factory=NetConfig)
    epochs: int = 60  # passes over the training smears (60 x 1,094 TXL-PBC + BCCD smears: 6 min on 2 idle cores)
    minutes: float = 30.0  # stop training after this many minutes whatever the epoch
    batch_size: int = 32
    lr: float = 3e-3  # AdamW peak, cosine decay to 2 % after a 1-epoch warm-up
    weight_decay: float = 1e-4
    crop: int = 128  # training crops are this many working pixels square (a smear: 90-160 px)
    scale_jitter: float = 1.3  # each sample is scaled by a factor in [1/this, this] (log-uniform)
    stain_jitter: float = 0.15  # entries of the optical-density mixing matrix move by up to this
    min_score: float = 0.1  # the saved detector's score threshold
    seed: int = 0

    def __post_init__(self):
        problems = [f"{name} must be > 0, got {getattr(self, name)}"
                    for name in ("epochs", "minutes", "batch_size", "lr", "crop") if not getattr(self, name) > 0]
        if self.scale_jitter < 1:
            problems.append(f"scale_jitter must be >= 1, got {self.scale_jitter}")
        if not self.data:
            problems.append("data: name at least one labelled folder")
        if problems:
            raise ValueError("DetectorTrainingConfig: " + "; ".join(problems))


@dataclass
class Sample:
    """One training smear at its working magnification x ``scale_jitter`` (so shrinking loses nothing)."""

    pixels: np.ndarray  # uint8 HxWx3
    boxes: np.ndarray  # (N, 5): x0, y0, x1, y1 in these pixels, then the class's index in NetConfig.classes


def load_samples(smears: Sequence[LabelledSmear], cfg: DetectorTrainingConfig) -> list[Sample]:
    """The smears with labelled red cells (they give each smear's magnification, and the network learns
    to find them); every TXL-PBC and BCCD smear has them."""
    factor = cfg.net.work_red_cell_px * cfg.scale_jitter
    return [_sample(smear, factor / red_cell_px, cfg.net.classes)
            for smear in smears if (red_cell_px := smear.median_red_cell_px())]


def _sample(smear: LabelledSmear, factor: float, classes: Sequence[str]) -> Sample:
    with Image.open(smear.path) as image:
        small = image.convert("RGB").resize((round(smear.size[0] * factor), round(smear.size[1] * factor)),
                                            Image.BILINEAR)
    rows = [(*(v * factor for v in box), index) for index, label in enumerate(classes) for box in smear.of(label)]
    return Sample(np.asarray(small), np.array(rows, np.float32).reshape(-1, 5))


# ------------------------------------------------------------------------------ augmentation


def augment(sample: Sample, cfg: DetectorTrainingConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A training crop (CHW float, white-balanced) and its boxes."""
    pixels, boxes = _rescale(sample, rng.uniform(-2, 0) * math.log(cfg.scale_jitter), rng)
    pixels, boxes = _flip_turn(pixels, boxes, rng)
    pixels = _recolour(pixels, cfg.stain_jitter, rng)
    return _crop(white_balance(pixels), boxes, cfg.crop, rng)


def _rescale(sample: Sample, log_scale: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Scaled by exp(log_scale) (<= 1: the sample is stored at the largest scale), sometimes defocused."""
    image = Image.fromarray(sample.pixels)
    factor = math.exp(log_scale)
    image = image.resize((max(8, round(image.width * factor)), max(8, round(image.height * factor))), Image.BILINEAR)
    if rng.random() < 0.3:  # other labs' optics are softer (BCCD's nuclei blur more than PBC's)
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return np.asarray(image), sample.boxes * np.array([factor] * 4 + [1], np.float32)


def _flip_turn(pixels: np.ndarray, boxes: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    height, width = pixels.shape[:2]
    boxes = boxes.copy()
    if rng.random() < 0.5:
        pixels, boxes[:, [0, 2]] = pixels[:, ::-1], width - boxes[:, [2, 0]]
    if rng.random() < 0.5:
        pixels, boxes[:, [1, 3]] = pixels[::-1], height - boxes[:, [3, 1]]
    if rng.random() < 0.5:  # transpose: with the flips, all 8 turns and mirrors
        pixels, boxes = pixels.transpose(1, 0, 2), boxes[:, [1, 0, 3, 2, 4]]
    return np.ascontiguousarray(pixels), boxes


def _recolour(pixels: np.ndarray, jitter: float, rng) -> np.ndarray:
    """Another stain (optical density mixed and scaled), lamp, gamma and sensor noise."""
    density = -np.log(np.maximum(pixels.astype(np.float32), 1.0) / 255.0)
    mixing = np.eye(3, dtype=np.float32) + rng.uniform(-jitter, jitter, (3, 3)).astype(np.float32)
    density = density @ mixing.T * rng.uniform(0.7, 1.4)
    values = np.exp(-density) * rng.uniform(0.8, 1.2, 3).astype(np.float32)  # lamp colour
    values = np.clip(values, 0, 1) ** rng.uniform(0.7, 1.4)
    values += rng.normal(0, rng.uniform(0, 0.03), values.shape).astype(np.float32)
    return np.clip(values * 255, 0, 255).astype(np.uint8)


def _crop(tensor: np.ndarray, boxes: np.ndarray, side: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """A ``side``-square window (padded with the background, 0.25, where the image is smaller)."""
    _, height, width = tensor.shape
    x0, y0 = int(rng.integers(0, max(1, width - side + 1))), int(rng.integers(0, max(1, height - side + 1)))
    out = np.full((3, side, side), 0.25, np.float32)
    window = tensor[:, y0:y0 + side, x0:x0 + side]
    out[:, :window.shape[1], :window.shape[2]] = window
    return out, _kept_boxes(boxes - np.array([x0, y0, x0, y0, 0], np.float32), side)


def _kept_boxes(boxes: np.ndarray, side: int) -> np.ndarray:
    """Boxes clipped to the window; those keeping under 40 % of their area are dropped (a sliver is no cell)."""
    clipped = boxes.copy()
    clipped[:, :4] = np.clip(boxes[:, :4], 0, side)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    keep = area(clipped) >= 0.4 * np.maximum(area(boxes), 1e-6)
    return clipped[keep]


# ------------------------------------------------------------------------------ targets and loss


def targets(boxes: np.ndarray, side: int, classes: int, red_cell_px: float) -> tuple[np.ndarray, list[tuple]]:
    """A centre heat map per class (Gaussians, peak 1) and (class, y, x, dx, dy, log w, log h) at each centre."""
    grid = side // STRIDE
    heat = np.zeros((classes, grid, grid), np.float32)
    if not len(boxes):
        return heat, []
    x0, y0, x1, y1, label = boxes.T
    w, h = np.maximum(x1 - x0, 1), np.maximum(y1 - y0, 1)
    cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
    ix, iy = np.minimum(cx.astype(int), grid - 1), np.minimum(cy.astype(int), grid - 1)
    sigma = np.maximum(0.8, np.sqrt(w * h) / STRIDE / 6)  # CenterNet: the Gaussian's radius is a third of the box's
    axis = np.arange(grid, dtype=np.float32)
    bumps = np.exp(-((axis[None, None, :] - ix[:, None, None]) ** 2 + (axis[None, :, None] - iy[:, None, None]) ** 2)
                   / (2 * sigma[:, None, None] ** 2))
    for c in range(classes):
        if (label == c).any():
            heat[c] = bumps[label == c].max(axis=0)
    rows = np.stack([label, iy, ix, cx - ix, cy - iy, np.log(w / red_cell_px), np.log(h / red_cell_px)], axis=1)
    return heat, [(int(r[0]), int(r[1]), int(r[2]), *map(float, r[3:])) for r in rows]


def loss(maps, heat, centres: list[list[tuple]]):
    """Per class: focal loss on its centre map (alpha 2, beta 4) and L1 on offsets and log sizes at
    its centres, each averaged over its cells, so ~20 red cells a smear do not drown one white cell."""
    import torch

    classes = heat.shape[1]
    p = torch.sigmoid(maps[:, :classes]).clamp(1e-4, 1 - 1e-4)
    positive = heat.eq(1).float()
    focal = -(positive * (1 - p) ** 2 * torch.log(p) + (1 - positive) * (1 - heat) ** 4 * p**2 * torch.log(1 - p))
    total = (focal.sum(dim=(0, 2, 3)) / positive.sum(dim=(0, 2, 3)).clamp(min=1)).sum()
    rows = [(b, *c) for b, cells in enumerate(centres) for c in cells]
    if not rows:
        return total
    index = torch.tensor([r[:4] for r in rows])
    wanted = torch.tensor([r[4:] for r in rows], dtype=maps.dtype)
    errors = (maps[index[:, 0], classes:, index[:, 2], index[:, 3]] - wanted).abs().sum(dim=1)
    for c in range(classes):
        chosen = errors[index[:, 1] == c]
        total = total + (chosen.mean() if len(chosen) else 0)
    return total


# ------------------------------------------------------------------------------ the run


def batch(samples: Sequence[Sample], cfg: DetectorTrainingConfig, rng):
    import torch

    crops, heats, centres = [], [], []
    for sample in samples:
        crop, boxes = augment(sample, cfg, rng)
        heat, cells = targets(boxes, cfg.crop, len(cfg.net.classes), cfg.net.work_red_cell_px)
        crops.append(crop), heats.append(heat), centres.append(cells)
    return torch.from_numpy(np.stack(crops)), torch.from_numpy(np.stack(heats)), centres


def train(cfg: DetectorTrainingConfig, overwrite: bool = False, log=print) -> Path:
    """Train, measure on the validation smears, save (a staging folder renamed into place);
    returns the detector folder. An existing ``cfg.out`` is refused up front unless ``overwrite``."""
    import torch

    if Path(cfg.out).exists() and not overwrite:
        raise FileExistsError(f"output directory {cfg.out} exists; pass --overwrite to replace it")
    torch.manual_seed(cfg.seed)
    val = [s for root in cfg.val_data or cfg.data for s in _split(root, "val")]
    smears, copies = without_copies([s for root in cfg.data for s in load_smears(root, "train")], val)
    samples = load_samples(smears, cfg)
    log(f"{len(samples)} training smears from {', '.join(cfg.data)} ({copies} copies of validation smears left out)")
    if len(samples) < len(smears):
        log(f"{len(smears) - len(samples)} training smears have no labelled red cells and were left out: box a few "
            "red cells (class 1) on each, they give the smear's magnification")
    if not samples:
        raise ValueError(f"no training smears with labelled red cells in {', '.join(cfg.data)}")
    net = build_net(cfg.net)
    steps, minutes = _fit(net, samples, cfg, np.random.default_rng(cfg.seed), log)
    detector = CenterNetDetector(net, DetectorInfo(net=cfg.net, min_score=cfg.min_score))
    detector.info.training = {"config": _jsonable(asdict(cfg)), "smears": len(samples), "copies_left_out": copies,
                              "steps": steps, "minutes": round(minutes, 2),
                              "validation": validation_figures(detector, val)}
    with staging_dir(cfg.out, overwrite) as staging:
        save_detector(staging, net, detector.info)
    return Path(cfg.out)


def _split(root: str, split: str) -> list[LabelledSmear]:
    try:
        return load_smears(root, split)
    except FileNotFoundError:  # a folder without that split validates nothing
        return []


def _fit(net, samples: list[Sample], cfg: DetectorTrainingConfig, rng, log) -> tuple[int, float]:
    import torch

    per_epoch = max(1, len(samples) // cfg.batch_size)
    total = cfg.epochs * per_epoch
    net = net.to(memory_format=torch.channels_last).train()  # 1.3x the steps/s of the default layout on a CPU
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, per_epoch, total))
    start, step = time.monotonic(), 0
    while step < total and time.monotonic() - start < cfg.minutes * 60:
        order = rng.permutation(len(samples))
        for first in range(0, per_epoch * cfg.batch_size, cfg.batch_size):
            pixels, heat, centres = batch([samples[i] for i in order[first:first + cfg.batch_size]], cfg, rng)
            value = loss(net(pixels.to(memory_format=torch.channels_last)), heat, centres)
            optimizer.zero_grad()
            value.backward()
            optimizer.step(), schedule.step()
            step += 1
        minutes = (time.monotonic() - start) / 60
        log(f"epoch {step // per_epoch}/{cfg.epochs}: loss {value.item():.3f}, {minutes:.1f} min")
    return step, (time.monotonic() - start) / 60


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def validation_figures(detector, smears: Sequence[LabelledSmear]) -> dict:
    """Per-source AP@0.5, recall and mean IoU on ``smears``, red cells measured on each image."""
    from hemcap.images import load_rgb
    from hemcap.smear.scoring import metrics_by_source

    if not smears:
        return {}
    found = {s.name: detector(load_rgb(s.path), path=s.path) for s in smears}
    table = metrics_by_source(smears, found)
    return {source: {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            for source, row in table.items()}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return list(value) if isinstance(value, tuple) else value
