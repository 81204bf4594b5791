"""Training inputs: images decoded and resized once, deterministic batches, cell augmentations.

JPEG decoding and resizing happen once per split and image size; the uint8 pixels are cached
as a ``.npy`` file that is memory-mapped, never read whole: a batch reads its own rows, so the
memory a run takes does not grow with the data set (10,000 images at 896 px are 24 GB).

Batches are a pure function of (seed, step): the order comes from a permutation seeded by the
epoch, the caption variant and the augmentations from a generator seeded by the step. A run
resumed at step k therefore sees exactly the batches an uninterrupted run would. A
``Prefetcher`` can build the next ones on a background thread while the model trains.

Augmentations (``augment_pixels``, each set in ``AugmentConfig``): the 8 symmetries of the
square (cells have no orientation), stain jitter (per-channel optical-density scale and shift)
and colour jitter (brightness, contrast, saturation), and, for other labs' optics and cameras,
zoom about the centre (``scale``), Gaussian defocus (``blur``), a tone curve (``gamma``), sensor
noise (``noise``) and JPEG re-compression (``jpeg_quality``); each of these five reaches a random
half of a batch at a strength drawn up to its maximum. ``augment.restain`` decodes copies of the
training images under random other labs' stains and through the model's own stain normaliser
(``Restained``), once per copy like the images themselves; half of each batch is read from them.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import mmap
import os
import queue
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hemcap.config import AugmentConfig
from hemcap.domain import Domain
from hemcap.fileio import atomic_path
from hemcap.images import IMAGE_FORMATS, model_pixels, model_sized

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image], Image.Image]  # may carry a ``key`` naming it in the cache
DECODE_CHUNK = 64  # images in flight while decoding: 150 MB at 896 px, however large the split


# ------------------------------------------------------------------------------ decode once


def map_split(split, size: tuple[int, int], cache_dir: str | Path | None, mode: str = "r",
              transform: Transform | None = None, crop: float = 1.0) -> tuple[np.ndarray, list[int]]:
    """Pixels of every decodable image in ``split`` as uint8 (N, 3, H, W), and the rows they came from.

    With ``cache_dir`` the first call decodes into a cache file and every call returns it
    memory-mapped (``np.memmap`` opened with ``mode``); without, the pixels are decoded into
    memory. An image that fails to decode is logged with its id and left out. ``transform``
    (e.g. the model's stain normalisation) is applied to each image at the model's size; its
    ``key`` is part of the cache's name. ``crop``: the model's centre crop (``images.model_sized``).
    """
    if not cache_dir:
        pixels = np.empty((len(split), 3, *size), np.uint8)
        rows = _decode_into(split, size, pixels, transform, crop)
        return pixels[:len(rows)], rows
    cache = _cache_path(split, size, cache_dir, getattr(transform, "key", "") + (f"-crop{crop}" if crop < 1 else ""))
    if not cache.is_file():
        _decode_to_cache(split, size, cache, transform, crop)
    rows = np.load(cache.with_suffix(".rows.npy")).tolist()
    return np.load(cache, mmap_mode=mode)[:len(rows)], rows  # rows past the decoded ones are unused


def decode_split(split, size: tuple[int, int], cache_dir: str | Path | None,
                 transform: Transform | None = None, crop: float = 1.0) -> tuple[torch.Tensor, list[int]]:
    """``map_split`` as a torch tensor over the same memory, without a copy.

    The mapping is copy-on-write: a write changes this process's pages, never the cache, where a
    read-only mapping would crash the process on the first in-place write.
    """
    pixels, rows = map_split(split, size, cache_dir, mode="c", transform=transform, crop=crop)
    return torch.from_numpy(pixels), rows


def _cache_path(split, size: tuple[int, int], cache_dir, transform_key: str = "") -> Path:
    key = hashlib.sha1(f"{split._fingerprint}-{len(split)}{transform_key}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"pixels-{key}-{size[0]}x{size[1]}.npy"


def _decode_to_cache(split, size: tuple[int, int], cache: Path, transform: Transform | None, crop: float) -> None:
    """Decode straight into a preallocated ``.npy`` file; it and its rows file appear complete or not at all."""
    with atomic_path(cache) as tmp:
        pixels = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(split), 3, *size))
        rows = _decode_into(split, size, pixels, transform, crop)
        pixels.flush()
        del pixels  # unmapped before the rename
        _save_npy(cache.with_suffix(".rows.npy"), np.asarray(rows, dtype=np.int64))  # before the pixels appear


def _decode_into(split, size: tuple[int, int], pixels: np.ndarray, transform: Transform | None = None,
                 crop: float = 1.0) -> list[int]:
    """Fill the first rows of ``pixels`` with the images that decode; their row indices."""
    ids = split["id"] if "id" in split.column_names else None
    rows = []
    for i, array, error in _decoded(split, size, transform, crop):
        if error:
            log.warning("skipping image of row %d (id %s): %s", i, ids[i] if ids is not None else i, error)
            continue
        pixels[len(rows)] = array
        rows.append(i)
        if len(rows) % DECODE_CHUNK == 0:
            release(pixels)
    if not rows:
        raise ValueError("no image in the split could be decoded")
    return rows


def _decoded(split, size: tuple[int, int], transform: Transform | None,
             crop: float) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """(row, pixels, error) for each image, decoded DECODE_CHUNK at a time on a few threads."""
    images = split.select_columns(["image"]).cast_column("image", split.features["image"].__class__(decode=False))
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # PIL releases the GIL
        for start in range(0, len(images), DECODE_CHUNK):
            chunk = images[start:start + DECODE_CHUNK]["image"]
            decoded = pool.map(functools.partial(_decode_one, size=size, transform=transform, crop=crop), chunk)
            for i, (array, error) in enumerate(decoded, start):
                yield i, array, error


def _decode_one(item: dict, size: tuple[int, int], transform: Transform | None,
                crop: float) -> tuple[np.ndarray | None, str | None]:
    try:
        source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
        with Image.open(source, formats=tuple(IMAGE_FORMATS)) as image:  # no EPS: it would run Ghostscript
            if transform is None:
                return model_pixels(image, size, crop), None  # the crop and resize evaluation and captioning use too
            return model_pixels(transform(model_sized(image, size, crop)), size), None
    except Exception as error:  # any decoder failure: report it, keep going
        return None, f"{type(error).__name__}: {error}"


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def release(pixels) -> None:
    """Drop the pages of a shared file mapping from this process's resident memory.

    They stay in the page cache (dirty ones are still written back), so the next read is a minor
    fault, but they stop counting in RSS: an epoch over 20,000 images at 384 px would otherwise
    leave all 8.8 GB of the cache resident. A copy-on-write mapping is left alone, as dropping
    its pages would drop its writes.
    """
    mapping = getattr(pixels, "_mmap", None)
    if mapping is not None and not mapping.closed and pixels.mode != "c" and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def gather_rows(pixels: np.ndarray | torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """uint8 ``pixels[rows]`` as a tensor; from an array, read in ascending row order, then put back in order.

    Ascending rows read a memory-mapped cache front to back; the mapped pages are released after.
    """
    if isinstance(pixels, torch.Tensor):
        return pixels[list(rows)]
    rows = np.asarray(rows)
    ascending = np.argsort(rows)
    out = np.empty((len(rows), *pixels.shape[1:]), pixels.dtype)
    out[ascending] = pixels[rows[ascending]]
    release(pixels)
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------ batches


@dataclass
class Batch:
    rows: list[int]  # indices into the decoded pixels
    pixels: torch.Tensor  # float (B, 3, H, W) in [0, 1], augmented
    captions: list[str]


class TrainBatches:
    """The micro-batch of any step, the same whenever it is asked for.

    ``pixels`` is uint8 (N, 3, H, W): a memory-mapped cache (``map_split``), an array or a tensor;
    a batch reads only its own rows. ``batch_size`` is per process; with several processes each
    takes its slice of one global batch. The last incomplete batch of an epoch is dropped, so
    every batch has the same size. ``restained`` are copies of ``pixels`` under other labs' stains
    (``Restained``): each image of a batch is read from a random one of them with p = 0.5.
    """

    def __init__(self, pixels: np.ndarray | torch.Tensor, captions: Sequence[Sequence[str]], batch_size: int,
                 augment: AugmentConfig, seed: int, variants: bool, rank: int = 0, world: int = 1,
                 restained: Sequence[np.ndarray | torch.Tensor] = ()):
        self.pixels, self.captions, self.restained = pixels, captions, list(restained)
        self.global_batch = batch_size * world
        if len(pixels) < self.global_batch:
            raise ValueError(f"{len(pixels)} training images are fewer than one batch of {self.global_batch}")
        self.batch_size, self.rank = batch_size, rank
        self.augment, self.seed, self.variants = augment, seed, variants
        self._epoch_order = (-1, None)  # one attribute, so another thread never sees one epoch with another's order

    @property
    def steps_per_epoch(self) -> int:
        return len(self.pixels) // self.global_batch

    def __call__(self, micro_step: int) -> Batch:
        epoch, position = divmod(micro_step, self.steps_per_epoch)
        start = position * self.global_batch + self.rank * self.batch_size
        rows = self._order(epoch)[start:start + self.batch_size].tolist()
        rng = _generator(self.seed, "batch", micro_step, self.rank)
        pixels = augment_pixels(self._gather(rows, rng), self.augment, rng)
        return Batch(rows, pixels, self._pick_captions(rows, rng))

    def _gather(self, rows: list[int], rng: torch.Generator) -> torch.Tensor:
        """uint8 pixels of ``rows``, half of them (each with p = 0.5) from a random restained copy."""
        if not self.restained:
            return gather_rows(self.pixels, rows)
        n = len(rows)
        picks = torch.where(torch.rand(n, generator=rng) < 0.5, torch.randint(1, len(self.restained) + 1, (n,),
                                                                              generator=rng), 0)
        out = torch.empty((n, *self.pixels.shape[1:]), dtype=torch.uint8)
        for source, pixels in enumerate([self.pixels, *self.restained]):
            at = (picks == source).nonzero().flatten().tolist()
            if at:
                out[at] = gather_rows(pixels, [rows[i] for i in at])
        return out

    def _order(self, epoch: int) -> torch.Tensor:
        if self._epoch_order[0] != epoch:
            order = torch.randperm(len(self.pixels), generator=_generator(self.seed, "order", epoch))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def _pick_captions(self, rows: list[int], rng: torch.Generator) -> list[str]:
        if not self.variants:
            return [self.captions[r][0] for r in rows]
        picks = torch.randint(0, 1 << 30, (len(rows),), generator=rng).tolist()
        return [self.captions[r][p % len(self.captions[r])] for r, p in zip(rows, picks)]


def _generator(seed: int, *parts) -> torch.Generator:
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


# ------------------------------------------------------------------------------ prefetch


class _Failed:
    """An exception raised by ``build``, carried to the caller."""

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """``build(step)`` for consecutive steps, made on a background thread up to ``ahead`` steps early.

    Asking for the step after the last one takes it from the queue; asking for any other (the
    first, or a step after a resume) restarts the thread there, so the answer is always
    ``build(step)``. An exception in ``build`` is raised in the caller, at the step that raised
    it. ``close`` (or leaving a ``with`` block) stops the thread; a build under way finishes first.
    With ``ahead=0`` there is no thread: each step is built when asked for, on the caller's thread.

    ``threads`` sets the thread's torch (OpenMP) threads; None leaves torch's default. The
    caller's threads stay as they were.
    """

    def __init__(self, build: Callable[[int], object], ahead: int = 2, threads: int | None = None):
        self.build, self.ahead, self.threads = build, ahead, threads
        self._thread: threading.Thread | None = None
        self._next: int | None = None

    def __call__(self, step: int):
        if not self.ahead:
            return self.build(step)
        if step != self._next:
            self.close()
            self._start(step)
        item = self._take()
        self._next = step + 1
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        return item

    def _start(self, step: int) -> None:
        self._queue, self._stop, ready = queue.Queue(maxsize=self.ahead), threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._work, args=(step, self._queue, self._stop, ready),
                                        name="hemcap-prefetch", daemon=True)  # daemon: never holds up exit
        default = torch.get_num_threads()
        self._thread.start()
        ready.wait()
        if self.threads:
            torch.set_num_threads(default)  # the thread's set_num_threads also changed the default of new threads

    def _set_threads(self, ready: threading.Event) -> None:
        """This thread's torch threads; then the caller may go on."""
        try:
            if self.threads:
                torch.get_num_threads()  # a thread takes the default on first use: now, before the caller restores it
                torch.set_num_threads(self.threads)
        finally:
            ready.set()

    def _work(self, step: int, out: queue.Queue, stop: threading.Event, ready: threading.Event) -> None:
        self._set_threads(ready)
        while not stop.is_set():
            try:
                item = self.build(step)
            except BaseException as error:  # whatever it is, the caller raises it
                item = _Failed(error)
            if not _put(out, item, stop) or isinstance(item, _Failed):
                return
            step += 1

    def _take(self):
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread stopped without a batch") from None

    def close(self) -> None:
        """Stop the thread and wait for it; the next call starts afresh."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread, self._next = None, None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _put(out: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` when there is room; False if ``stop`` is set first (checked every 0.1 s)."""
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


# ------------------------------------------------------------------------------ other labs' stains

LAMP_DIMMEST = 0.7  # of the training background, per channel: TXL-PBC's BCCD, BCD and Raabin-WBC are 0.74-0.92 of PBC's


@dataclass(frozen=True)
class Restained:
    """A decode transform: a training image under a random other lab's stain and lamp, then through the
    model's own stain normaliser, as another lab's cell reaches the model at inference.

    The other stain is the training images' (``domain``: their background and the optical densities
    of their red cells and nuclei) with each of the six densities scaled by a factor drawn
    log-uniformly from 1 / (1 + strength) to 1 + strength, the image re-mixed to it as
    ``hemcap.looks.remix_stain`` does (Tellez et al.'s stain augmentation in the Beer-Lambert space,
    2018, with red cells and nuclei as the two dyes' anchors); the lamp dims each channel to
    ``LAMP_DIMMEST``-1 of the training one. The normaliser then undoes what it can (those densities,
    the lamp); the model learns to ignore the rest (the mix's third direction, the normaliser's errors
    in finding red cells and nuclei, clipped pixels). The draw is seeded by the image's pixels, ``copy``
    and ``seed``: an image's copy looks the same in every run.
    """

    strength: float
    copy: int
    seed: int
    domain: Domain

    def __call__(self, image: Image.Image) -> Image.Image:
        from hemcap.looks import remix_stain, stain_anchors

        rng = np.random.default_rng([self.seed, self.copy, zlib.crc32(image.tobytes())])
        background = stain_anchors(image)[0]
        own = [np.asarray(od) for od in (self.domain.red_cell_od, self.domain.nucleus_od) if od is not None]
        own = own or [np.ones(3)]  # no anchors measured: one grey dye
        spread = math.log1p(self.strength)
        other = [od * np.exp(rng.uniform(-spread, spread, 3)) for od in own]
        lamp = np.asarray(self.domain.background_rgb or background) * rng.uniform(LAMP_DIMMEST, 1.0, 3)
        return self.domain.normaliser()(remix_stain(image, background, own, lamp, other))

    @property
    def key(self) -> str:
        return repr(self)  # every field: the domain's anchors set the stains drawn even when it does not normalise


# ------------------------------------------------------------------------------ augmentation


def augment_pixels(pixels: torch.Tensor, cfg: AugmentConfig, rng: torch.Generator) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float in [0, 1] with random symmetries, colour/stain jitter and other labs' optics.

    The order follows the light: geometry and optics (magnification, focus) form the image, the
    stain and the camera's colour response and tone curve recolour it, the sensor adds noise, and
    the camera compresses last. An augmentation that is off draws nothing from ``rng``.
    """
    x = pixels.float().div_(255)
    n = len(x)
    if cfg.rotate90 or cfg.flip:
        turns = torch.randint(0, 4, (n,), generator=rng) if cfg.rotate90 else torch.zeros(n, dtype=torch.long)
        flips = torch.rand(n, generator=rng) < 0.5 if cfg.flip else torch.zeros(n, dtype=torch.bool)
        x = torch.stack([_symmetry(img, int(k), bool(f)) for img, k, f in zip(x, turns, flips)])
    if cfg.scale:
        _on_half(x, zoom, 1 + _uniform(rng, n, cfg.scale), rng)
    if cfg.blur:
        _on_half(x, gaussian_blur, torch.rand(n, generator=rng) * cfg.blur, rng)
    if cfg.stain_jitter:
        x = stain_jitter(x, cfg.stain_jitter, rng)
    if cfg.stain_mix:
        _on_half(x, stain_mix, _uniform(rng, (n, 3, 3), cfg.stain_mix), rng)
    if cfg.color_jitter:
        x = color_jitter(x, cfg.color_jitter, rng)
    return _camera(x, cfg, rng)


def _camera(x: torch.Tensor, cfg: AugmentConfig, rng: torch.Generator) -> torch.Tensor:
    """The camera's tone curve, sensor noise and JPEG compression, in that order."""
    n = len(x)
    if cfg.gamma:
        _on_half(x, gamma_curve, torch.exp(_uniform(rng, n, cfg.gamma)), rng)
    if cfg.noise:
        _on_half(x, partial(sensor_noise, rng=rng), torch.rand(n, generator=rng) * cfg.noise, rng)
    if cfg.jpeg_quality is not None:
        _on_half(x, jpeg_roundtrip, torch.randint(cfg.jpeg_quality, 96, (n,), generator=rng), rng)
    return x


def _on_half(x: torch.Tensor, augment: Callable, strengths: torch.Tensor, rng: torch.Generator) -> None:
    """``augment(images, strengths)`` on a random half of ``x`` (each image with p = 0.5), in place.

    Half keep their own look, so the model still sees the training lab's images as they are.
    """
    picked = torch.rand(len(x), generator=rng) < 0.5
    if picked.any():
        x[picked] = augment(x[picked], strengths[picked])


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


def stain_mix(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Each image's optical densities (against its background: the brightest 4x4 block per channel)
    mixed by the identity plus ``offsets`` (B, 3, 3): a stain whose dyes absorb in other proportions,
    so red cells and nuclei change hue differently, as between labs (after stain normalisation,
    TXL-PBC's BCCD and BCD nuclei are bluer against their red cells than PBC's, Raabin-WBC's redder)."""
    background = torch.nn.functional.avg_pool2d(x, 4).amax(dim=(2, 3), keepdim=True).clamp_min(1 / 255)
    od = torch.log(background) - torch.log(x.clamp_min(1 / 255))
    mixing = torch.eye(3) + offsets
    return (background * torch.exp(-torch.einsum("bij,bjhw->bihw", mixing, od))).clamp_(0, 1)


def color_jitter(x: torch.Tensor, amount: float, rng: torch.Generator) -> torch.Tensor:
    """Random brightness, contrast and saturation, each within 1 +- amount."""
    shape = (len(x), 1, 1, 1)
    x = x * (1 + _uniform(rng, shape, amount))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + _uniform(rng, shape, amount)) + mean
    grey = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = (x - grey) * (1 + _uniform(rng, shape, amount)) + grey
    return x.clamp_(0, 1)


def zoom(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Each image magnified by its factor about the centre, the size kept.

    A factor above 1 crops the centre and enlarges it; below 1 the image shrinks into a frame of
    its background. One batched ``grid_sample`` for all images, each with its own factor.
    """
    background = _border_median(x)
    antialias = ((1 / factors - 1) / 2).clamp_min(0)  # the sigma skimage.transform.rescale smooths a shrink with
    if antialias.max() > 0.3:  # below, a neighbour's weight is under 0.4 %: not worth a conv (factors >= 0.63)
        x = gaussian_blur(x, antialias)
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / factors  # output point u samples the input at u / factor
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    shifted = F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (shifted + background).clamp_(0, 1)  # zeros outside the image are the background


def _border_median(x: torch.Tensor) -> torch.Tensor:
    """Median colour of each image's one-pixel frame, (B, 3, 1, 1).

    The padding meets the image at its frame, so the frame's colour hides the seam; in a crop
    centred on a cell the frame is mostly plasma, and a neighbour's edge there is outvoted.
    """
    frame = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    return frame.median(dim=-1).values[..., None, None]


def gaussian_blur(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Each image blurred by a Gaussian of its own sigma (pixels): one separable grouped conv, reflect padding."""
    b, c, h, w = x.shape
    radius = min(max(1, math.ceil(3 * float(sigmas.max()))), h - 1, w - 1)  # 3 sigma: 99.7 % of the weight
    kernels = _gaussian_kernels(sigmas, radius).repeat_interleave(c, 0)  # one per image and channel
    flat = x.reshape(1, b * c, h, w)  # the images and channels as groups: one kernel each
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernels[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernels[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w).clamp_(0, 1)  # the weights sum to 1 only up to rounding


def _gaussian_kernels(sigmas: torch.Tensor, radius: int) -> torch.Tensor:
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    weights = torch.exp(-offsets ** 2 / (2 * sigmas.clamp_min(1e-3)[:, None] ** 2))  # sigma 0: the identity
    return weights / weights.sum(1, keepdim=True)


def gamma_curve(x: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """x ** gamma per image: another camera's tone curve (0 and 1 stay put)."""
    return x ** gammas.view(-1, 1, 1, 1)


def sensor_noise(x: torch.Tensor, stds: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise of each image's own standard deviation, clamped to [0, 1]."""
    return (x + stds.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=rng)).clamp_(0, 1)


def jpeg_roundtrip(x: torch.Tensor, qualities: torch.Tensor) -> torch.Tensor:
    """Each image encoded as a JPEG at its own quality and decoded again, in memory (PIL).

    The conversions to and from uint8 (H, W, 3) run once for the batch: done per image they made
    it 30 % slower (24 images at 128 px: 12 ms against 8.5 ms, of which the codec takes 5).
    """
    images = x.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    decoded = np.stack([_jpeg(image, int(q)) for image, q in zip(images, qualities)])
    return torch.from_numpy(decoded).permute(0, 3, 1, 2).float().div_(255)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)  # PIL's 4:2:0 chroma, as most cameras
    buffer.seek(0)
    with Image.open(buffer) as decoded:  # RGB in, RGB out: no convert
        return np.asarray(decoded)
