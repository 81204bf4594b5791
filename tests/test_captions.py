import csv
import itertools
import random

import pytest

from hemcap.captions import (
    CaptionError,
    caption_variants,
    compiled_parser,
    normalize,
    paraphrase,
    parse,
    phrase_table,
    render,
    tidy,
)
from hemcap.schema import build_schema, load_schema, SchemaError

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


def test_parser_is_robust_to_case_punctuation_order_and_spelling():
    text = ("NO VACUOLES!!  clear, light-blue cytoplasm... small pink granules (a low n/c ratio) --- "
            "band-shaped nucleus; densely packed chromatin; large and round neutrophil")
    assert parse(text) == BAND_NEUTROPHIL
    assert parse("Pale blue cytoplasm")["cytoplasm_colour"] == "light blue"
    assert normalize("A low N:C ratio") == "low nc ratio"


def test_parser_reports_omissions_as_none():
    parsed = parse("Eosinophil with a bilobed nucleus.")
    assert parsed["cell_type"] == "Eosinophil" and parsed["nucleus_shape"] == "segmented-bilobed"
    assert parsed["cytoplasm_colour"] is None
    assert set(parsed.stated) == {"cell_type", "nucleus_shape"}
    assert parse("") == {name: None for name in load_schema("wbcatt").field_names}


def test_parser_reports_contradictions_instead_of_guessing():
    parsed = parse("Neutrophil with a bilobed nucleus and a band-shaped nucleus; no vacuoles; vacuoles.")
    assert parsed["nucleus_shape"] is None and parsed["cytoplasm_vacuole"] is None
    assert parsed.contradictions == {
        "nucleus_shape": ("segmented-bilobed", "unsegmented-band"),
        "cytoplasm_vacuole": ("no", "yes"),
    }
    assert parsed["cell_type"] == "Neutrophil"


def test_longest_phrase_wins():
    # "round" alone is no phrase; "round red granules" is granules, "round nucleus" the nucleus
    parsed = parse("round red granules and a round nucleus")
    assert parsed["granule_type"] == "round" and parsed["nucleus_shape"] == "unsegmented-round"
    assert parsed["cell_shape"] is None


def test_phrase_matches_locate_the_evidence():
    text = "Neutrophil, Large and round; a LOW N:C ratio."
    matches = compiled_parser("wbcatt").matches(text)
    assert [(m.phrase, m.start, m.end) for m in matches] == [
        ("neutrophil", 0, 1), ("large and round", 2, 5), ("low nc ratio", 6, 9)]
    assert [text[m.char_start : m.char_end] for m in matches] == ["Neutrophil", "Large and round", "LOW N:C ratio"]
    assert matches[2].assignment == {"nuclear_cytoplasmic_ratio": "low"}


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


def test_ambiguous_phrases_are_a_schema_error():
    raw = {
        "name": "bad", "targets": ["cell_type"],
        "fields": {"cell_type": {"values": {"A": ["cell"], "B": ["cell"]}}},
        "clauses": {"subject": ["{cell_type}"]},
        "templates": [["{subject}"]],
    }
    with pytest.raises(SchemaError, match="ambiguous phrases"):
        phrase_table(build_schema(raw))


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
