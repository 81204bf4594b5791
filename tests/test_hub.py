"""Model card, push (dry run and a recorded upload) and LoRA merge export, all offline."""

from pathlib import Path

import numpy as np
import pytest
import torch

from hemcap.captions import caption_variants
from hemcap.cli import main
from hemcap.config import LoraConfig, ModelConfig
from hemcap.hub import build_model_card, push
from hemcap.models import add_lora, load_backend, load_trained, read_model_info, write_model_info
from hemcap.synthetic import sample_attributes

METRICS = {"attribute_accuracy": 0.8123, "cell_type_accuracy": 0.9, "cider": 1.234, "bleu_4": 0.5,
           "field_accuracy": {"cell_size": 0.7}}


def texts(backend, rows, max_new_tokens):
    """Greedy captions through the engine (the one decoding path)."""
    from hemcap.engine import CaptionEngine, EngineSettings

    settings = EngineSettings(max_new_tokens=max_new_tokens, device="cpu")
    return [c.text for c in CaptionEngine(backend, settings=settings).caption_rows(rows)]



def tiny_blip(captions):
    return load_backend(ModelConfig(
        name_or_path=None, backend="blip", init="scratch", vocab_size=300,
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=96)), captions)


def write_summary(model_dir: Path, lora: bool, base_model: str | None = None) -> None:
    """The training summary a run records in the model's info."""
    info = read_model_info(model_dir)
    info.training = {"metrics": METRICS, "best_step": 10, "steps": 12, "training_minutes": 0.5, "init": "scratch",
                     "lora": lora, "data": {"path": "runs/data/wbcatt", "train_images": 6169, "val_images": 1030,
                                            "schema": "wbcatt", "recipe": "wbcatt"}}
    info.base_model = base_model or info.base_model
    info.magnification = {"red_cell_px": 73.8, "field_px": 361.5}
    info.colour = {"normalisation": "stain", "lab_mean": [79.2, 11.5, 7.4]}
    write_model_info(model_dir, info)


@pytest.fixture(scope="module")
def captions():
    rng = np.random.default_rng(0)
    return [c for _ in range(8) for c in caption_variants(sample_attributes(rng), "wbcatt", 1, 0)]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, captions) -> Path:
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    backend = tiny_blip(captions)
    backend.save_base(root / "base")
    add_lora(backend, LoraConfig(target_modules=["crossattention.self.query", "crossattention.self.value"]), True)
    with torch.no_grad():
        for name, param in backend.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # an adapter that changes the output
    backend.save(root / "model")
    write_summary(root / "model", lora=True)
    return root / "model"


def cell_rows(n=2):
    generator = torch.Generator().manual_seed(1)
    return [{"pixels": torch.rand(3, 32, 32, generator=generator)} for _ in range(n)]


def test_model_card_metadata_validates_offline(adapter_dir):
    from huggingface_hub import ModelCard, ModelCardData

    card = build_model_card(adapter_dir, "someone/hemcap-blip")
    parsed = ModelCard(str(card))  # re-reads the YAML header as the Hub would
    data = parsed.data
    assert isinstance(data, ModelCardData)
    ModelCardData(**data.to_dict())  # model-index round-trips through the Hub's own parser
    assert data.license == "apache-2.0" and data.library_name == "peft" and data.pipeline_tag == "image-to-text"
    assert "lora" in data.tags and "haematology" in data.tags
    results = {r.metric_name: r.metric_value for r in data.eval_results}
    assert results == {"mean attribute accuracy": 0.8123, "cell type accuracy": 0.9, "CIDEr-D": 1.234}
    assert all(r.dataset_name == "wbcatt" and r.dataset_split == "validation" for r in data.eval_results)
    text = parsed.text
    assert "research only; not for diagnosis" in text and "## Limitations" in text
    assert "6169 training" in text and "CC BY 4.0" in text and "| accuracy: cell_size | 0.7000 |" in text
    assert "red cells 74 px across in a 362 px field" in text and "(`stain` normalisation)" in text


def test_card_says_which_fields_a_refiner_decides(tmp_path, captions):
    tiny_blip(captions).save(tmp_path / "m")
    write_summary(tmp_path / "m", lora=False)
    assert "refiner" not in build_model_card(tmp_path / "m", "me/x").text
    info = read_model_info(tmp_path / "m")
    info.refiner = {"fields": {"nucleus_shape": 6}, "inputs": 62, "cells": 1500, "minutes": 1.6,
                    "validation": {"nucleus_shape": {"refiner": 0.75049, "captions": 0.71553}}}
    write_model_info(tmp_path / "m", info)
    text = build_model_card(tmp_path / "m", "me/x").text
    assert "re-decides nucleus_shape" in text and "nucleus_shape 0.7505 (the captions: 0.7155)" in text


def test_card_names_the_base_model_and_its_license(tmp_path, captions):
    backend = tiny_blip(captions)
    backend.save(tmp_path / "m")
    write_summary(tmp_path / "m", lora=False, base_model="Salesforce/blip-image-captioning-base")
    data = build_model_card(tmp_path / "m", "me/x").data
    assert data.base_model == "Salesforce/blip-image-captioning-base" and data.license == "bsd-3-clause"
    assert data.library_name == "transformers"


def test_push_dry_run_writes_the_exact_upload_folder(adapter_dir, tmp_path, capsys):
    out = tmp_path / "upload"
    assert main(["push", str(adapter_dir), "--repo-id", "someone/hemcap-blip", "--dry-run", "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json",
            "hemcap_model.json", "base_model/model.safetensors", "tokenizer.json"} <= files
    assert texts(load_trained(out), cell_rows(), 5) == texts(load_trained(adapter_dir), cell_rows(), 5)



def dry_run(model_dir, out, *extra) -> int:
    return main(["push", str(model_dir), "--repo-id", "someone/x", "--dry-run", "--out", str(out), *extra])


def test_dry_run_never_replaces_the_model_or_the_working_folder(adapter_dir, tmp_path, monkeypatch, capsys):
    """`--out .` once wiped the working folder and `--out <model>` the model."""
    before = sorted(p.name for p in adapter_dir.iterdir())
    work = tmp_path / "work"
    (work / "notes").mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (adapter_dir, adapter_dir.parent, adapter_dir / "upload", work, tmp_path):
        assert dry_run(adapter_dir, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "would replace, hold or sit inside the model folder" in err and "would replace the working folder" in err
    assert sorted(p.name for p in adapter_dir.iterdir()) == before and (work / "notes").is_dir()


def test_dry_run_replaces_only_an_earlier_dry_run(adapter_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work")
    assert dry_run(adapter_dir, mine) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert dry_run(adapter_dir, mine, "--overwrite") == 2
    assert "is not a folder `hemcap push --dry-run` wrote" in capsys.readouterr().err
    assert (mine / "thesis.txt").read_text() == "years of work"
    upload = tmp_path / "upload"
    assert dry_run(adapter_dir, upload) == 0
    (upload / "stale.txt").write_text("from before")
    assert dry_run(adapter_dir, upload, "--overwrite") == 0
    assert (upload / "README.md").is_file() and not (upload / "stale.txt").exists()
    assert not list(tmp_path.glob(".upload.*")), "no staging folder is left behind"


def test_upload_carries_no_local_paths(adapter_dir, tmp_path):
    import shutil

    model = tmp_path / "secret-place" / "model"
    shutil.copytree(adapter_dir, model)
    info = read_model_info(model)
    info.training["data"]["path"] = str(tmp_path / "secret-place" / "data")
    info.training["config"] = {"train": {"output_dir": str(tmp_path / "secret-place")}, "data": {"path": "../../d"}}
    write_model_info(model, info)
    out = Path(push(model, "someone/x", dry_run=True, out=tmp_path / "upload"))
    texts_ = [p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file()]
    assert not [t for t in texts_ if str(tmp_path) in t or "../" in t]
    training = read_model_info(out).training
    assert training["data"]["path"] == "data" and training["config"]["train"]["output_dir"] == "secret-place"

def test_push_uploads_that_folder_through_huggingface_hub(adapter_dir, monkeypatch):
    import huggingface_hub

    calls = {}

    class RecordingApi:
        def create_repo(self, repo_id, private, exist_ok, repo_type):
            calls["create"] = (repo_id, private, exist_ok, repo_type)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            calls["repo"] = repo_id

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    url = push(adapter_dir, "someone/hemcap-blip", private=True)
    assert url == "https://huggingface.co/someone/hemcap-blip"
    assert calls["create"] == ("someone/hemcap-blip", True, True, "model") and calls["repo"] == "someone/hemcap-blip"
    assert "README.md" in calls["files"] and "adapter_model.safetensors" in calls["files"]


def test_push_refuses_a_bad_repo_id(adapter_dir, capsys):
    assert main(["push", str(adapter_dir), "--repo-id", "no-slash", "--dry-run"]) == 2
    assert "should look like user/name" in capsys.readouterr().err


def test_export_merge_gives_a_plain_model_with_the_same_captions(adapter_dir, tmp_path):
    from transformers import BlipForConditionalGeneration

    out = tmp_path / "merged"
    assert main(["export", str(adapter_dir), "--merge", "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    BlipForConditionalGeneration.from_pretrained(out)  # standalone: no PEFT needed
    merged, adapter = load_trained(out), load_trained(adapter_dir)
    assert texts(merged, cell_rows(), 8) == texts(adapter, cell_rows(), 8)
    info = read_model_info(out)
    assert info.training["merged_from"] == str(adapter_dir) and not info.adapter and info.base_model is None
    assert main(["export", str(out), "--merge", "--out", str(tmp_path / "again")]) == 2  # nothing to merge
