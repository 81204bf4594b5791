"""``ModelInfo``: the one file beside a model's weights that says everything hemcap knows about it.

As an HF model folder's ``config.json`` says how to rebuild the network, ``hemcap_model.json``
says how to use it: which backend runs it, whether it is a LoRA adapter and on which base, the
prompts, the input size, how its captions are decoded, and the **whole attribute schema** its
captions speak (embedded, so a model trained on your own schema YAML can be parsed anywhere,
after a push too). It also carries what later stages record: the training summary, the
magnification and colour of the training images, the test metrics.

``Backend.save`` writes it (atomically, last, so a folder with it is complete); ``load_trained``,
the engine, review, hub and the demo read only this. Nothing guesses: a folder without it, or
with a version this hemcap does not know, gets one clear error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

INFO_FILE = "hemcap_model.json"
INFO_VERSION = 2  # 1: the early hemcap_model.json (kind, adapter, prompts) with training.json beside it
BASE_MODEL_DIR = "base_model"  # a scratch base saved inside its LoRA adapter's folder
NESTED_MODEL_DIRS = ("model",)  # a checkpoint or a training run holds its model in model/


class ModelInfoError(ValueError):
    """A folder is not a usable hemcap model; the message names the folder and what is wrong."""


@dataclass
class ModelInfo:
    """What a hemcap model folder is: written beside the weights as ``hemcap_model.json``."""

    backend: str
    """Registry name of the backend that runs it (``hemcap.models.registry``): blip, chat, ..."""
    schema: dict
    """The attribute schema its captions speak, as its YAML parses (``hemcap.schema.build_schema``)."""
    image_size: list[int] = field(default_factory=list)
    """[height, width] of the images the model takes."""
    centre_crop: float = 1.0
    """Share of each image's shorter side it sees, a centred square, before the resize to ``image_size``."""
    adapter: bool = False
    """A LoRA adapter on ``base_model`` rather than full weights."""
    base_model: str | None = None
    """Hub id or folder (relative to this one) of the weights it started from; None: random init."""
    prompt: str = ""
    """Chat backends: the user turn that goes with the image."""
    system_prompt: str = ""
    """Chat backends: the system turn."""
    max_length: int = 128
    """Longest training caption in tokens."""
    decoding: dict = field(default_factory=dict)
    """Engine settings its validation used (max_new_tokens, num_beams, decode_chunk); eval's defaults."""
    training: dict = field(default_factory=dict)
    """Training summary: steps, best_step, minutes, data (recipe, images), validation metrics, config."""
    magnification: dict | None = None
    """Training images' red-cell diameter and field of view in pixels (``hemcap.domain``): crops at inference."""
    colour: dict | None = None
    """Training images' CIELAB statistics and the stain normalisation used (``hemcap.domain``)."""
    attribute_heads: dict | None = None
    """Auxiliary attribute heads trained with it (``hemcap.models.heads``): weight, hidden size, fields."""
    vision_stem: dict | None = None
    """A convolutional stem in place of the vision tower's patch layer (``hemcap.models.stem``); None: none."""
    refiner: dict | None = None
    """A second look at some fields from the heads and the nucleus geometry (``hemcap.models.refiner``):
    fields (number of values each), inputs, cells fitted on, minutes, validation accuracy beside the
    captions'; None: none."""
    test_metrics: dict | None = None
    """Headline figures on a held-out test split, once measured."""
    version: int = INFO_VERSION
    """Format version of this file."""

    def schema_object(self, source: str = INFO_FILE):
        """The embedded schema, built and checked."""
        from hemcap.schema import build_schema

        return build_schema(self.schema, source=f"{source} (embedded schema)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "ModelInfo":
        """Check the version and the keys; one ModelInfoError naming every problem."""
        if not isinstance(raw, dict):
            raise ModelInfoError(f"{where} is not a JSON object")
        if raw.get("version") != INFO_VERSION:
            raise ModelInfoError(_version_message(raw.get("version"), where))
        known = {f.name for f in dataclasses.fields(cls)}
        problems = [f"unknown key {k!r}" for k in raw if k not in known]
        problems += [f"missing {k!r}" for k in ("backend", "schema") if not raw.get(k)]
        if problems:
            raise ModelInfoError(f"{where}: " + "; ".join(problems))
        return cls(**raw)


def _version_message(version, where: str) -> str:
    if version is None:
        return (f"{where} has no format version: it was written by an early hemcap that did not record the "
                "model's schema; retrain it with this hemcap")
    return f"{where} has format version {version!r}; this hemcap reads version {INFO_VERSION} (upgrade hemcap)"


def write_model_info(folder: str | Path, info: ModelInfo) -> Path:
    """Write ``info`` into ``folder`` atomically."""
    from hemcap.fileio import write_json

    return write_json(Path(folder) / INFO_FILE, info.to_dict(), indent=2)


def read_model_info(folder: str | Path) -> ModelInfo:
    """The info of a model folder (``find_model_dir`` rules); ModelInfoError when it has none."""
    path = find_model_dir(folder) / INFO_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelInfoError(f"{path} cannot be read: {error}") from error
    return ModelInfo.from_dict(raw, str(path))


def is_model_dir(folder: str | Path) -> bool:
    """Whether ``folder`` (or its ``model/``) holds a hemcap model."""
    folder = Path(folder)
    return any((f / INFO_FILE).is_file() for f in (folder, *(folder / n for n in NESTED_MODEL_DIRS)))


def find_model_dir(folder: str | Path) -> Path:
    """The model folder at ``folder``: itself, or the ``model/`` inside a checkpoint or a training run."""
    folder = Path(folder)
    for candidate in (folder, *(folder / n for n in NESTED_MODEL_DIRS)):
        if (candidate / INFO_FILE).is_file():
            return candidate
    if not folder.is_dir():
        raise ModelInfoError(f"model folder {folder} does not exist")
    raise ModelInfoError(f"{folder} is not a hemcap model folder: it has no {INFO_FILE} (pass the `model` folder "
                         "that `hemcap train` writes, a checkpoint folder, or a folder `hemcap push` uploaded)")
