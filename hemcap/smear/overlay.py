"""The overlay a reviewer looks at: the image with each cell's numbered box coloured by its cell
type, flagged cells framed in yellow, the differential along the bottom edge, and a red banner
along the top when the image looks unlike the captioner's training data (``hemcap.domain``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from PIL import Image

from hemcap.smear.detect import as_pil_rgb

if TYPE_CHECKING:
    from hemcap.smear.report import SmearReport

# Distinct on a pink-and-violet smear; cell types take them in schema order.
PALETTE = [(0, 114, 178), (0, 158, 115), (213, 94, 0), (204, 121, 167), (86, 180, 233), (230, 159, 0),
           (0, 0, 0), (120, 60, 160)]
UNCLASSIFIED_COLOUR = (110, 110, 110)
FLAG_COLOUR = (255, 214, 0)
WARNING_COLOUR = (200, 30, 30)
WARNING_TEXT = "Looks unlike the training data: check every caption"  # the report holds the reasons


def draw_overlay(image: Image.Image, report: SmearReport) -> Image.Image:
    """The image with each cell's box, number and cell type; flagged cells get a yellow outer
    frame and a yellow '!' tab. A footer line gives the differential. Lines and text scale with the
    image (2 px lines and 16 px text at 640x480)."""
    from PIL import ImageDraw

    canvas = as_pil_rgb(image).copy()
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(canvas.size) / 240))
    font = _font(max(12, round(min(canvas.size) / 30)))
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(report.cell_types())}
    for cell in report.cells:
        box = cell.box or (0, 0, canvas.width - 1, canvas.height - 1)
        cell_type = report.cell_type(cell)
        colour = colours.get(cell_type, UNCLASSIFIED_COLOUR)
        if cell.flags:
            draw.rectangle(_grow(box, line, canvas.size), outline=FLAG_COLOUR, width=line)
        draw.rectangle(box, outline=colour, width=line)
        _label(draw, f"{cell.index} {cell_type}", box, colour, font, canvas.size, cell.box is None, bool(cell.flags))
    _footer(canvas, report, font)
    if report.warning:
        _banner(canvas, WARNING_TEXT, font)
    return canvas


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _grow(box, by: int, size: tuple[int, int]):
    x0, y0, x1, y1 = box
    return max(0, x0 - by), max(0, y0 - by), min(size[0] - 1, x1 + by), min(size[1] - 1, y1 + by)


def _label(draw, text: str, box, colour, font, size: tuple[int, int], inside: bool, flagged: bool) -> None:
    """Text on a filled tab above the box's top-left corner (inside it when there is no room),
    followed by a yellow '!' tab when the cell is flagged."""
    tabs = [(text, colour)] + ([("!", FLAG_COLOUR)] if flagged else [])
    extents = [draw.textbbox((0, 0), t, font=font) for t, _ in tabs]
    widths = [right - left + 8 for left, _, right, _ in extents]
    height = max(bottom - top for _, top, _, bottom in extents) + 4
    x = min(max(0, box[0]), max(0, size[0] - sum(widths)))
    y = box[1] - height if box[1] - height >= 0 and not inside else box[1]
    for (tab, fill), (left, top, _, _), width in zip(tabs, extents, widths):
        draw.rectangle((x, y, x + width, y + height), fill=fill)
        draw.text((x + 4 - left, y + 2 - top), tab, fill=(0, 0, 0) if sum(fill) > 450 else (255, 255, 255), font=font)
        x += width


def _banner(canvas: Image.Image, text: str, font) -> None:
    """``text`` in white on a red strip along the top edge."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.rectangle((0, 0, min(canvas.width, right - left + 8), bottom - top + 6), fill=WARNING_COLOUR)
    draw.text((4 - left, 3 - top), text, fill=(255, 255, 255), font=font)


def _footer(canvas: Image.Image, report: SmearReport, font) -> None:
    """The differential on a translucent strip along the bottom edge."""
    from PIL import ImageDraw

    from hemcap.smear.report import describe_red_cells

    counts = ", ".join(f"{n} {name}" for name, n in report.counts().items())
    n = len(report.cells)
    text = f"{n} cell{'s' if n != 1 else ''}" + (f": {counts}" if counts else " found")
    text += f"; {len(report.flagged)} flagged (!)" if report.flagged else ""
    text += f"; {describe_red_cells(report.red_cells)}" if report.red_cells else ""
    strip = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(strip)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    y = canvas.height - (bottom - top) - 6
    draw.rectangle((0, y, min(canvas.width, right - left + 8), canvas.height), fill=(255, 255, 255, 200))
    draw.text((4 - left, y + 3 - top), text, fill=(0, 0, 0, 255), font=font)
    canvas.paste(Image.alpha_composite(canvas.convert("RGBA"), strip).convert("RGB"))
