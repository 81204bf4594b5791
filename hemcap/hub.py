"""Hugging Face Hub: model cards, merged export of LoRA adapters, and push.

A trained model dir (``<output_dir>/model`` from ``hemcap train``) holds the weights or adapter,
the processor, ``hemcap_model.json`` and ``training.json`` (metrics, data, base model, config).
``build_model_card`` turns that into a card with valid Hub metadata; ``stage_upload`` writes the
exact folder a push uploads; ``push`` uploads it. Tokens come from the environment or
``huggingface-cli login`` and are never logged.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path

from hemcap.fileio import staging_dir, write_json

log = logging.getLogger(__name__)

TRAINING_FILE = "training.json"  # written by hemcap.train beside the final model
# Licenses of the known base models; anything else trained from scratch takes the project's.
BASE_LICENSES = {
    "Salesforce/blip-image-captioning-base": {"license": "bsd-3-clause"},
    "google/medgemma-4b-it": {"license": "other", "license_name": "health-ai-developer-foundations",
                              "license_link": "https://developers.google.com/health-ai-developer-foundations/terms"},
}
DATA_NOTES = {
    "wbcatt": "WBCAtt attribute annotations (Tsutsui et al., NeurIPS 2023; MIT) on the PBC images "
              "(Acevedo et al., Data in Brief 2020; CC BY 4.0)",
    "synthetic": "procedural synthetic cells from `hemcap.synthetic` (no patient data)",
}
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

A {{ kind_text }} that describes white blood cells the way a haematologist does, attribute by
attribute, so each statement can be checked. Trained with hemcap ({{ training_text }}).

**Intended use: research only; not for diagnosis.** It is not a medical device and has not been
validated clinically. Do not use it to make or support decisions about patients.

## Training data

{{ data_text }}

## Results (validation split, captions generated then parsed)

| metric | value |
|---|---|
{{ metrics_table }}

Mean attribute accuracy counts an attribute the caption omits as wrong.

## Use

```python
{{ usage }}
```

## Limitations

- Trained on one source of single-cell crops ({{ data_name }}): other microscopes, cameras, stains
  and magnifications shift colour and scale, and accuracy drops on them.
- It describes the attributes its schema knows and no others; it cannot flag what it was never shown
  (blasts, atypical or dysplastic cells unless the training data had them).
- Captions can state an attribute wrongly with fluent confidence; check the parsed attributes and
  their confidences, and read captions as a second opinion for research, never as a diagnosis.
- Metrics come from a validation split drawn from the same source as the training data.

## License

{{ license_text }}
"""


def read_training_summary(model_dir: str | Path) -> dict:
    path = Path(model_dir) / TRAINING_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def card_data(model_dir: str | Path, model_name: str, license: str | None = None):
    """The card's metadata (``ModelCardData``): license, base model, tags, evaluation results."""
    from huggingface_hub import EvalResult, ModelCardData

    summary = read_training_summary(model_dir)
    info = _model_info(model_dir)
    base = _hub_id(summary.get("base_model"))
    licensing = {"license": license} if license else BASE_LICENSES.get(base, {"license": "apache-2.0"})
    pipeline = "image-to-text" if info.get("kind") == "blip" else "image-text-to-text"
    metrics = summary.get("metrics", {})
    dataset = (summary.get("data") or {}).get("recipe") or "unknown"
    results = [EvalResult(task_type=pipeline, dataset_type=dataset, dataset_name=dataset, dataset_split="validation",
                          metric_type=metric, metric_name=name, metric_value=round(float(metrics[key]), 4))
               for key, metric, name in (("attribute_accuracy", "accuracy", "mean attribute accuracy"),
                                         ("cell_type_accuracy", "accuracy", "cell type accuracy"),
                                         ("cider", "cider", "CIDEr-D")) if key in metrics]
    tags = ["hemcap", "haematology", "white-blood-cells", "image-captioning", "medical-research"]
    tags += ["lora"] if info.get("adapter") else []
    return ModelCardData(model_name=model_name, base_model=base, library_name="peft" if info.get("adapter") else
                         "transformers", pipeline_tag=pipeline, tags=tags, eval_results=results or None,
                         **licensing)


def build_model_card(model_dir: str | Path, repo_id: str, license: str | None = None):
    """The model card (``huggingface_hub.ModelCard``) for the trained model in ``model_dir``."""
    from huggingface_hub import ModelCard

    summary = read_training_summary(model_dir)
    info = _model_info(model_dir)
    name = repo_id.split("/")[-1]
    data = card_data(model_dir, name, license)
    recipe = (summary.get("data") or {}).get("recipe") or "unknown"
    return ModelCard.from_template(
        data, template_str=CARD_TEMPLATE, model_name=name,
        kind_text=_kind_text(info, summary), training_text=_training_text(summary),
        data_text=_data_text(summary), data_name=recipe, metrics_table=_metrics_table(summary.get("metrics", {})),
        usage=_usage(repo_id, info), license_text=_license_text(data, recipe))


def _hub_id(name: str | None) -> str | None:
    """``name`` if it reads as a Hub repo id (a local dir is no use to the card's readers)."""
    if not name or Path(name).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None
    return name


def _model_info(model_dir) -> dict:
    path = Path(model_dir) / "hemcap_model.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _kind_text(info: dict, summary: dict) -> str:
    kind = {"blip": "BLIP captioning model", "chat": "vision-language chat model"}.get(info.get("kind"), "captioning model")
    adapter = "LoRA adapter for a " if info.get("adapter") else ""
    base = _hub_id(summary.get("base_model"))
    origin = f" fine-tuned from [{base}](https://huggingface.co/{base})" if base else " trained from random weights"
    return f"{adapter}{kind}{origin}"


def _training_text(summary: dict) -> str:
    if not summary:
        return "training details not recorded"
    return (f"{summary.get('steps')} steps, {summary.get('training_minutes')} min; best checkpoint at step "
            f"{summary.get('best_step')}")


def _data_text(summary: dict) -> str:
    data = summary.get("data") or {}
    recipe = data.get("recipe") or "unknown"
    source = DATA_NOTES.get(recipe, f"a dataset prepared with `hemcap prepare {recipe}`")
    return (f"{source}: {data.get('train_images', '?')} training and {data.get('val_images', '?')} validation images, "
            f"attribute schema `{data.get('schema', '?')}`.")


def _metrics_table(metrics: dict) -> str:
    rows = [(label, metrics[key]) for key, label in (("attribute_accuracy", "mean attribute accuracy"),
                                                    ("cell_type_accuracy", "cell type accuracy"),
                                                    ("cider", "CIDEr-D"), ("bleu_4", "BLEU-4")) if key in metrics]
    rows += sorted((f"accuracy: {k}", v) for k, v in (metrics.get("field_accuracy") or {}).items())
    return "\n".join(f"| {label} | {value:.4f} |" for label, value in rows) or "| (no validation recorded) | |"


def _usage(repo_id: str, info: dict) -> str:
    lines = ["from huggingface_hub import snapshot_download", "from hemcap.models import load_trained", "",
             f'backend = load_trained(snapshot_download("{repo_id}"))',
             'print(backend.generate([{"image": image}]))  # image: a PIL crop of one white blood cell']
    return "\n".join(lines)


def _license_text(data, recipe: str) -> str:
    text = f"Weights: `{data.license}`"
    if getattr(data, "license_name", None):
        text += f" ({data.license_name}, {data.license_link})"
    note = DATA_NOTES.get(recipe)
    return text + (f". Training data: {note}; respect its terms." if note else ".")


# ------------------------------------------------------------------------------ export and push


def export_merged(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base and write a standalone model dir (atomically)."""
    from hemcap.models import is_peft, load_trained, merge_lora

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    backend = load_trained(model_dir)
    if not is_peft(backend.model):
        raise ValueError(f"{model_dir} is a full model, not a LoRA adapter: there is nothing to merge")
    merged = merge_lora(backend)
    with staging_dir(out_dir, overwrite=True) as staging:
        merged.save(staging)
        summary = read_training_summary(model_dir)
        if summary:
            write_json(staging / TRAINING_FILE, {**summary, "merged_from": str(model_dir)}, indent=2)
    return out_dir


def stage_upload(model_dir: str | Path, staging: str | Path, repo_id: str, license: str | None = None) -> Path:
    """Write into ``staging`` exactly what ``push`` uploads: the model dir's files plus README.md (the card)."""
    from hemcap.models import check_model_dir

    model_dir, staging = check_model_dir(model_dir), Path(staging)
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    build_model_card(model_dir, repo_id, license).save(staging / "README.md")
    return staging


def push(model_dir: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
         out: str | Path | None = None, license: str | None = None) -> str:
    """Upload the model, processor and card to ``repo_id``; with ``dry_run``, only write the folder."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo-id {repo_id!r} should look like user/name")
    if dry_run:
        staging = Path(out) if out else Path(model_dir).parent / f"{Path(model_dir).name}-hub-upload"
        stage_upload(model_dir, staging, repo_id, license)
        return str(staging)
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="hemcap-push-") as tmp:
        staging = stage_upload(model_dir, Path(tmp) / "upload", repo_id, license)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(staging), repo_id=repo_id, repo_type="model",
                          commit_message="Upload hemcap model")
    log.info("pushed %s to %s", model_dir, url)
    return str(url)
