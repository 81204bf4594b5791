"""Run configs: every shipped YAML loads, overrides apply, and every problem is reported at once."""

from pathlib import Path

import pytest
import yaml

from hemcap.config import PRECISIONS, ConfigError, RunConfig, add_train_arguments, config_from_args, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_there():
    names = {p.stem for p in CONFIGS}
    assert {"blip_base_full", "blip_base_lora", "medgemma_4b_lora", "medgemma_4b_qlora", "blip_tiny",
            "blip_small_scratch"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.train.max_steps or cfg.train.epochs


def test_recipes_in_the_shipped_configs():
    hemblip = load_config(CONFIGS[0].parent / "blip_base_lora.yaml")
    assert (hemblip.lora.r, hemblip.lora.alpha, hemblip.lora.dropout, hemblip.train.lr) == (8, 16, 0.05, 5e-5)
    assert hemblip.model.freeze_vision and all("crossattention" in t for t in hemblip.lora.target_modules)
    qlora = load_config(CONFIGS[0].parent / "medgemma_4b_qlora.yaml")
    assert (qlora.lora.quantize, qlora.lora.r, qlora.lora.alpha, qlora.lora.target_modules) == ("nf4", 16, 16, "all-linear")
    assert qlora.train.precision == "bf16" and qlora.model.backend == "chat"
    scratch = load_config(CONFIGS[0].parent / "blip_small_scratch.yaml")
    assert scratch.train.max_minutes and scratch.train.max_minutes <= 90  # issue 17's CPU budget
    vision = scratch.model.vision_config
    assert (vision["image_size"], vision["patch_size"], scratch.data.centre_crop) == (256, 32, 0.667)  # issue 17
    assert scratch.train.batch_size == 48
    assert scratch.model.vision_stem == "conv" and scratch.model.attribute_loss == 1.0
    assert scratch.train.refine == ["nucleus_shape"]  # issue 17: the nucleus geometry's second look
    assert scratch.data.stain_norm == "stain" and scratch.augment.restain == 1.0  # issue 14's looks


@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(p).model.init == "scratch"], ids=lambda p: p.stem)
def test_every_shipped_scratch_config_builds_and_trains_a_step(path):
    """Configs that start from random weights build here (the others need their Hub weights)."""
    import torch

    from hemcap.captions import render
    from hemcap.models import load_backend
    from hemcap.synthetic import sample_attributes

    cfg = load_config(path)
    rng = __import__("numpy").random.default_rng(0)
    captions = [render(sample_attributes(rng)) for _ in range(8)]
    backend = load_backend(cfg.model, captions)
    size = backend.image_size
    rows = [{"pixels": torch.rand(3, *size), "caption": c} for c in captions[:2]]
    loss = backend.training_loss(backend.model, backend.collate(rows, train=True))
    loss.backward()
    assert torch.isfinite(loss) and (backend.info.vision_stem is not None) == (cfg.model.vision_stem == "conv")


def test_all_problems_are_reported_at_once():
    raw = {"model": {"init": "scratch", "vocab_size": 0, "colour": "red"},
           "train": {"lr": -1, "precision": "fp8", "schedule": "zigzag", "batch_size": "many"},
           "lora": {"dropout": 2.0}, "optimiser": {}}
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(raw, source="bad.yaml")
    message = str(error.value)
    for expected in ("unknown section 'optimiser'", "model.colour: unknown key", "model.vocab_size=0",
                     "model.backend: init=scratch needs an explicit backend", "train.batch_size='many' should be int",
                     "lora.dropout=2.0 should be between 0.0 and 1.0", "bad.yaml"):
        assert expected in message, expected


def test_value_checks_follow_type_checks_in_each_section():
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"train": {"lr": -1, "precision": "fp8", "schedule": "zigzag", "schedule_over": "hours"}})
    message = str(error.value)
    assert "train.lr=-1.0 should be > 0" in message
    assert "train.precision='fp8' should be one of None, " + ", ".join(PRECISIONS) in message
    assert "train.schedule='zigzag'" in message
    assert "train.schedule_over='hours' should be one of steps, budget" in message


def test_ints_are_accepted_for_floats():
    assert RunConfig.from_dict({"train": {"lr": 1}}).train.lr == 1.0


def test_overrides_and_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {backend: blip, init: scratch, name_or_path: null}\ntrain: {lr: 0.001, max_steps: 5}\n")
    cfg = load_config(path, ["train.lr=1e-4", "augment.flip=false", "lora.target_modules=[query, value]"],
                      lora=True, output_dir=str(tmp_path / "out"))
    assert cfg.train.lr == 1e-4 and cfg.augment.flip is False
    assert cfg.lora.enabled and cfg.lora.target_modules == ["query", "value"]
    assert cfg.train.output_dir == str(tmp_path / "out") and cfg.train.max_steps == 5


def test_model_flag_means_a_pretrained_model_and_set_has_the_last_word(tmp_path):
    parser = add_train_arguments(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--config", str(CONFIGS[0].parent / "blip_tiny.yaml"), "--model", "some/model",
                              "--set", "model.backend=blip"])
    cfg = config_from_args(args)
    assert (cfg.model.name_or_path, cfg.model.init, cfg.model.backend) == ("some/model", "pretrained", "blip")


def test_overrides_reach_inside_mapping_fields():
    path = CONFIGS[0].parent / "quickstart.yaml"
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path, ["model.vision_config.num_hidden_layers=6", "model.text_config.hidden_size=64"])
    assert cfg.model.vision_config == {**raw["model"]["vision_config"], "num_hidden_layers": 6}
    assert cfg.model.text_config["hidden_size"] == 64
    assert load_config(path).model.vision_config["num_hidden_layers"] == 4  # the YAML is untouched
    assert load_config(None, ["model.vision_config.image_size=32"]).model.vision_config == {"image_size": 32}


def test_bad_overrides_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.learning_rate: unknown key"):
        load_config(None, ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.lr"])


def test_quantization_needs_lora_and_pretrained_weights():
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict({"lora": {"quantize": "nf4"}, "train": {"precision": "fp16"}})
    assert "quantization is for LoRA only" in str(error.value)
    assert "use bf16 with nf4" in str(error.value)
    with pytest.raises(ConfigError, match="needs pretrained weights"):
        RunConfig.from_dict({"model": {"backend": "blip", "init": "scratch"}, "lora": {"enabled": True, "quantize": "nf4"}})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_augment_values_out_of_range_are_reported_together():
    raw = {"augment": {"scale": 0.7, "blur": -1, "gamma": 2.0, "noise": 1.5, "jpeg_quality": 0, "restain": 5,
                       "restain_copies": 0}}
    with pytest.raises(ConfigError) as error:
        RunConfig.from_dict(raw)
    message = str(error.value)
    for expected in ("augment.scale=0.7 should be between 0.0 and 0.5", "augment.blur=-1.0 should be between",
                     "augment.gamma=2.0", "augment.noise=1.5", "augment.jpeg_quality=0 should be between 1 and 95",
                     "augment.restain=5.0 should be between 0.0 and 4.0", "augment.restain_copies=0 should be between"):
        assert expected in message, expected
    with pytest.raises(ConfigError, match="augment.jpeg_quality=96"):
        RunConfig.from_dict({"augment": {"jpeg_quality": 96}})
    cfg = RunConfig.from_dict({"augment": {"scale": 0.15, "blur": 1, "jpeg_quality": 60}}).augment
    assert (cfg.scale, cfg.blur, cfg.jpeg_quality, cfg.gamma, cfg.noise) == (0.15, 1.0, 60, 0.0, 0.0)
    assert RunConfig.from_dict({}).augment.jpeg_quality is None


def test_a_centre_crop_is_a_share_of_the_image():
    with pytest.raises(ConfigError, match=r"data.centre_crop=0.1 should be between 0.25 and 1.0"):
        RunConfig.from_dict({"data": {"path": "d", "centre_crop": 0.1}})
    assert RunConfig.from_dict({"data": {"path": "d"}}).data.centre_crop == 1.0
