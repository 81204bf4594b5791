"""Hugging Face Hub: model cards, merged export of LoRA adapters, and push.

A trained model dir (``<output_dir>/model`` from ``hemcap train``) holds the weights or adapter,
the processor and ``hemcap_model.json`` (``ModelInfo``: backend, schema, training summary with
metrics, data, base model, config). ``build_model_card`` turns that into a card with valid Hub metadata; ``stage_upload`` writes the
exact folder a push uploads; ``push`` uploads it. Tokens come from the environment or
``huggingface-cli login`` and are never logged.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import tempfile
from pathlib import Path

from hemcap.fileio import staging_dir

log = logging.getLogger(__name__)

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

Mean attribute accuracy counts an attribute the caption omits as wrong.{{ refiner_text }}

## Use

```python
{{ usage }}
```

## Limitations

- Trained on one source of single-cell crops ({{ data_name }}): other microscopes, cameras, stains
  and magnifications shift colour and scale, and accuracy drops on them. {{ domain_text }}
- It describes the attributes its schema knows and no others; it cannot flag what it was never shown
  (blasts, atypical or dysplastic cells unless the training data had them).
- Captions can state an attribute wrongly with fluent confidence; check the parsed attributes and
  their confidences, and read captions as a second opinion for research, never as a diagnosis.
- Metrics come from a validation split drawn from the same source as the training data.

## License

{{ license_text }}
"""


def card_data(model_dir: str | Path, model_name: str, license: str | None = None):
    """The card's metadata (``ModelCardData``): license, base model, tags, evaluation results."""
    from huggingface_hub import EvalResult, ModelCardData

    from hemcap.models import read_model_info

    info = read_model_info(model_dir)
    summary = info.training
    base = _hub_id(info.base_model)
    licensing = {"license": license} if license else BASE_LICENSES.get(base, {"license": "apache-2.0"})
    pipeline = _backend_attribute(info, "pipeline_tag", "image-text-to-text")
    metrics = summary.get("metrics", {})
    dataset = (summary.get("data") or {}).get("recipe") or "unknown"
    results = [EvalResult(task_type=pipeline, dataset_type=dataset, dataset_name=dataset, dataset_split="validation",
                          metric_type=metric, metric_name=name, metric_value=round(float(metrics[key]), 4))
               for key, metric, name in (("attribute_accuracy", "accuracy", "mean attribute accuracy"),
                                         ("cell_type_accuracy", "accuracy", "cell type accuracy"),
                                         ("cider", "cider", "CIDEr-D")) if key in metrics]
    tags = ["hemcap", "haematology", "white-blood-cells", "image-captioning", "medical-research"]
    tags += ["lora"] if info.adapter else []
    return ModelCardData(model_name=model_name, base_model=base, library_name="peft" if info.adapter else
                         "transformers", pipeline_tag=pipeline, tags=tags, eval_results=results or None,
                         **licensing)


def build_model_card(model_dir: str | Path, repo_id: str, license: str | None = None):
    """The model card (``huggingface_hub.ModelCard``) for the trained model in ``model_dir``."""
    from huggingface_hub import ModelCard

    from hemcap.models import read_model_info

    info = read_model_info(model_dir)
    summary = info.training
    name = repo_id.split("/")[-1]
    data = card_data(model_dir, name, license)
    recipe = (summary.get("data") or {}).get("recipe") or "unknown"
    return ModelCard.from_template(
        data, template_str=CARD_TEMPLATE, model_name=name,
        kind_text=_kind_text(info, summary), training_text=_training_text(summary),
        data_text=_data_text(summary), data_name=recipe, metrics_table=_metrics_table(summary.get("metrics", {})),
        usage=_usage(repo_id), license_text=_license_text(data, recipe), domain_text=_domain_text(info),
        refiner_text=_refiner_text(info))


def _refiner_text(info) -> str:
    """The fields a refiner decides (``hemcap.models.refiner``), with its validation figure beside the captions'."""
    if not info.refiner:
        return ""
    scores = info.refiner.get("validation") or {}
    parts = [f"{name} {s['refiner']:.4f} (the captions: {s['captions']:.4f})" if s.get("captions") is not None
             else f"{name} {s['refiner']:.4f}" for name, s in scores.items() if s.get("refiner") is not None]
    figures = f" On validation: {'; '.join(parts)}." if parts else ""
    return (f" The table is the captions' own; the model then re-decides {', '.join(info.refiner['fields'])} from its "
            f"attribute heads and the measured nucleus geometry (a refiner fitted on the training split).{figures}")


def _domain_text(info) -> str:
    """What hemcap does about other labs' images for this model (``hemcap.domain``), in one or two sentences."""
    from hemcap.domain import Domain

    domain = Domain.from_info(info)
    if domain is None or not domain.red_cell_px:
        return ""
    text = (f"Its training images show red cells {domain.red_cell_px:.0f} px across in a {domain.field_px:.0f} px "
            "field; hemcap crops other smears' cells over that field at their own magnification")
    if domain.normalises:
        text += f", gives them the training images' colours (`{domain.normalisation}` normalisation)"
    return text + " and warns when a smear looks unlike the training data."


def _hub_id(name: str | None) -> str | None:
    """``name`` if it reads as a Hub repo id (a local dir is no use to the card's readers)."""
    if not name or Path(name).exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return None
    return name


def backend_title(info) -> str:
    """What the model is, in words: its backend's title ("BLIP captioning model")."""
    return _backend_attribute(info, "title", "captioning model")


def _backend_attribute(info, name: str, default: str) -> str:
    """A class attribute of the model's backend (title, pipeline_tag); ``default`` for one not registered here."""
    from hemcap.models import backend_class

    try:
        return getattr(backend_class(info.backend), name)
    except ValueError:
        return default


def _kind_text(info, summary: dict) -> str:
    kind = backend_title(info)
    adapter = "LoRA adapter for a " if info.adapter else ""
    base = _hub_id(info.base_model)
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


def _usage(repo_id: str) -> str:
    lines = ["from huggingface_hub import snapshot_download", "from hemcap.engine import CaptionEngine", "",
             f'engine = CaptionEngine.from_dir(snapshot_download("{repo_id}"))',
             "(caption,) = engine.caption([image])  # image: a PIL crop of one white blood cell",
             "print(caption.text, caption.attributes)  # parsed with the schema the model carries"]
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
    from hemcap.models import is_peft, load_trained, merge_lora, write_model_info

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    backend = load_trained(model_dir)
    if not is_peft(backend.model):
        raise ValueError(f"{model_dir} is a full model, not a LoRA adapter: there is nothing to merge")
    merged = merge_lora(backend)
    with staging_dir(out_dir, overwrite=True) as staging:
        merged.save(staging)
        info = dataclasses.replace(merged.info, training={**merged.info.training, "merged_from": str(model_dir)})
        write_model_info(staging, info)
    return out_dir


def stage_upload(model_dir: str | Path, staging: str | Path, repo_id: str, license: str | None = None) -> Path:
    """Write into ``staging`` (new or empty) exactly what ``push`` uploads: the model dir's files, its
    info without this machine's paths, and README.md (the card)."""
    from hemcap.models import find_model_dir, read_model_info, write_model_info

    model_dir, staging = find_model_dir(model_dir), Path(staging)
    shutil.copytree(model_dir, staging, ignore=shutil.ignore_patterns(".*", "__pycache__"), dirs_exist_ok=True)
    info = read_model_info(staging)
    write_model_info(staging, dataclasses.replace(info, training=without_local_paths(info.training)))
    build_model_card(model_dir, repo_id, license).save(staging / "README.md")
    return staging


def without_local_paths(value):
    """``value`` with every absolute or ``..`` path cut to its last part: the training summary records
    where this machine kept the data ("/home/alice/runs/x/data"), which is nobody else's business."""
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and _is_local_path(value):
        return Path(value).name
    return value


def _is_local_path(text: str) -> bool:
    return text.startswith(("/", "~")) or re.match(r"[A-Za-z]:[\\/]", text) is not None or ".." in Path(text).parts


def push(model_dir: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
         out: str | Path | None = None, license: str | None = None, overwrite: bool = False) -> str:
    """Upload the model, processor and card to ``repo_id``; with ``dry_run``, only write the folder
    (``out``, default ``<model_dir>-hub-upload``; an existing one is replaced only with ``overwrite``)."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"--repo-id {repo_id!r} should look like user/name")
    if dry_run:
        target = Path(out) if out else Path(model_dir).parent / f"{Path(model_dir).name}-hub-upload"
        check_upload_folder(model_dir, target, overwrite)
        with staging_dir(target, overwrite=overwrite) as staging:
            stage_upload(model_dir, staging, repo_id, license)
        return str(target)
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="hemcap-push-") as tmp:
        staging = stage_upload(model_dir, Path(tmp) / "upload", repo_id, license)
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(staging), repo_id=repo_id, repo_type="model",
                          commit_message="Upload hemcap model")
    log.info("pushed %s to %s", model_dir, url)
    return str(url)


UPLOAD_MARKERS = ("README.md", "hemcap_model.json")  # what every dry-run folder holds


def check_upload_folder(model_dir: str | Path, out: str | Path, overwrite: bool) -> None:
    """Refuse a ``--dry-run --out`` that would replace the model, the working folder or anything above
    them, or an existing folder that an earlier dry run did not write (``--overwrite`` replaces only those)."""
    model, target, here = Path(model_dir).resolve(), Path(out).resolve(), Path.cwd().resolve()
    if target == model or target in model.parents or model in target.parents:
        raise ValueError(f"--out {out} would replace, hold or sit inside the model folder {model}; choose a new folder")
    if target == here or target in here.parents:
        raise ValueError(f"--out {out} would replace the working folder {here} or one above it; choose a new folder")
    if target.exists() and overwrite and not all((target / name).is_file() for name in UPLOAD_MARKERS):
        raise ValueError(f"--out {out} exists and is not a folder `hemcap push --dry-run` wrote (it lacks "
                         f"{' or '.join(UPLOAD_MARKERS)}); hemcap replaces only those: choose a new folder")
