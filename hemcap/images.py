"""Safe image loading for every part of hemcap: recipes, detector, pipeline and demo.

Every failure becomes an ``ImageError`` naming the file and the problem, so a batch can report it
and go on. Only the formats of ``IMAGE_FORMATS`` are opened: Pillow would otherwise run any of
its readers on any file whatever its name (an EPS renamed ``.png`` reaches the EPS reader, which
runs Ghostscript on it). Huge images are refused before decoding (decompression bombs), and
unusual modes are converted to 8-bit RGB: grayscale replicated, alpha composited on white, 16-bit
scaled, CMYK converted. ``square_crop`` cuts the square, context-padded cell crops the captioners take.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

# 40 MP: a 6000 x 6000 whole-slide tile; larger inputs should be tiled first.
MAX_PIXELS = 40_000_000
IMAGE_FORMATS = {"JPEG": "JPEG", "PNG": "PNG", "TIFF": "TIFF", "BMP": "BMP", "WEBP": "WebP"}  # Pillow's name: ours
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})
READABLE = "{} or {}".format(", ".join(list(IMAGE_FORMATS.values())[:-1]), list(IMAGE_FORMATS.values())[-1])
ROW_BLOCK = 512  # rows converted at a time from float pixels: 12 MB of float32 temporaries at 6000 px wide
NOT_AN_IMAGE = "skipped: not an image file (by its name)"  # iter_images' note for other files in a folder
_MODE_NAMES = {
    "L": "grayscale", "LA": "grayscale with alpha", "1": "1-bit", "P": "palette", "PA": "palette with alpha",
    "RGBA": "RGBA (alpha channel)", "CMYK": "CMYK", "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale",
    "I": "32-bit integer", "F": "32-bit float", "RGB": "RGB", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV",
}


class ImageError(ValueError):
    """An image that cannot be used. ``plain`` says why in our words, with no path and no library
    text (what a web page may show); ``reason`` adds the library's ``detail`` (logs, batch summaries)."""

    def __init__(self, path: str | Path, plain: str, detail: str | None = None):
        self.path, self.plain, self.detail = str(path), plain, detail
        self.reason = f"{plain} ({detail})" if detail else plain
        super().__init__(f"{path}: {self.reason}")


@dataclass(frozen=True)
class ImageInfo:
    """What the file header says, checked by a cheap partial decode."""

    format: str
    mode: str
    size: tuple[int, int]


def describe_mode(mode: str) -> str:
    return _MODE_NAMES.get(mode, mode)


def probe(path: str | Path, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """Open and verify an image without a full decode; raise ImageError with the reason."""
    with _open(path, max_pixels) as image:
        info = ImageInfo(image.format or "?", image.mode, image.size)
        if image.format == "JPEG":  # decode at 1/8 scale: catches truncation at a tenth of the cost
            image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
        _load(image, path)
    return info


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS, notes: list[str] | None = None) -> Image.Image:
    """The image as 8-bit RGB, whatever its mode; ImageError if it cannot be read.

    When the file was not 8-bit RGB, a line saying what was converted is appended to ``notes``.
    """
    with _open(path, max_pixels) as image:
        _load(image, path)
        if notes is not None and image.mode != "RGB":
            kind = " ".join(filter(None, (describe_mode(image.mode), image.format)))
            notes.append(f"converted {kind} image to 8-bit RGB"
                         + (" (alpha composited on white)" if _has_alpha(image) else ""))
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: alpha on white, 16-bit and float scaled to 0..255."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _scale_to_8bit(np.asarray(image))
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    return "A" in image.mode or (image.mode == "P" and "transparency" in image.info)


def _scale_to_8bit(values: np.ndarray) -> Image.Image:
    """Integer data scaled by the full range of its bit depth (8, 10, 12, 14 or 16 bits: cameras store
    12-bit data in 16-bit files); float or out-of-range data stretched to its own min..max.

    Integers go through a lookup table (1 byte out per pixel, no temporaries), floats through float32
    in row blocks: the float64 arithmetic this replaced took 1.3 GB for a 40 MP 16-bit TIFF."""
    low, top = values.min(initial=0), values.max(initial=0)
    depth = next((bits for bits in (8, 10, 12, 14, 16) if top < 2**bits), None)
    if depth is not None and low >= 0 and _integral(values):
        gray = _depth_table(depth)[values if values.dtype.kind in "iu" else values.astype(np.uint16)]
    else:
        gray = _stretched(values, float(low), max(float(top) - float(low), 1.0))
    return Image.fromarray(gray).convert("RGB")


def _depth_table(depth: int) -> np.ndarray:
    """uint8 of every value of a ``depth``-bit integer: round(value / (2**depth - 1) * 255)."""
    return np.floor(np.arange(2**depth) / (2.0**depth - 1) * 255.0 + 0.5).astype(np.uint8)


def _integral(values: np.ndarray) -> bool:
    if values.dtype.kind in "iu":
        return True
    return all(np.array_equal(block, np.floor(block)) for block in _row_blocks(values))


def _stretched(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 of ``(values - low) / high * 255``, rounded and clipped, a block of rows at a time."""
    gray = np.empty(values.shape, np.uint8)
    for rows, block in zip(_row_slices(values), _row_blocks(values)):
        scaled = (block.astype(np.float32) - np.float32(low)) * np.float32(255.0 / high) + np.float32(0.5)
        gray[rows] = np.clip(scaled, 0, 255)
    return gray


def _row_slices(values: np.ndarray) -> list[slice]:
    return [slice(start, start + ROW_BLOCK) for start in range(0, values.shape[0], ROW_BLOCK)]


def _row_blocks(values: np.ndarray):
    return (values[rows] for rows in _row_slices(values))


def background_colour(image: Image.Image) -> tuple[int, int, int]:
    """The slide background: median colour of the brightest quarter of the pixels (cells and red
    cells are darker, so a plain median lands on them when they fill the field)."""
    factor = min(4, image.width, image.height)
    small = image.reduce(factor) if factor > 1 else image
    pixels = np.asarray(small.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    brightness = pixels.sum(axis=1)
    bright = pixels[brightness >= np.quantile(brightness, 0.75)]
    return tuple(int(round(v)) for v in np.median(bright, axis=0))


def model_pixels(image: Image.Image, size: tuple[int, int], crop: float = 1.0) -> np.ndarray:
    """uint8 (3, height, width) of ``image`` at the model's input ``size``: the one crop and resize
    that training, validation, evaluation and inference all use, so the model always sees the same pixels."""
    return np.asarray(model_sized(image, size, crop)).transpose(2, 0, 1).copy()


def model_sized(image: Image.Image, size: tuple[int, int], crop: float = 1.0) -> Image.Image:
    """``image`` in RGB at the model's input ``size`` (height, width); only its centred square of
    ``crop`` times its shorter side when ``crop`` < 1 (``ModelInfo.centre_crop``)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if crop < 1:
        image = centre_square(image, crop)
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return image


def centre_square(image: Image.Image, share: float) -> Image.Image:
    """The square at the centre of ``image`` whose side is ``share`` of the image's shorter side."""
    side = max(1, round(share * min(image.size)))
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def square_crop(image: Image.Image, box, margin: float = 0.25, size: int | None = None,
                fill: tuple[int, int, int] | None = None, min_side: float | None = None) -> Image.Image:
    """A square RGB crop centred on ``box`` = (x0, y0, x1, y1), ``margin`` of the box's longer side
    added on each side, at least ``min_side`` across, resized to ``size`` x ``size`` when given.
    Parts outside the image are filled with ``fill`` (default: `background_colour`)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(max(x1 - x0, y1 - y0, 1.0) * (1 + 2 * margin), min_side or 0.0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    extent = max(1, int(round(side)))
    if fill is None:
        fill = background_colour(image)
    canvas = Image.new("RGB", (extent, extent), tuple(fill))
    inside = (max(0, left), max(0, top), min(image.width, left + extent), min(image.height, top + extent))
    if inside[0] < inside[2] and inside[1] < inside[3]:
        canvas.paste(image.crop(inside), (inside[0] - left, inside[1] - top))
    return canvas.resize((size, size), Image.BICUBIC) if size else canvas


def _open(path: str | Path, max_pixels: int) -> Image.Image:
    path = _existing_file(Path(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path, formats=tuple(IMAGE_FORMATS))
    except UnidentifiedImageError:
        raise ImageError(path, _unreadable_format(path)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(path, f"too large to open safely (the limit is {max_pixels:,} pixels)", str(error)) from None
    except OSError as error:
        raise _read_error(path, error) from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        image.close()
        raise ImageError(path, f"{image.width}x{image.height} = {pixels:,} pixels exceeds the limit of {max_pixels:,}")
    return image


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise ImageError(path, "file not found")
    if path.is_dir():
        raise ImageError(path, "is a directory, not an image")
    return path


def _unreadable_format(path: Path) -> str:
    """Why a file none of ``IMAGE_FORMATS`` reads was refused, naming what it is when Pillow's
    signature checks know it (they look at its first 16 bytes and run no reader)."""
    with path.open("rb") as file:
        prefix = file.read(16)
    if not prefix:
        return "an empty file (0 bytes)"
    Image.init()
    known = next((name for name, (_, accept) in Image.OPEN.items()
                  if name not in IMAGE_FORMATS and accept and _accepts(accept, prefix)), None)
    if known:
        return f"its content is {known}, not {READABLE}"
    return f"not an image file (format not recognised); hemcap reads {READABLE}"


def _accepts(accept, prefix: bytes) -> bool:
    try:
        return bool(accept(prefix))
    except Exception:  # noqa: BLE001 - a signature check on too few bytes
        return False


def _read_error(path: Path, error: OSError) -> ImageError:
    """A system error (errno set: permission, I/O) in plain words without its path; else a decoder's."""
    if error.errno is not None:
        return ImageError(path, f"cannot be read ({os.strerror(error.errno).lower()})")
    return ImageError(path, "corrupt or truncated image", str(error))


def _load(image: Image.Image, path: str | Path) -> None:
    try:
        image.load()
    except OSError as error:
        raise _read_error(Path(path), error) from None
    except (SyntaxError, ValueError) as error:
        raise ImageError(path, "corrupt or truncated image", str(error)) from None


def check_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> list[str]:
    """Problems with an image file, as messages (empty when it is usable)."""
    try:
        probe(path, max_pixels)
    except ImageError as error:
        return [str(error)]
    return []


def iter_images(paths: Iterable[str | Path]) -> Iterator[tuple[Path, str | None]]:
    """``(path, note)`` for every file named or inside a named folder (sorted).

    Files whose suffix is not an image's come with a note saying they were skipped; a name
    that does not exist comes with a note too. Nothing here opens the images.
    """
    for entry in map(Path, paths):
        if entry.is_dir():
            for child in sorted(p for p in entry.rglob("*") if p.is_file()):
                yield child, None if child.suffix.lower() in IMAGE_SUFFIXES else NOT_AN_IMAGE
        elif entry.exists():
            yield entry, None
        else:
            yield entry, "file not found"
