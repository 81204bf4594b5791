"""Hostile uploads for the demo's tests (issue 15) and the bytes they are made of."""

import struct
import zlib
from pathlib import Path

# An EPS file: Pillow's EPS reader would run Ghostscript on it.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n0 0 moveto 8 8 lineto stroke\nshowpage\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG whose header says ``width`` x ``height``, whatever ``rows`` holds."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def write_hostile_files(folder: Path) -> dict[str, str]:
    """Writes them into ``folder``: file name -> the reason the page must give (after "<name> cannot
    be analysed: "). The demo reads at most 12 megapixels."""
    from PIL import Image

    (folder / "evil.png").write_bytes(EPS)
    (folder / "huge.png").write_bytes(png(50_000, 50_000, 8, 2, b"\x00" * 10))  # 2.5 gigapixels claimed
    Image.new("RGB", (64, 64), "red").save(folder / "cut.jpg", quality=95)
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:300])
    (folder / "empty.jpg").touch()
    (folder / "big.png").write_bytes(png(4000, 3001, 8, 2, b"\x00" * 10))
    return {"evil.png": "its content is EPS, not JPEG, PNG, TIFF, BMP or WebP",
            "huge.png": "too large to open safely (the limit is 12,000,000 pixels)",
            "cut.jpg": "corrupt or truncated image", "empty.jpg": "an empty file (0 bytes)",
            "big.png": "4000x3001 = 12,004,000 pixels exceeds the limit of 12,000,000"}
