"""The backend registry: a newcomer's backend (tests/tiny_backend.py) is one module and one line."""

import pytest
from PIL import Image

from hemcap.config import ModelConfig, RunConfig
from hemcap.models import registry


@pytest.fixture
def tiny_registered(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "tiny", "tiny_backend:TinyBackend")  # the one registry line
    return "tiny"


def test_shipped_backends_are_registered_and_found_by_model_type():
    assert registry.backend_names()[:2] == ("blip", "chat")
    assert registry.backend_for_model_type("blip") == "blip"
    assert registry.backend_for_model_type("gemma3") == "chat"  # any other image-text-to-text model


def test_unknown_backends_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown backend 'nope' \\(known: blip, chat"):
        registry.backend_class("nope")
    with pytest.raises(ValueError, match="backend='nope' should be one of auto, blip, chat"):
        ModelConfig(backend="nope", init="scratch")


def test_a_class_missing_part_of_the_protocol_is_refused():
    class Half:
        kind = "half"

    with pytest.raises(TypeError, match="lacks model_types, build_scratch"):
        registry.register_backend("half", Half)


def test_a_new_backend_trains_saves_reloads_and_captions(tiny_registered, tmp_path):
    from hemcap.engine import CaptionEngine
    from hemcap.hub import build_model_card
    from hemcap.models import read_model_info
    from hemcap.recipes import prepare_synthetic
    from hemcap.train import fit

    data = prepare_synthetic(tmp_path / "cells", n_train=16, n_val=4, n_test=2, size=32)
    cfg = RunConfig.from_dict({
        "model": {"backend": "tiny", "init": "scratch", "name_or_path": None, "vocab_size": 300,
                  "vision_config": {"image_size": 32}},
        "data": {"path": str(data)},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 8, "max_steps": 3, "lr": 1e-3},
        "eval": {"batch_size": 4, "max_new_tokens": 8}})
    model_dir = fit(cfg)
    info = read_model_info(model_dir)
    assert info.backend == "tiny" and info.image_size == [32, 32]
    assert "attribute_accuracy" in info.training["metrics"]
    engine = CaptionEngine.from_dir(model_dir)
    assert type(engine.backend).__name__ == "TinyBackend" and engine.settings.max_new_tokens == 8
    (caption,) = engine.caption([Image.new("RGB", (40, 40), "pink")])
    assert set(caption.attributes) == set(engine.schema.field_names) and len(caption.token_ids) <= 8
    assert "ViT-BERT encoder-decoder trained from random weights" in build_model_card(model_dir, "me/tiny").text
