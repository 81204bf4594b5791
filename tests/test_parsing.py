"""The parser: exact phrases, clause-level reading of free text, its guarantees, and recall and
precision on a dev set of captions written the way textbooks, reports and chat models write
(``tests/data/parser_dev.jsonl``: 230 captions, written independently of hemcap's templates)."""

import json
from pathlib import Path

import pytest

from hemcap.parsing import compiled_parser, expand, normalize, parse, phrase_table
from hemcap.schema import SchemaError, build_schema, load_schema

DEV_SET = Path(__file__).parent / "data" / "parser_dev.jsonl"
BAND_NEUTROPHIL = {
    "cell_size": "big", "cell_shape": "round", "nucleus_shape": "unsegmented-band",
    "nuclear_cytoplasmic_ratio": "low", "chromatin_density": "densely", "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear", "cytoplasm_colour": "light blue", "granule_type": "small",
    "granule_colour": "pink", "granularity": "yes", "cell_type": "Neutrophil",
}
NIL_GRANULES = {"granularity": "no", "granule_type": "nil", "granule_colour": "nil"}


def stated(text: str) -> dict:
    return {k: v for k, v in parse(text).items() if v is not None}


def dev_scores(rows) -> tuple[float, float]:
    """(recall of stated attributes, precision of what was read); an attribute read that the caption
    does not state counts against precision."""
    stated_n = right = read = 0
    for row in rows:
        parsed = parse(row["text"])
        stated_n += len(row["expected"])
        right += sum(parsed[f] == v for f, v in row["expected"].items())
        read += len(parsed.stated)
    return right / stated_n, right / read


# ------------------------------------------------------------------------------ exact phrases


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


def test_ambiguous_phrases_are_a_schema_error():
    raw = {
        "name": "bad", "targets": ["cell_type"],
        "fields": {"cell_type": {"values": {"A": ["cell"], "B": ["cell"]}}},
        "clauses": {"subject": ["{cell_type}"]},
        "templates": [["{subject}"]],
    }
    with pytest.raises(SchemaError, match="ambiguous phrases"):
        phrase_table(build_schema(raw))



# ------------------------------------------------------------------------------ reading free text


@pytest.mark.parametrize("text, expected", [
    ("The nucleus is bilobed and segmented", {"nucleus_shape": "segmented-bilobed"}),
    ("chromatin loosely packed", {"chromatin_density": "loosely"}),
    ("cytoplasm vacuolated", {"cytoplasm_vacuole": "yes"}),
    ("Irregular in shape.", {"cell_shape": "irregular"}),
    ("The nucleus is irregular in shape.", {"nucleus_shape": "irregular"}),
    ("Size: large. Shape: irregular. Nucleus: indented. N:C ratio: low.",
     {"cell_size": "big", "cell_shape": "irregular", "nucleus_shape": "unsegmented-indented",
      "nuclear_cytoplasmic_ratio": "low"}),
    ("nucleus has two lobes", {"nucleus_shape": "segmented-bilobed"}),
    ("a nucleus with three or more lobes", {"nucleus_shape": "segmented-multilobed"}),
    ("a round (unsegmented) nucleus", {"nucleus_shape": "unsegmented-round"}),
    ("indented but not segmented", {"nucleus_shape": "unsegmented-indented"}),
    ("round regular outline", {"cell_shape": "round"}),
])
def test_copular_key_value_and_count_phrasings(text, expected):
    assert stated(text) == expected


@pytest.mark.parametrize("text", ["without granules", "agranular", "no granules", "Granules: none.",
                                  "granules are not seen", "I don't see any granules."])
def test_denied_granules_state_all_three_fields(text):
    assert stated(text) == NIL_GRANULES


def test_negation_reaches_what_is_coordinated_and_stops_at_the_clause():
    assert stated("No toxic granulation or vacuoles.") == {"cytoplasm_vacuole": "no"}
    assert stated("no granules or vacuoles") == {**NIL_GRANULES, "cytoplasm_vacuole": "no"}
    assert stated("non-vacuolated cytoplasm") == {"cytoplasm_vacuole": "no"}
    assert stated("No vacuoles, but fine pink granules.") == {
        "cytoplasm_vacuole": "no", "granule_type": "small", "granule_colour": "pink", "granularity": "yes"}


def test_adjectives_go_to_the_noun_they_describe():
    assert stated("Small, round, agranular lymphocyte with a high N:C ratio, dense chromatin and scant pale blue "
                  "cytoplasm.") == {
        "cell_type": "Lymphocyte", "cell_size": "small", "cell_shape": "round", "nuclear_cytoplasmic_ratio": "high",
        "chromatin_density": "densely", "cytoplasm_colour": "light blue", **NIL_GRANULES}
    assert stated("Eosinophil with a round, unsegmented nucleus.") == {
        "cell_type": "Eosinophil", "nucleus_shape": "unsegmented-round"}
    assert stated("Granules: round, red-orange.") == {"granule_type": "round", "granule_colour": "red",
                                                      "granularity": "yes"}


def test_what_is_about_other_things_or_in_doubt_states_nothing():
    assert stated("The surrounding red cells are pink and round.") == {}
    assert stated("Other cells in the field include two neutrophils with fine granules.") == {}
    assert stated("Possibly a monocyte, though it could be a large lymphocyte.") == {}
    assert stated("Probably a neutrophil, but a metamyelocyte can't be excluded.") == {}
    assert stated("eosinophil? vs basophil") == {}
    assert stated("Unlike a neutrophil, this eosinophil has a bilobed nucleus.") == {
        "cell_type": "Eosinophil", "nucleus_shape": "segmented-bilobed"}
    assert stated("Pink granules rather than large and red ones.") == {"granule_colour": "pink", "granularity": "yes"}
    assert stated("No toxic granulation in this neutrophil.") == {"cell_type": "Neutrophil"}


def test_explain_gives_the_span_each_attribute_was_read_from():
    text = "Lymphocyte. Nucleus: round. Vacuoles: none; granules absent."
    parsed = parse(text, explain=True)
    assert [text[a:b] for a, b in parsed.spans["cell_type"]] == ["Lymphocyte"]
    assert [text[a:b] for a, b in parsed.spans["nucleus_shape"]] == ["round"]
    assert [text[a:b] for a, b in parsed.spans["cytoplasm_vacuole"]] == ["Vacuoles"]
    assert [text[a:b] for a, b in parsed.spans["granularity"]] == ["granules"]
    assert parse(text) == parsed and parse(text).spans == {}


def test_a_reading_entry_stands_for_each_of_its_phrases_once():
    phrases = expand("(about |)(red (blood |)cell(s|)|rbc(s|))")
    assert len(phrases) == len(set(phrases)) == 2 * (4 + 2)  # nested groups expand only in their own option
    assert {"about red blood cells", "rbc", "red cell"} <= set(phrases)
    assert expand("a (b|c") == ["a (b|c"] and expand("(c (a|b)") == ["(c a", "(c b"]  # an unclosed "(" is text


def test_reading_entries_must_be_text():
    raw = dict(load_schema("wbcatt").raw)
    raw["reading"] = {**raw["reading"], "negations": [False, "not"], "topics": {"x": {"fields": ["nope"]}}}
    with pytest.raises(SchemaError) as error:
        build_schema(raw)
    assert "reading.negations: False is not text (quote yes, no, on and off in YAML)" in str(error.value)
    assert "reading.topics.x: unknown field 'nope'" in str(error.value)
    assert "reading.topics.x: no nouns" in str(error.value)


def test_recall_and_precision_on_the_dev_set():
    """Targets (issue 16): recall >= 95 % of stated attributes, precision >= 99.5 %. The phrase-only
    parser before the clause reader read 34.7 % of these captions' attributes at 91.0 % precision."""
    rows = [json.loads(line) for line in DEV_SET.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 150 and sum(len(r["expected"]) for r in rows) >= 1500
    recall, precision = dev_scores(rows)
    assert recall >= 0.95 and precision >= 0.995, (recall, precision)
