"""The parser side by side on two sets: recall, precision and captions parsed per second.

- **dev**: ``tests/data/parser_dev.jsonl``, captions written the way textbooks, reports and chat
  models describe cells, independently of hemcap's templates, with the attributes each states;
- **templates**: every template plus 3 paraphrases of real WBCAtt rows when ../shared/data is there
  (else of random attribute combinations), whose attributes are known exactly.

Recall: stated attributes read right. Precision: reads that are right (reading an attribute the
caption does not state counts against it). Each caption is parsed once per pass (no cache); the
best of ``--repeats`` passes is reported, and the best of as many builds of the parser (what each
process pays once, on its first caption).

    python eval/bench_parser.py [--data-dir ../shared/data] [--limit 3099]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import time
from pathlib import Path

from hemcap.captions import caption_variants
from hemcap.parsing import Parser, compiled_parser
from hemcap.schema import load_schema

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEV_SET = REPO / "tests" / "data" / "parser_dev.jsonl"


def attribute_rows(data_dir: Path, schema, limit: int) -> tuple[list[dict], str]:
    csv_path = data_dir / "wbcatt" / "pbc_attr_v1_test.csv"
    if csv_path.is_file():
        with csv_path.open(newline="") as handle:
            rows = [{n: r[schema.fields[n].column] for n in schema.field_names} for r in csv.DictReader(handle)]
        return rows[:limit], f"WBCAtt test rows from {csv_path}"
    rng = random.Random(0)
    rows = [{n: rng.choice(f.values) for n, f in schema.fields.items()} for _ in range(limit)]
    return rows, "random attribute combinations (no real data found)"


def template_set(data_dir: Path, schema, limit: int) -> tuple[list[str], list[dict], str]:
    rows, origin = attribute_rows(data_dir, schema, limit)
    pairs = [(c, row) for i, row in enumerate(rows) for c in caption_variants(row, schema, 3, seed=i)]
    return [c for c, _ in pairs], [row for _, row in pairs], origin


def dev_set() -> tuple[list[str], list[dict]]:
    rows = [json.loads(line) for line in DEV_SET.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["text"] for r in rows], [r["expected"] for r in rows]


def measure(texts: list[str], expected: list[dict], repeats: int) -> dict:
    parse = compiled_parser("wbcatt").parse
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        results = [parse(t) for t in texts]
        best = min(best, time.perf_counter() - started)
    stated = sum(len(e) for e in expected)
    right = sum(r[f] == v for r, e in zip(results, expected) for f, v in e.items())
    read = sum(len(r.stated) for r in results)
    return {"captions": len(texts), "stated": stated, "recall": right / stated, "precision": right / max(read, 1),
            "per_second": len(texts) / best}


def build_seconds(schema, repeats: int) -> float:
    """The best of ``repeats`` builds of the parser (lexicon, trie, compiled regex)."""
    best = float("inf")
    for _ in range(repeats):
        re.purge()  # re keeps the patterns it compiled: each build compiles its own anew
        started = time.perf_counter()
        Parser(schema)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=3099, help="attribute rows to caption for the template set")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported")
    args = parser.parse_args()
    schema = load_schema("wbcatt")
    texts, rows, origin = template_set(args.data_dir, schema, args.limit)
    sets = {"dev (free text)": measure(*dev_set(), args.repeats), "templates": measure(texts, rows, args.repeats)}
    print(f"template captions: {origin}")
    print("| set | captions | attributes stated | recall | precision | captions/s |")
    print("|---|---|---|---|---|---|")
    for name, m in sets.items():
        print(f"| {name} | {m['captions']} | {m['stated']} | {m['recall']:.1%} | {m['precision']:.2%} "
              f"| {m['per_second']:,.0f} |")
    print(f"building the parser: {build_seconds(schema, args.repeats):.2f} s (best of {args.repeats})")
    print("targets: recall >= 95 %, precision >= 99.5 % (dev); round trip 100 % and >= 20,000 captions/s (templates)")


if __name__ == "__main__":
    main()
