"""ModelInfo: the one file that says what a model folder is; clear errors when it is missing or foreign."""

import json
import shutil

import pytest

from hemcap.models import INFO_FILE, ModelInfo, ModelInfoError, find_model_dir, read_model_info, write_model_info
from hemcap.schema import build_schema, load_schema


def test_info_round_trips_with_the_whole_schema(tmp_path):
    schema = load_schema("leukemiaattri")
    info = ModelInfo(backend="blip", schema=dict(schema.raw), image_size=[64, 64], decoding={"max_new_tokens": 9})
    write_model_info(tmp_path, info)
    again = read_model_info(tmp_path)
    assert again == info and again.schema_object().fields == schema.fields
    assert not list(tmp_path.glob(".*")), "written atomically: no temporary file left"


def test_checkpoints_and_run_folders_lead_to_their_model(tmp_path):
    write_model_info(tmp_path / "step-00000002" / "model",
                     ModelInfo(backend="blip", schema=dict(load_schema("wbcatt").raw)))
    assert find_model_dir(tmp_path / "step-00000002") == tmp_path / "step-00000002" / "model"


@pytest.mark.parametrize("content, message", [
    (None, "is not a hemcap model folder: it has no hemcap_model.json"),
    ({"kind": "blip", "adapter": False}, "has no format version: it was written by an early hemcap"),
    ({"version": 99, "backend": "blip", "schema": {}}, "has format version 99; this hemcap reads version 2"),
    ({"version": 2, "backend": "blip"}, "missing 'schema'"),
    ({"version": 2, "backend": "blip", "schema": {"name": "x"}, "colour_stats": 1}, "unknown key 'colour_stats'"),
])
def test_a_folder_that_is_not_a_model_gets_one_clear_sentence(tmp_path, content, message):
    if content is not None:
        (tmp_path / INFO_FILE).write_text(json.dumps(content))
    with pytest.raises(ModelInfoError, match=message) as error:
        read_model_info(tmp_path)
    assert str(tmp_path) in str(error.value) and "\n" not in str(error.value)


def test_a_copied_model_needs_no_schema_file(tmp_path):
    own = dict(load_schema("wbcatt").raw, name="mylab")
    write_model_info(tmp_path / "a", ModelInfo(backend="blip", schema=own))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert read_model_info(tmp_path / "b").schema_object() == build_schema(own)
