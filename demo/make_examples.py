"""Draw the demo's bundled examples with ``hemcap.synthetic`` (no patient data).

    python demo/make_examples.py   # rewrites demo/examples/

Two 640x480 smears with four white cells of different types each (JPEG, quality 90, as a
camera writes them) and three 128x128 single-cell crops (PNG), about 210 KB in all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hemcap.synthetic import draw_cell, draw_smear, sample_attributes

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
SMEAR_SEEDS = {"smear_1.jpg": 11, "smear_2.jpg": 25}  # each: four cells of four different types
CELLS = {"cell_neutrophil.png": ("Neutrophil", 1), "cell_eosinophil.png": ("Eosinophil", 2),
         "cell_lymphocyte.png": ("Lymphocyte", 3)}


def main(out_dir: Path = EXAMPLES_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, seed in SMEAR_SEEDS.items():
        image, _ = draw_smear(seed, n_wbc=4)
        image.save(out_dir / name, quality=90)
    for name, (cell_type, seed) in CELLS.items():
        attributes = sample_attributes(np.random.default_rng(seed), cell_type)
        draw_cell(attributes, size=128, seed=seed).save(out_dir / name)
    total = sum(path.stat().st_size for path in out_dir.iterdir())
    print(f"wrote {len(SMEAR_SEEDS) + len(CELLS)} examples to {out_dir} ({total / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
