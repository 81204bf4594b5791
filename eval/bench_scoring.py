"""Time scoring the WBCAtt test split (3,099 captions) with every metric but METEOR.

References are the real test rows rendered with ``hemcap.captions.render`` (template 0, or the
first N templates); predictions are seeded paraphrases, a share of them perturbed (a wrong value,
a dropped sentence, an empty caption) so the faithfulness metrics have errors to count.

    python eval/bench_scoring.py [--data ../shared/data/wbcatt] [--references 1 4]

Target (issue 4): <= 10 s on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import time
from pathlib import Path

from hemcap.captions import paraphrase, parse, render
from hemcap.metrics import ptb_tokenize, score_records
from hemcap.schema import load_schema

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wbcatt"


def load_test_rows(data_dir: Path, schema) -> list[dict]:
    with (data_dir / "pbc_attr_v1_test.csv").open(newline="", encoding="utf-8") as f:
        return [
            {"id": row["img_name"], "attributes": {n: row[fld.column] for n, fld in schema.fields.items()}}
            for row in csv.DictReader(f)
        ]


def perturbed_caption(attributes: dict, schema, rng: random.Random) -> str:
    """A paraphrase; 30% with one wrong value, 10% with a sentence dropped, 1% empty."""
    attributes = dict(attributes)
    roll = rng.random()
    if roll < 0.01:
        return ""
    if roll < 0.31:
        name = rng.choice(schema.attribute_names)
        attributes[name] = rng.choice([v for v in schema.values(name) if v != attributes[name]])
    text = paraphrase(attributes, schema, seed=rng.randrange(1 << 30))
    if roll > 0.9:
        sentences = text.split(". ")
        if len(sentences) > 1:
            sentences.pop(rng.randrange(1, len(sentences)))
        text = ". ".join(sentences)
    return text


def make_records(rows: list[dict], schema, n_references: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for row in rows:
        caption = perturbed_caption(row["attributes"], schema, rng)
        records.append({
            "id": row["id"],
            "caption": caption,
            "references": [render(row["attributes"], schema, v) for v in range(n_references)],
            "reference_attributes": row["attributes"],
            "attributes": dict(parse(caption, schema)),
            "confidences": {n: None for n in schema.field_names},
            "schema": schema.name,
        })
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with pbc_attr_v1_test.csv")
    parser.add_argument("--references", type=int, nargs="+", default=[1, 4], help="reference captions per image")
    args = parser.parse_args()
    schema = load_schema("wbcatt")
    rows = load_test_rows(args.data, schema)
    for n_refs in args.references:
        records = make_records(rows, schema, n_refs)
        start = time.perf_counter()
        ptb_tokenize([r["caption"] for r in records] + [c for r in records for c in r["references"]])
        tokenize_s = time.perf_counter() - start
        start, cpu = time.perf_counter(), time.process_time()
        result = score_records(records, meteor=False)
        total_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu
        caption, faith = result["caption"], result["faithfulness"]
        print(
            f"{len(records)} captions, {n_refs} reference(s) each: scored in {total_s:.2f} s "
            f"(Python CPU {cpu_s:.2f} s; PTB tokenizer alone {tokenize_s:.2f} s; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores) | CIDEr-D {caption['cider_d']:.3f} "
            f"BLEU-4 {caption['bleu_4']:.3f} ROUGE-L {caption['rouge_l']:.3f} "
            f"HemBLIP-BLEU {caption['bleu_hemblip']:.3f} | mean attribute accuracy "
            f"{faith['attribute_mean']['accuracy']:.3f} | parser on references "
            f"{result['parser_on_references']['accuracy']:.3f}"
        )


if __name__ == "__main__":
    main()
