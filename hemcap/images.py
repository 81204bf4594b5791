"""Safe image loading for every part of hemcap: recipes, detector, pipeline and demo.

Every failure becomes an ``ImageError`` naming the file and the problem, so a batch can report it
and go on. Huge images are refused before decoding (decompression bombs), and unusual modes are
converted to 8-bit RGB: grayscale replicated, alpha composited on white, 16-bit scaled, CMYK
converted. ``square_crop`` cuts the square, context-padded cell crops the captioners take.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

# 40 MP: a 6000 x 6000 whole-slide tile; larger inputs should be tiled first.
MAX_PIXELS = 40_000_000
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})
NOT_AN_IMAGE = "skipped: not an image file (by its name)"  # iter_images' note for other files in a folder
_MODE_NAMES = {
    "L": "grayscale", "LA": "grayscale with alpha", "1": "1-bit", "P": "palette", "PA": "palette with alpha",
    "RGBA": "RGBA (alpha channel)", "CMYK": "CMYK", "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale",
    "I": "32-bit integer", "F": "32-bit float", "RGB": "RGB", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV",
}


class ImageError(ValueError):
    """An image that cannot be used. ``reason`` is the message without the path."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")


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
        return _scale_to_8bit(np.asarray(image, dtype=np.float64))
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
    12-bit data in 16-bit files); float or out-of-range data stretched to its own min..max."""
    top = values.max(initial=0)
    depth = next((bits for bits in (8, 10, 12, 14, 16) if top < 2**bits), None)
    if depth is None or values.min(initial=0) < 0 or not np.all(np.mod(values, 1) == 0):
        values = values - values.min(initial=0)
        high = max(values.max(initial=0), 1.0)
    else:
        high = 2.0**depth - 1
    gray = np.clip(values / high * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def background_colour(image: Image.Image) -> tuple[int, int, int]:
    """The slide background: median colour of the brightest quarter of the pixels (cells and red
    cells are darker, so a plain median lands on them when they fill the field)."""
    factor = min(4, image.width, image.height)
    small = image.reduce(factor) if factor > 1 else image
    pixels = np.asarray(small.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    brightness = pixels.sum(axis=1)
    bright = pixels[brightness >= np.quantile(brightness, 0.75)]
    return tuple(int(round(v)) for v in np.median(bright, axis=0))


def model_pixels(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """uint8 (3, height, width) of ``image`` at the model's input ``size``: the one resize that
    training, validation, evaluation and inference all use, so the model always sees the same pixels."""
    return np.asarray(model_sized(image, size)).transpose(2, 0, 1).copy()


def model_sized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` in RGB at the model's input ``size`` (height, width)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return image


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
    path = Path(path)
    if not path.exists():
        raise ImageError(path, "file not found")
    if path.is_dir():
        raise ImageError(path, "is a directory, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(path, f"too large to open safely ({error})") from None
    except OSError as error:
        raise ImageError(path, f"corrupt or truncated image ({error})") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        image.close()
        raise ImageError(path, f"{image.width}x{image.height} = {pixels:,} pixels exceeds the limit of {max_pixels:,}")
    return image


def _load(image: Image.Image, path: str | Path) -> None:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError(path, f"corrupt or truncated image ({error})") from None


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
