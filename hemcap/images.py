"""Safe image loading for every part of hemcap: recipes, detector, pipeline and demo.

Every failure becomes an ``ImageError`` naming the file and the problem, so a batch can report it
and go on. Huge images are refused before decoding (decompression bombs), and unusual modes are
converted to 8-bit RGB: grayscale replicated, alpha composited on white, 16-bit scaled, CMYK
converted.
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


def load_rgb(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image as 8-bit RGB, whatever its mode; ImageError if it cannot be read."""
    with _open(path, max_pixels) as image:
        _load(image, path)
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: alpha on white, 16-bit and float scaled to 0..255."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _scale_to_8bit(np.asarray(image, dtype=np.float64))
    if "A" in image.mode or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _scale_to_8bit(values: np.ndarray) -> Image.Image:
    high = 65535.0 if values.max(initial=0) > 255 else 255.0
    if values.max(initial=0) > 65535 or values.min(initial=0) < 0:  # float or 32-bit: stretch to range
        values = values - values.min()
        high = max(values.max(), 1.0)
    gray = np.clip(values / high * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


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
                yield child, None if child.suffix.lower() in IMAGE_SUFFIXES else "skipped: not an image file"
        elif entry.exists():
            yield entry, None
        else:
            yield entry, "file not found"
