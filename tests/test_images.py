"""Safe image loading: every bad file becomes an ImageError naming the file, odd modes become 8-bit RGB."""

import struct

import numpy as np
import pytest
from PIL import Image

from hemcap.images import (READABLE, ImageError, centre_square, check_image, iter_images, load_rgb, model_pixels,
                           probe, square_crop, to_rgb)
from hostile import EPS, png


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ImageError, match="file not found") as error:
        load_rgb(tmp_path / "nope.jpg")
    assert "nope.jpg" in str(error.value)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not pixels")
    with pytest.raises(ImageError, match="not an image file"):
        load_rgb(path)


def test_eps_named_png_never_reaches_the_eps_reader(tmp_path, monkeypatch):
    """Pillow's EPS reader runs Ghostscript on the file; only JPEG, PNG, TIFF, BMP and WebP are tried."""
    Image.init()
    factory, accept = Image.OPEN["EPS"]
    opened = []
    monkeypatch.setitem(Image.OPEN, "EPS", (lambda *args: opened.append(args) or factory(*args), accept))
    path = tmp_path / "evil.png"
    path.write_bytes(EPS)
    with pytest.raises(ImageError) as error:
        load_rgb(path)
    assert opened == []
    assert error.value.plain == f"its content is EPS, not {READABLE}" and "evil.png" in str(error.value)


def test_other_pillow_formats_are_refused_by_name(tmp_path):
    path = tmp_path / "cells.gif"
    Image.new("P", (8, 8)).save(path)
    with pytest.raises(ImageError, match="its content is GIF, not JPEG, PNG, TIFF, BMP or WebP"):
        load_rgb(path)


def test_empty_file_says_so(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageError, match=r"empty.jpg: an empty file \(0 bytes\)$"):
        load_rgb(path)


def test_system_error_is_plain_and_pathless(tmp_path):
    """A socket opens with ENXIO: the reason is the system's words without the path it carries."""
    import socket
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # a socket path has at most 107 bytes
        path = Path(short) / "upload.png"
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            with pytest.raises(ImageError) as error:
                load_rgb(path)
    assert error.value.plain == "cannot be read (no such device or address)" and short not in error.value.reason


def test_truncated_jpeg_is_reported(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ImageError, match="corrupt or truncated") as error:
        load_rgb(path)
    assert error.value.path == str(path)
    assert error.value.plain == "corrupt or truncated image" and error.value.detail  # Pillow's words: logs only
    assert check_image(path) and "cut.jpg" in check_image(path)[0]


def test_pixel_limit_message_gives_size_and_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (600, 500), "white").save(path)
    with pytest.raises(ImageError, match=r"600x500 = 300,000 pixels exceeds the limit of 100,000"):
        load_rgb(path, max_pixels=100_000)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"  # header claims 100k x 100k pixels; a decode would need 30 GB
    path.write_bytes(png(100_000, 100_000, 8, 2, b"\x00" * 10))
    with pytest.raises(ImageError, match="too large|exceeds the limit") as error:
        load_rgb(path)
    assert "bomb.png" in str(error.value)
    assert error.value.plain == "too large to open safely (the limit is 40,000,000 pixels)"


def test_grayscale_becomes_rgb_with_a_note(tmp_path):
    path = tmp_path / "gray.png"
    Image.fromarray(np.full((8, 8), 77, np.uint8)).save(path)
    notes = []
    image = load_rgb(path, notes=notes)
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [77, 77, 77]
    assert notes and "grayscale" in notes[0]


def test_16_bit_grayscale_uses_its_bit_depth(tmp_path):
    full, twelve = tmp_path / "full.png", tmp_path / "twelve.png"
    Image.fromarray(np.array([[0, 65535]], np.uint16)).save(full)
    Image.fromarray(np.array([[0, 2048, 4095]], np.uint16)).save(twelve)  # 12-bit camera data in 16-bit file
    assert np.asarray(load_rgb(full))[0, :, 0].tolist() == [0, 255]
    assert np.asarray(load_rgb(twelve))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_tiff_is_scaled_exactly(tmp_path, mode):
    values = np.array([[0, 1, 2047, 2048, 4094, 4095], [0, 257, 32767, 32768, 65534, 65535]], np.uint16)
    for row, high in zip(values, (4095, 65535)):  # 12-bit camera data, then full 16-bit
        path = tmp_path / f"{high}.tif"
        Image.frombytes(mode, (row.size, 1), row.astype(">u2" if mode == "I;16B" else "<u2").tobytes()).save(path)
        with Image.open(path) as saved:
            assert saved.mode == mode
        expected = np.floor(row / high * 255.0 + 0.5)
        assert np.asarray(load_rgb(path))[0, :, 1].tolist() == expected.tolist()


def test_16_bit_conversion_needs_a_few_bytes_per_pixel():
    """The float64 arithmetic it replaced took 24 bytes per pixel of numpy memory: 1.3 GB at 40 MP."""
    import tracemalloc

    image = Image.fromarray(np.random.default_rng(0).integers(0, 65536, (1000, 2000), dtype=np.uint16))
    tracemalloc.start()
    try:
        to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / 2_000_000 < 6


def test_float_image_is_stretched_to_its_range():
    image = Image.fromarray(np.array([[-1.0, 0.0, 1.0]], np.float32))
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 128, 255]


def test_48_bit_rgb_png_reads_as_8_bit(tmp_path):
    path = tmp_path / "rgb48.png"
    pixel = struct.pack(">HHH", 65535, 32768, 0)
    path.write_bytes(png(2, 1, 16, 2, b"\x00" + pixel * 2))
    assert np.asarray(load_rgb(path))[0, 0].tolist() == [255, 128, 0]


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(tmp_path, mode):
    path = tmp_path / f"{mode}.png"
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 0))  # fully transparent red
    image = rgba.convert(mode) if mode != "P" else rgba.convert("P")
    if mode == "P":
        image.info["transparency"] = image.getpixel((0, 0))
    image.save(path, **({"transparency": image.getpixel((0, 0))} if mode == "P" else {}))
    notes = []
    assert np.asarray(load_rgb(path, notes=notes))[0, 0].tolist() == [255, 255, 255]
    assert "alpha composited on white" in notes[0]


def test_cmyk_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=100)
    red = np.asarray(load_rgb(path))[8, 8]
    assert red[0] > 240 and red[1] < 15 and red[2] < 15


def test_probe_reads_the_header(tmp_path):
    path = tmp_path / "ok.png"
    Image.new("L", (5, 3)).save(path)
    info = probe(path)
    assert (info.format, info.mode, info.size) == ("PNG", "L", (5, 3))
    assert check_image(path) == []


def test_iter_images_expands_folders_and_notes_other_files(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "a.jpg")
    Image.new("RGB", (2, 2)).save(tmp_path / "sub" / "b.PNG")
    (tmp_path / "readme.txt").write_text("hi")
    found = dict(iter_images([tmp_path, tmp_path / "missing.jpg"]))
    assert found[tmp_path / "a.jpg"] is None and found[tmp_path / "sub" / "b.PNG"] is None
    assert "not an image" in found[tmp_path / "readme.txt"]
    assert found[tmp_path / "missing.jpg"] == "file not found"


def test_square_crop_pads_beyond_the_border():
    image = Image.new("RGB", (100, 80), (10, 20, 30))
    crop = square_crop(image, (0, 0, 40, 20), margin=0.25, fill=(255, 255, 255))
    assert crop.size == (60, 60)  # 40 + 2 x 0.25 x 40
    pixels = np.asarray(crop)
    assert pixels[0, 0].tolist() == [255, 255, 255]  # outside the image: fill
    assert pixels[30, 30].tolist() == [10, 20, 30]  # inside: the image
    assert square_crop(image, (10, 10, 30, 30), size=16).size == (16, 16)


def test_a_centre_crop_keeps_the_middle_of_a_pbc_sized_field():
    field = Image.new("RGB", (360, 363), (0, 0, 255))  # blue surround, red cell 240 px across in the middle
    field.paste((255, 0, 0), (60, 61, 300, 301))
    assert centre_square(field, 2 / 3).size == (240, 240)
    assert centre_square(field, 2 / 3).getcolors() == [(240 * 240, (255, 0, 0))]
    whole, cell = model_pixels(field, (32, 32)), model_pixels(field, (32, 32), crop=2 / 3)
    assert whole[2, 0, 0] == 255 and whole[0, 16, 16] == 255  # the whole field: blue corner, red middle
    assert (cell[0] == 255).all() and (cell[2] == 0).all()  # the crop: only the cell, at the same input size
