import pytest
import yaml

from hemcap.schema import SchemaError, available_schemas, build_schema, load_schema, schema_dir

WBCATT_VALUES = {  # the exact strings in WBCAtt's CSVs
    "cell_size": {"big", "small"},
    "cell_shape": {"round", "irregular"},
    "nucleus_shape": {"unsegmented-band", "unsegmented-round", "unsegmented-indented",
                      "segmented-bilobed", "segmented-multilobed", "irregular"},
    "nuclear_cytoplasmic_ratio": {"high", "low"},
    "chromatin_density": {"densely", "loosely"},
    "cytoplasm_vacuole": {"yes", "no"},
    "cytoplasm_texture": {"clear", "frosted"},
    "cytoplasm_colour": {"light blue", "blue", "purple blue"},
    "granule_type": {"small", "round", "coarse", "nil"},
    "granule_colour": {"pink", "red", "purple", "nil"},
    "granularity": {"yes", "no"},
    "cell_type": {"Neutrophil", "Eosinophil", "Basophil", "Lymphocyte", "Monocyte"},
}


def test_shipped_schemas():
    assert available_schemas() == ["leukemiaattri", "wbcatt"]


def test_wbcatt_fields_match_the_csv_vocabulary():
    schema = load_schema("wbcatt")
    assert {n: set(schema.values(n)) for n in schema.field_names} == WBCATT_VALUES
    assert schema.attribute_names[0] == "cell_size" and len(schema.attribute_names) == 11
    assert schema.fields["cell_type"].column == "label"


def test_leukemiaattri_fields():
    schema = load_schema("leukemiaattri")
    assert schema.attribute_names == ("cell_size", "nuclear_chromatin", "nuclear_shape", "nucleolus",
                                      "cytoplasm", "cytoplasmic_basophilia", "cytoplasmic_vacuoles")
    assert len(schema.values("cell_type")) == 13
    assert schema.values("diagnosis") == ("ALL", "AML", "APML", "CLL", "CML", "healthy")
    assert schema.fields["nuclear_chromatin"].aliases == ("nuclear_chromatio",)


def test_schema_by_path_and_unknown_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text((schema_dir() / "wbcatt.yaml").read_text().replace("name: wbcatt", "name: mine"))
    assert load_schema(str(path)).name == "mine"
    with pytest.raises(SchemaError, match="unknown schema 'nope'; shipped schemas: leukemiaattri, wbcatt"):
        load_schema("nope")


def test_every_problem_is_reported_at_once():
    raw = yaml.safe_load((schema_dir() / "wbcatt.yaml").read_text())
    raw["fields"]["cell_size"]["values"]["big"] = []
    raw["clauses"]["body"] = ["{cell_size} and {cell_girth}"]
    raw["templates"].append(["{subject} with {nothing}"])
    with pytest.raises(SchemaError) as error:
        build_schema(raw)
    message = str(error.value)
    assert "fields.cell_size.big: no words" in message
    assert "unknown field 'cell_girth'" in message
    assert "unknown clause 'nothing'" in message
    assert "never states" in message


def test_clause_must_cover_every_value():
    raw = yaml.safe_load((schema_dir() / "wbcatt.yaml").read_text())
    raw["clauses"]["granules"] = [f for f in raw["clauses"]["granules"] if not (isinstance(f, dict) and f.get("fallback"))]
    with pytest.raises(SchemaError, match="clauses.granules: no form can say"):
        build_schema(raw)


def test_check_attributes_names_each_problem():
    schema = load_schema("wbcatt")
    problems = schema.check_attributes({"cell_size": "huge"}, "cells.csv line 3")
    assert "cells.csv line 3: cell_size='huge' is not a wbcatt value (expected one of big, small)" in problems
    assert "cells.csv line 3: missing field 'granularity'" in problems
