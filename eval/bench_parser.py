"""Parser throughput: captions parsed per second.

Captions are every template plus 3 paraphrases of real WBCAtt rows when ../shared/data is
there, otherwise of random attribute combinations. Each caption is parsed once (no cache).

    python eval/bench_parser.py [--data-dir ../shared/data] [--limit 20000]
"""

from __future__ import annotations

import argparse
import csv
import random
import time
from pathlib import Path

from hemcap.captions import caption_variants, compiled_parser
from hemcap.schema import load_schema

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def attribute_rows(data_dir: Path, schema, limit: int) -> tuple[list[dict], str]:
    csv_path = data_dir / "wbcatt" / "pbc_attr_v1_test.csv"
    if csv_path.is_file():
        with csv_path.open(newline="") as handle:
            rows = [{n: r[schema.fields[n].column] for n in schema.field_names} for r in csv.DictReader(handle)]
        return rows[:limit], f"WBCAtt test rows from {csv_path}"
    rng = random.Random(0)
    rows = [{n: rng.choice(f.values) for n, f in schema.fields.items()} for _ in range(limit)]
    return rows, "random attribute combinations (no real data found)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=3099, help="attribute rows to caption")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported")
    args = parser.parse_args()
    schema = load_schema("wbcatt")
    rows, origin = attribute_rows(args.data_dir, schema, args.limit)
    captions = [c for i, row in enumerate(rows) for c in caption_variants(row, schema, 3, seed=i)]
    parse = compiled_parser(schema).parse
    best = float("inf")
    for _ in range(args.repeats):
        started = time.perf_counter()
        results = [parse(c) for c in captions]
        best = min(best, time.perf_counter() - started)
    exact = sum(r == row for r, row in zip(results, (row for row in rows for _ in range(len(schema.templates) + 3))))
    print(f"captions: {len(captions)} ({origin})")
    print(f"round trip exact: {exact}/{len(captions)}")
    print(f"parse: {best:.3f} s -> {len(captions) / best:,.0f} captions/s (target >= 20,000)")


if __name__ == "__main__":
    main()
