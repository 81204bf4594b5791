"""Training inputs: images decoded and resized once, deterministic batches, cell augmentations.

JPEG decoding and resizing happen once per split and image size; the uint8 pixels are cached
as a ``.npy`` file (memory-mapped on reuse), so the model, not the decoder, sets the speed.

Batches are a pure function of (seed, step): the order comes from a permutation seeded by the
epoch, the caption variant and the augmentations from a generator seeded by the step. A run
resumed at step k therefore sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from hemcap.config import AugmentConfig
from hemcap.fileio import atomic_path

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ decode once


def decode_split(split, size: tuple[int, int], cache_dir: str | Path | None) -> tuple[torch.Tensor, list[int]]:
    """Pixels of every decodable image in ``split`` as uint8 (N, 3, H, W), and the rows they came from.

    An image that fails to decode is logged with its id and left out; it does not stop the rest.
    """
    cache = _cache_path(split, size, cache_dir) if cache_dir else None
    if cache and cache.is_file():
        data = np.load(cache, mmap_mode="r")
        rows = np.load(cache.with_suffix(".rows.npy")).tolist()
        return torch.from_numpy(np.array(data)), rows  # read into memory once
    pixels, rows = _decode_all(split, size)
    if cache:
        _save_npy(cache.with_suffix(".rows.npy"), np.asarray(rows, dtype=np.int64))
        _save_npy(cache, pixels)
    return torch.from_numpy(pixels), rows


def _cache_path(split, size: tuple[int, int], cache_dir) -> Path:
    key = hashlib.sha1(f"{split._fingerprint}-{len(split)}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"pixels-{key}-{size[0]}x{size[1]}.npy"


def _decode_all(split, size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    images = split.cast_column("image", split.features["image"].__class__(decode=False))["image"]
    ids = split["id"] if "id" in split.column_names else [str(i) for i in range(len(split))]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # PIL releases the GIL
        decoded = list(pool.map(lambda item: _decode_one(item, size), images))
    rows, arrays = [], []
    for i, (array, error) in enumerate(decoded):
        if error:
            log.warning("skipping image of row %d (id %s): %s", i, ids[i], error)
            continue
        rows.append(i)
        arrays.append(array)
    if not arrays:
        raise ValueError("no image in the split could be decoded")
    return np.stack(arrays), rows


def _decode_one(item: dict, size: tuple[int, int]) -> tuple[np.ndarray | None, str | None]:
    import io

    try:
        source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
        with Image.open(source) as image:
            image = image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)
            return np.asarray(image).transpose(2, 0, 1).copy(), None
    except Exception as error:  # any decoder failure: report it, keep going
        return None, f"{type(error).__name__}: {error}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


# ------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    rows: list[int]  # indices into the decoded pixels
    pixels: torch.Tensor  # float (B, 3, H, W) in [0, 1], augmented
    captions: list[str]


class TrainBatches:
    """The micro-batch of any step, the same whenever it is asked for.

    ``batch_size`` is per process; with several processes each takes its slice of one global
    batch. The last incomplete batch of an epoch is dropped, so every batch has the same size.
    """

    def __init__(self, pixels: torch.Tensor, captions: Sequence[Sequence[str]], batch_size: int,
                 augment: AugmentConfig, seed: int, variants: bool, rank: int = 0, world: int = 1):
        self.pixels, self.captions = pixels, captions
        self.global_batch = batch_size * world
        if len(pixels) < self.global_batch:
            raise ValueError(f"{len(pixels)} training images are fewer than one batch of {self.global_batch}")
        self.batch_size, self.rank = batch_size, rank
        self.augment, self.seed, self.variants = augment, seed, variants
        self._epoch, self._order = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.pixels) // self.global_batch

    def __call__(self, micro_step: int) -> Batch:
        epoch, position = divmod(micro_step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(len(self.pixels), generator=_generator(self.seed, "order", epoch))
        start = position * self.global_batch + self.rank * self.batch_size
        rows = self._order[start:start + self.batch_size].tolist()
        rng = _generator(self.seed, "batch", micro_step, self.rank)
        pixels = augment_pixels(self.pixels[rows], self.augment, rng)
        return Batch(rows, pixels, self._pick_captions(rows, rng))

    def _pick_captions(self, rows: list[int], rng: torch.Generator) -> list[str]:
        if not self.variants:
            return [self.captions[r][0] for r in rows]
        picks = torch.randint(0, 1 << 30, (len(rows),), generator=rng).tolist()
        return [self.captions[r][p % len(self.captions[r])] for r, p in zip(rows, picks)]


def _generator(seed: int, *parts) -> torch.Generator:
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


# ------------------------------------------------------------------------------ augmentation


def augment_pixels(pixels: torch.Tensor, cfg: AugmentConfig, rng: torch.Generator) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1] with random symmetries and colour/stain jitter."""
    x = pixels.float().div_(255)
    n = len(x)
    if cfg.rotate90 or cfg.flip:
        turns = torch.randint(0, 4, (n,), generator=rng) if cfg.rotate90 else torch.zeros(n, dtype=torch.long)
        flips = torch.rand(n, generator=rng) < 0.5 if cfg.flip else torch.zeros(n, dtype=torch.bool)
        x = torch.stack([_symmetry(img, int(k), bool(f)) for img, k, f in zip(x, turns, flips)])
    if cfg.stain_jitter:
        x = stain_jitter(x, cfg.stain_jitter, rng)
    if cfg.color_jitter:
        x = color_jitter(x, cfg.color_jitter, rng)
    return x


def _symmetry(image: torch.Tensor, turns: int, flip: bool) -> torch.Tensor:
    if flip:
        image = image.flip(-1)
    return torch.rot90(image, turns, dims=(-2, -1)) if turns else image


def _uniform(rng: torch.Generator, shape, amount: float) -> torch.Tensor:
    return (torch.rand(shape, generator=rng) * 2 - 1) * amount


def stain_jitter(x: torch.Tensor, amount: float, rng: torch.Generator) -> torch.Tensor:
    """Scale and shift each channel's optical density, as a different stain or scanner would.

    An RGB take on Tellez et al.'s HED jitter (2018): OD = -log(I); OD' = OD * (1 + a) + b,
    with a in [-amount, amount] and b in [-amount/4, amount/4] per image and channel.
    """
    shape = (len(x), 3, 1, 1)
    od = -torch.log(x.clamp_min(1 / 255))
    od = od * (1 + _uniform(rng, shape, amount)) + _uniform(rng, shape, amount / 4)
    return torch.exp(-od).clamp_(0, 1)


def color_jitter(x: torch.Tensor, amount: float, rng: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation, each within 1 +- amount."""
    shape = (len(x), 1, 1, 1)
    x = x * (1 + _uniform(rng, shape, amount))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + _uniform(rng, shape, amount)) + mean
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - grey) * (1 + _uniform(rng, shape, amount)) + grey
    return x.clamp_(0, 1)
