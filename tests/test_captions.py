import csv
import itertools
import random

import pytest

from hemcap.captions import (
    CaptionError,
    caption_variants,
    paraphrase,
    parse,
    render,
    tidy,
)
from hemcap.schema import load_schema

BAND_NEUTROPHIL = {
    "cell_size": "big", "cell_shape": "round", "nucleus_shape": "unsegmented-band",
    "nuclear_cytoplasmic_ratio": "low", "chromatin_density": "densely", "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear", "cytoplasm_colour": "light blue", "granule_type": "small",
    "granule_colour": "pink", "granularity": "yes", "cell_type": "Neutrophil",
}


def random_attributes(schema, rng):
    return {name: rng.choice(field.values) for name, field in schema.fields.items()}


def test_render_reads_like_an_expert():
    assert render(BAND_NEUTROPHIL) == (
        "Neutrophil, large and round, with a band-shaped nucleus, densely packed chromatin and a low "
        "N:C ratio; clear light blue cytoplasm with small pink granules; no vacuoles."
    )


def test_every_template_differs_and_round_trips():
    schema = load_schema("wbcatt")
    texts = [render(BAND_NEUTROPHIL, variant=v) for v in range(len(schema.templates))]
    assert len(set(texts)) == len(texts) >= 3
    assert all(parse(t) == BAND_NEUTROPHIL for t in texts)


def test_paraphrase_is_seeded_and_varied():
    assert paraphrase(BAND_NEUTROPHIL, seed=3) == paraphrase(BAND_NEUTROPHIL, seed=3)
    texts = {paraphrase(BAND_NEUTROPHIL, seed=s) for s in range(20)}
    assert len(texts) >= 15
    assert all(parse(t) == BAND_NEUTROPHIL for t in texts)


@pytest.mark.parametrize("schema_name", ["wbcatt", "leukemiaattri"])
def test_round_trip_on_random_combinations(schema_name):
    schema = load_schema(schema_name)
    rng = random.Random(0)
    for _ in range(400):
        attributes = random_attributes(schema, rng)
        for text in caption_variants(attributes, schema, n_paraphrases=3, seed=rng.randrange(10**6)):
            assert parse(text, schema) == attributes, text


def test_rare_granule_combinations_are_spelled_out():
    odd = dict(BAND_NEUTROPHIL, granule_type="nil", granule_colour="red", granularity="yes")
    text = render(odd)
    assert "no granule type and red granule colour" in text
    assert parse(text) == odd


def test_tidy_undoes_wordpiece_spacing():
    raw = "neutrophil, large and round, with a band - shaped nucleus and a low n : c ratio ; no vacuoles. it is granular ."
    assert tidy(raw) == ("Neutrophil, large and round, with a band-shaped nucleus and a low N:C ratio; no vacuoles. "
                         "It is granular.")
    assert parse(tidy(raw)) == parse(raw)


def test_render_rejects_bad_attributes():
    with pytest.raises(CaptionError, match="missing field 'granularity'"):
        render({k: v for k, v in BAND_NEUTROPHIL.items() if k != "granularity"})
    with pytest.raises(CaptionError, match="cell_size='huge'"):
        render(dict(BAND_NEUTROPHIL, cell_size="huge"))
    with pytest.raises(CaptionError, match="variant 9 out of range"):
        render(BAND_NEUTROPHIL, variant=9)


def test_leukemiaattri_diagnosis_and_cell_types():
    schema = load_schema("leukemiaattri")
    cell = {"cell_size": "large", "nuclear_chromatin": "open", "nuclear_shape": "regular",
            "nucleolus": "prominent", "cytoplasm": "scanty", "cytoplasmic_basophilia": "moderate",
            "cytoplasmic_vacuoles": "absent", "cell_type": "Abnormal promyelocyte", "diagnosis": "APML"}
    text = render(cell, schema)
    assert text.startswith("Large abnormal promyelocyte from a patient with acute promyelocytic leukaemia")
    assert parse(text, schema) == cell
    healthy = dict(cell, diagnosis="healthy", cell_type="Lymphocyte")
    assert "healthy donor" in render(healthy, schema)
    assert parse(render(healthy, schema, 2), schema) == healthy
    assert parse("from a patient with acute myeloid leukemia", schema)["diagnosis"] == "AML"  # US spelling


@pytest.mark.realdata
def test_round_trip_on_every_wbcatt_row(shared_data):
    """Acceptance: parse(render(a)) == a for all 10,298 rows, every template, 3 paraphrase seeds."""
    schema = load_schema("wbcatt")
    failures, checked = [], 0
    for split in ("train", "val", "test"):
        with open(shared_data / "wbcatt" / f"pbc_attr_v1_{split}.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                attributes = {n: row[schema.fields[n].column] for n in schema.field_names}
                texts = itertools.chain(
                    (render(attributes, schema, v) for v in range(len(schema.templates))),
                    (paraphrase(attributes, schema, seed) for seed in range(3)),
                )
                for text in texts:
                    checked += 1
                    if parse(text, schema) != attributes:
                        failures.append((row["img_name"], text))
    assert checked == 10_298 * (len(schema.templates) + 3)
    assert failures == []
