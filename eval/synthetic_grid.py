"""Figure: a grid of synthetic cells, each with the caption its attributes render to.

Cells come from ``hemcap.synthetic.make_cells`` (balanced over cell types, deterministic by
seed); captions from ``hemcap.captions.render`` with the WBCAtt schema, or plain
``key=value`` lines when the captions module cannot be imported.

    python eval/synthetic_grid.py --out docs/synthetic_cells.png --n 12 --seed 0
"""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from hemcap.synthetic import make_cells

MARGIN = 8  # px around and between panels
LINE_GAP = 2  # px between caption lines


def caption_for(attributes: dict[str, str]) -> str:
    """The schema caption, or key=value pairs if hemcap.captions is not usable."""
    try:
        from hemcap.captions import render
    except ImportError:
        return "; ".join(f"{key}={value}" for key, value in attributes.items())
    return render(attributes, schema="wbcatt")


def load_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # bundled scalable font (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def wrap(text: str, font, width_px: int) -> list[str]:
    """Greedy word wrap to a pixel width (the font is proportional)."""
    average = font.getlength("abcdefghijklmnopqrstuvwxyz") / 26
    columns = max(10, int(width_px / average))
    lines = textwrap.wrap(text, columns)
    while columns > 10 and any(font.getlength(line) > width_px for line in lines):
        columns -= 1
        lines = textwrap.wrap(text, columns)
    return lines


def draw_grid(n: int, seed: int, cell_px: int, columns: int, font_px: int) -> Image.Image:
    cells = make_cells(n, seed=seed, size=cell_px)
    font = load_font(font_px)
    captions = [wrap(caption_for(attributes), font, cell_px) for _, attributes in cells]
    text_height = max(len(lines) for lines in captions) * (font_px + LINE_GAP) + MARGIN
    rows = math.ceil(n / columns)
    panel_w, panel_h = cell_px + MARGIN, cell_px + text_height
    grid = Image.new("RGB", (columns * panel_w + MARGIN, rows * panel_h + MARGIN), "white")
    pen = ImageDraw.Draw(grid)
    for index, ((image, _), lines) in enumerate(zip(cells, captions)):
        left = MARGIN + (index % columns) * panel_w
        top = MARGIN + (index // columns) * panel_h
        grid.paste(image, (left, top))
        for k, line in enumerate(lines):
            y = top + cell_px + 3 + k * (font_px + LINE_GAP)
            pen.text((left, y), line, fill=(30, 30, 30), font=font)
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/synthetic_cells.png"))
    parser.add_argument("--n", type=int, default=12, help="number of cells")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell-px", type=int, default=160, help="size of each cell image")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--font-px", type=int, default=11)
    args = parser.parse_args()
    grid = draw_grid(args.n, args.seed, args.cell_px, args.columns, args.font_px)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out, optimize=True)
    print(f"wrote {args.out} ({grid.width}x{grid.height}, {args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
