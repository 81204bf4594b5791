"""Typed run configs for training: dataclasses, YAML loading, command-line overrides.

A run config has six sections, each a dataclass: ``model``, ``data``, ``augment``, ``lora``,
``train`` and ``eval``. A YAML file in ``configs/`` fills them; every key it leaves out keeps the
default below. Command-line flags override the YAML (``--set train.lr=1e-4``, ``--lora``,
``--model ID``...). Every section checks itself in ``__post_init__``; ``RunConfig.from_dict``
gathers the problems of all sections and raises one ``ConfigError`` listing them all.

This module imports no torch, so ``hemcap --help`` stays fast.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


class ConfigError(ValueError):
    """A run config has problems; the message lists every one."""


def _type_problems(obj) -> list[str]:
    """Fields whose value does not match the annotation (ints are accepted for floats)."""
    hints = typing.get_type_hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        number = _as_float(value)
        if number is not None and not _accepts(hint, value) and _accepts(hint, number):
            value = number  # "lr: 1" means 1.0; YAML reads "lr: 1e-4" (no dot) as a string
            setattr(obj, f.name, value)
        if not _accepts(hint, value):
            problems.append(f"{f.name}={value!r} should be {_type_name(hint)}")
    return problems


def _as_float(value) -> float | None:
    if _is_int(value):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _accepts(hint, value) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, float)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _one_of(name: str, value, allowed) -> list[str]:
    return [] if value in allowed else [f"{name}={value!r} should be one of {', '.join(map(str, allowed))}"]


def _positive(obj, *names: str, allow_none: bool = False) -> list[str]:
    problems = []
    for name in names:
        value = getattr(obj, name)
        if value is None and allow_none:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            problems.append(f"{name}={value!r} should be > 0")
    return problems


def _in_range(obj, name: str, low: float, high: float) -> list[str]:
    value = getattr(obj, name)
    if isinstance(value, (int, float)) and low <= value <= high:
        return []
    return [f"{name}={value!r} should be between {low} and {high}"]


class _Section:
    """Runs the checks of a config section and raises with all its problems."""

    def __post_init__(self):
        problems = _type_problems(self)
        if not problems:  # value checks assume the types are right
            problems = self.problems()
        if problems:
            raise ConfigError("\n".join(f"{self.section}.{p}" for p in problems))

    def problems(self) -> list[str]:
        return []


@dataclass
class ModelConfig(_Section):
    """Which model to fine-tune and how to feed it."""

    section = "model"
    name_or_path: str | None = "Salesforce/blip-image-captioning-base"
    """Hub id or local dir of the model to fine-tune (unused with init=scratch)."""
    backend: str = "auto"
    """A registered backend (blip; chat: a MedGemma-class image-text-to-text model) or auto (from the model's config)."""
    init: str = "pretrained"
    """pretrained: load name_or_path; scratch: random weights and a tokenizer trained on the captions."""
    vision_config: dict = field(default_factory=dict)
    """init=scratch: vision-tower settings (image_size, patch_size, hidden_size, num_hidden_layers...)."""
    text_config: dict = field(default_factory=dict)
    """init=scratch: text-decoder settings (hidden_size, num_hidden_layers, num_attention_heads...)."""
    config_overrides: dict = field(default_factory=dict)
    """init=scratch: top-level model config settings (e.g. mm_tokens_per_image for chat models)."""
    vocab_size: int = 1000
    """init=scratch: vocabulary size of the tokenizer trained on the training captions."""
    max_length: int = 128
    """Longest training caption in tokens (blip: longer ones are truncated)."""
    system_prompt: str = "You are an expert haematologist describing white blood cells in blood smears."
    """chat: the system turn."""
    prompt: str = "Describe the morphology of this white blood cell."
    """chat: the user turn that goes with the image."""
    freeze_vision: bool = False
    """Keep the vision tower fixed; LoRA targets inside it are then an error."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant, so it works with LoRA)."""
    label_smoothing: float = 0.0
    """Label smoothing of the caption loss (blip)."""
    attribute_loss: float = 0.0
    """blip: weight of an auxiliary loss, a linear head per attribute on the image's [CLS] feature; 0: none."""
    focal: float = 0.0
    """blip: gamma of a focal loss for the captions and the attribute heads, each term weighted by (1 - p)^gamma; 0: plain cross-entropy."""
    mixup: float = 0.0
    """blip: alpha of mixup's Beta(alpha, alpha): training images blended in pairs, each caption's loss weighted by its share; 0: off."""
    vision_stem: str = "patch"
    """blip, init=scratch: the vision tower's patch layer: patch (one strided convolution) or conv (a small CNN)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of name_or_path."""
    trust_remote_code: bool = False
    """Run model code shipped with a Hub repo; off unless you trust the repo."""

    def problems(self) -> list[str]:
        from hemcap.models.registry import backend_names
        from hemcap.models.stem import STEMS

        problems = _one_of("backend", self.backend, ("auto", *backend_names()))
        problems += _one_of("init", self.init, ("pretrained", "scratch"))
        problems += _positive(self, "vocab_size", "max_length")
        problems += _in_range(self, "label_smoothing", 0.0, 1.0)
        problems += _in_range(self, "attribute_loss", 0.0, 100.0)
        problems += _in_range(self, "mixup", 0.0, 100.0)
        problems += _in_range(self, "focal", 0.0, 10.0)
        if self.focal and self.label_smoothing:
            problems.append("focal: use either it or label_smoothing, not both")
        if (self.mixup or self.focal) and self.backend not in ("blip", "auto"):
            problems.append(f"mixup, focal: blip's losses; the {self.backend} backend trains on its model's own")
        problems += _one_of("vision_stem", self.vision_stem, STEMS)
        if self.vision_stem != "patch" and (self.init, self.backend) != ("scratch", "blip"):
            problems.append(f"vision_stem: {self.vision_stem} is built with random weights, for a blip backend with "
                            "init=scratch only")
        if self.init == "scratch" and self.backend == "auto":
            problems.append("backend: init=scratch needs an explicit backend (blip or chat)")
        if self.init == "pretrained" and not self.name_or_path:
            problems.append("name_or_path: init=pretrained needs a Hub id or a local dir")
        return problems


@dataclass
class DataConfig(_Section):
    """Which prepared dataset to train on, and how captions are chosen."""

    section = "data"
    path: str = "runs/data/synthetic_tiny"
    """Dataset dir written by `hemcap prepare` (relative paths are relative to the working dir)."""
    synthetic: dict | None = None
    """If set and `path` does not exist, first generate a synthetic set there (prepare_synthetic kwargs)."""
    train_split: str = "train"
    """Split to train on."""
    val_split: str = "validation"
    """Split to validate on (generation, parsed attributes, CIDEr)."""
    captions: str = "canonical"
    """canonical: train on `caption`; variants: a random choice among `captions` at every step."""
    max_train_samples: int | None = None
    """Use only the first N training rows (for quick runs)."""
    cache_dir: str | None = None
    """Where decoded, resized pixels are cached (default: <path>/.hemcap_cache)."""
    stain_norm: str = "none"
    """Colours given the training images' for training, validation and captioning: none, reinhard, anchors, stain."""
    centre_crop: float = 1.0
    """Share of each image's shorter side the model sees, a centred square (the cell), in training and inference."""

    def problems(self) -> list[str]:
        from hemcap.domain import NORMALISATIONS

        problems = _one_of("captions", self.captions, ("canonical", "variants"))
        problems += _one_of("stain_norm", self.stain_norm, NORMALISATIONS)
        problems += _positive(self, "max_train_samples", allow_none=True)
        problems += _in_range(self, "centre_crop", 0.25, 1.0)  # under a quarter of a PBC field cuts its cells
        if not self.path:
            problems.append("path: a dataset dir is needed")
        return problems


@dataclass
class AugmentConfig(_Section):
    """Augmentations applied to training images (on tensors, after the one-time decode)."""

    section = "augment"
    rotate90: bool = True
    """Random 90-degree rotations: cells have no orientation."""
    flip: bool = True
    """Random horizontal flips (with the rotations: all 8 symmetries of the square)."""
    color_jitter: float = 0.0
    """Max relative change of brightness, contrast and saturation (0 = off)."""
    stain_jitter: float = 0.0
    """Max relative change of each colour channel's optical density, as other stains shift it (0 = off)."""
    stain_mix: float = 0.0
    """Max change of each entry of the optical-density mixing matrix: other stains' hues (0 = off)."""
    # Other labs' optics and cameras: each reaches a random half of a batch, at a strength drawn up to its maximum.
    scale: float = 0.0
    """Max relative zoom about the centre, as another objective magnifies (0.15: x0.85 to x1.15; 0 = off)."""
    blur: float = 0.0
    """Max Gaussian defocus sigma, in pixels of the model input (0 = off)."""
    gamma: float = 0.0
    """Max |log gamma| of a camera's tone curve x ** gamma (0.2: gamma from 0.82 to 1.22; 0 = off)."""
    noise: float = 0.0
    """Max standard deviation of additive Gaussian sensor noise, in [0, 1] intensity units (0 = off)."""
    jpeg_quality: int | None = None
    """Lowest quality of a JPEG re-compression, drawn from jpeg_quality to 95 (null = off)."""
    restain: float = 0.0
    """Max factor (1 + restain) by which another lab's stain scales each density of red cells and nuclei (0 = off)."""
    restain_copies: int = 2
    """Copies of each training image decoded under random other stains, then the model's normaliser (with restain)."""

    def problems(self) -> list[str]:
        problems = _in_range(self, "color_jitter", 0.0, 1.0) + _in_range(self, "stain_jitter", 0.0, 1.0)
        problems += _in_range(self, "stain_mix", 0.0, 1.0)
        problems += _in_range(self, "scale", 0.0, 0.5)  # a factor of 0.5 already halves a cell
        problems += _in_range(self, "blur", 0.0, 10.0) + _in_range(self, "gamma", 0.0, 1.0)
        problems += _in_range(self, "noise", 0.0, 1.0)
        if self.jpeg_quality is not None:
            problems += _in_range(self, "jpeg_quality", 1, 95)
        problems += _in_range(self, "restain", 0.0, 4.0) + _in_range(self, "restain_copies", 1, 16)
        return problems


@dataclass
class LoraConfig(_Section):
    """Low-rank adapters instead of full fine-tuning (`--lora` switches them on)."""

    section = "lora"
    enabled: bool = False
    """Train LoRA adapters on a frozen base model."""
    r: int = 8
    """Rank of the adapters."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names (matched as name suffixes), one regular expression, or all-linear."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. lm_head)."""
    quantize: str | None = None
    """nf4: load the base in 4 bits through bitsandbytes (QLoRA); null: no quantization."""

    def problems(self) -> list[str]:
        problems = _positive(self, "r", "alpha") + _in_range(self, "dropout", 0.0, 1.0)
        problems += _one_of("quantize", self.quantize, (None, "nf4"))
        if isinstance(self.target_modules, list) and not self.target_modules:
            problems.append("target_modules: the list is empty")
        return problems


@dataclass
class TrainConfig(_Section):
    """Optimisation, schedule, precision, logging and checkpoints."""

    section = "train"
    output_dir: str = "runs/train"
    """Where checkpoints, logs and the final model go."""
    overwrite: bool = False
    """Start afresh even if output_dir holds an earlier run (its checkpoints are removed)."""
    resume: str | None = None
    """auto: continue from the latest checkpoint in output_dir (if any); or a checkpoint dir."""
    force: bool = False
    """Resume although settings that change training differ from the checkpoint's (they are refused otherwise)."""
    seed: int = 0
    """Seed for weights, batch order, caption choice and augmentations."""
    batch_size: int = 8
    """Images per device per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    prefetch: int | None = None
    """Micro-batches built ahead on a thread while the model trains (0: on the training thread); null: 2 on a GPU, 0 on a CPU."""
    max_steps: int | None = None
    """Optimizer steps to train for (overrides epochs)."""
    epochs: float | None = 1.0
    """Passes over the training split, when max_steps is not set."""
    max_minutes: float | None = None
    """Stop (validate, save) once training has run this long, whatever the step."""
    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: cosine, linear or constant."""
    schedule_over: str = "steps"
    """What the schedule spans: steps (max_steps or epochs; max_minutes only stops) or budget (whichever of those and max_minutes runs out first)."""
    warmup_ratio: float = 0.1
    """Share of the schedule (its steps, or its budget: schedule_over) spent warming up linearly from 0."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this (null: no clipping)."""
    ema: float | None = None
    """Decay of an exponential moving average of the weights, which is validated and saved instead (null: off)."""
    refine: list[str] = field(default_factory=list)
    """Fields the final model re-decides from its attribute heads and nucleus geometry, fitted on the training split (hemcap.refine); []: none."""
    precision: str | None = None
    """fp32, bf16, fp16 (CUDA only) or auto (bf16 on a GPU or CPU with native bf16); null: bf16 on a CUDA GPU that has it, else fp32."""
    threads: int | None = None
    """CPU threads for torch (null: the cores free at start, followed every 30 s; hemcap.threads)."""
    log_every: int = 10
    """Log loss, learning rate and samples/s every N steps."""
    eval_every: int | None = None
    """Validate every N steps (null: only at the end)."""
    save_every: int | None = None
    """Checkpoint every N steps (null: at every validation)."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    patience: int | None = None
    """Stop after this many validations without improvement (null: never)."""

    def problems(self) -> list[str]:
        problems = _positive(self, "batch_size", "grad_accum", "lr", "log_every", "keep_last")
        problems += _positive(self, "max_steps", "epochs", "max_minutes", "eval_every", "save_every",
                              "patience", "max_grad_norm", "threads", allow_none=True)
        problems += _one_of("schedule", self.schedule, ("cosine", "linear", "constant"))
        problems += _one_of("schedule_over", self.schedule_over, ("steps", "budget"))
        problems += _one_of("precision", self.precision, (None, *PRECISIONS))
        problems += _in_range(self, "warmup_ratio", 0.0, 1.0)
        if self.ema is not None and not 0 < self.ema < 1:
            problems.append(f"ema={self.ema} should be a decay in (0, 1), or null")
        if self.weight_decay < 0:
            problems.append(f"weight_decay={self.weight_decay} should be >= 0")
        if self.prefetch is not None and self.prefetch < 0:
            problems.append(f"prefetch={self.prefetch} should be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas={self.betas} should be two numbers in [0, 1)")
        if self.max_steps is None and self.epochs is None:
            problems.append("max_steps: set max_steps or epochs")
        if self.resume not in (None, "auto") and not Path(self.resume).is_dir():
            problems.append(f"resume={self.resume!r} is neither 'auto' nor a checkpoint dir")
        return problems


@dataclass
class EvalConfig(_Section):
    """Validation by generation through the captioning engine, as `hemcap eval` runs it."""

    section = "eval"
    metric: str = "attribute_accuracy"
    """Figure that picks the best checkpoint and drives early stopping: attribute_accuracy or cider."""
    max_samples: int | None = None
    """Validate on the first N rows of the split (null: all)."""
    batch_size: int = 128
    """Images decoded together (the engine's decode_chunk); hemcap eval uses it too."""
    max_new_tokens: int = 60
    """Longest generated caption in tokens; hemcap eval uses it too."""
    num_beams: int = 1
    """1: greedy decoding; more: beam search."""

    def problems(self) -> list[str]:
        problems = _one_of("metric", self.metric, ("attribute_accuracy", "cider"))
        return problems + _positive(self, "batch_size", "max_new_tokens", "num_beams") + _positive(
            self, "max_samples", allow_none=True)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "augment": AugmentConfig,
            "lora": LoraConfig, "train": TrainConfig, "eval": EvalConfig}


@dataclass
class RunConfig:
    """A whole training run: one instance of each section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>") -> "RunConfig":
        """Build and check every section; raise one ConfigError listing every problem."""
        raw = raw or {}
        problems = [f"unknown section {k!r} (sections: {', '.join(SECTIONS)})" for k in raw if k not in SECTIONS]
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name) or {}
            if not isinstance(values, dict):
                problems.append(f"{name}: expected a mapping, got {values!r}")
                continue
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = sorted(set(values) - known)
            problems += [f"{name}.{k}: unknown key (known: {', '.join(sorted(known))})" for k in unknown]
            try:
                sections[name] = section_cls(**{k: v for k, v in values.items() if k in known})
            except ConfigError as error:
                problems += str(error).splitlines()
        problems += _cross_section_problems(sections)
        if problems:
            raise ConfigError(f"{source}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
        return cls(**sections)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _cross_section_problems(sections: dict) -> list[str]:
    model, lora, train = sections.get("model"), sections.get("lora"), sections.get("train")
    problems = []
    if model and lora and lora.quantize and model.init == "scratch":
        problems.append("lora.quantize: 4-bit loading needs pretrained weights (model.init=pretrained)")
    if lora and lora.quantize and not lora.enabled:
        problems.append("lora.quantize: quantization is for LoRA only (set lora.enabled or pass --lora)")
    if train and lora and train.precision == "fp16" and lora.quantize:
        problems.append("train.precision: use bf16 with nf4 (QLoRA computes in bf16)")
    if model and lora and model.attribute_loss and lora.enabled:
        problems.append("model.attribute_loss: the attribute heads train with the whole model, not under LoRA")
    if train and model and train.refine and not model.attribute_loss:
        problems.append("train.refine: the refiner reads the attribute heads (set model.attribute_loss > 0)")
    if train and train.refine and model and model.backend not in ("blip", "auto"):
        problems.append(f"train.refine: for blip's attribute heads; the {model.backend} backend has none")
    if train and lora and train.ema and lora.enabled:
        problems.append("train.ema: the average copies the whole model, frozen base included; not under LoRA")
    return problems


# ------------------------------------------------------------------------------ loading


def load_config(path: str | Path | None = None, overrides: list[str] = (), **flags) -> RunConfig:
    """The config in ``path`` (YAML) with ``--set`` overrides and explicit flags applied.

    ``flags`` are the explicit command-line flags (``lora=True``, ``model="id"``, ...); None
    values are ignored. Overrides are ``section.key=value``, the value read as YAML.
    """
    raw = {}
    if path is not None:
        path = config_file(path)
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, _flag_overrides(flags) + list(overrides))  # --set has the last word
    return RunConfig.from_dict(raw, source=str(path or "<defaults>"))


def shipped_configs() -> dict[str, Path]:
    """Name -> file of the configs installed with hemcap (``configs/`` in the source tree)."""
    from importlib import resources

    folder = Path(str(resources.files("hemcap.configs")))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def config_file(path: str | Path) -> Path:
    """A config file: ``path`` if it exists, else the shipped config of that name (``blip_tiny``)."""
    path = Path(path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if path.stem in shipped and (path.suffix in ("", ".yaml") and len(path.parts) == 1):
        return shipped[path.stem]
    raise FileNotFoundError(f"config file {path} not found (shipped configs, usable by name: {', '.join(shipped)})")


# explicit flag -> the keys it sets (None: the flag's value)
FLAG_KEYS = {
    "lora": {"lora.enabled": None},
    "model": {"model.name_or_path": None, "model.init": "pretrained", "model.backend": "auto"},
    "data": {"data.path": None},
    "output_dir": {"train.output_dir": None},
    "resume": {"train.resume": None},
    "overwrite": {"train.overwrite": None},
    "force": {"train.force": None},
    "threads": {"train.threads": None},
}


def _flag_overrides(flags: dict) -> list[tuple[str, Any]]:
    unknown = set(flags) - set(FLAG_KEYS)
    if unknown:
        raise TypeError(f"unknown flags: {', '.join(sorted(unknown))}")
    given = {name: value for name, value in flags.items() if value is not None and value is not False}  # keeps 0
    return [(key, value if fixed is None else fixed) for name, value in given.items()
            for key, fixed in FLAG_KEYS[name].items()]


def apply_overrides(raw: dict, overrides: list) -> dict:
    """A copy of ``raw`` with each ``"section.key=value"`` (or ``(key, value)`` pair) applied.

    A key may go on inside a mapping field: ``model.vision_config.num_hidden_layers=6``.
    """
    raw = copy.deepcopy(raw)
    problems = []
    for item in overrides:
        key, value = item if isinstance(item, tuple) else _split_override(item, problems)
        if key is None:
            continue
        path = key.split(".")
        if path[0] not in SECTIONS or len(path) < 2 or path[1] not in {f.name for f in dataclasses.fields(SECTIONS[path[0]])}:
            problems.append(f"--set {key}: unknown key (keys look like train.lr or model.name_or_path)")
            continue
        _set_path(raw, path, value)
    if problems:
        raise ConfigError("bad overrides:\n  - " + "\n  - ".join(problems))
    return raw


def _set_path(mapping: dict, path: list[str], value) -> None:
    """``mapping[path[0]]...[path[-1]] = value``, making a mapping of each level that is not one."""
    for part in path[:-1]:
        if not isinstance(mapping.get(part), dict):
            mapping[part] = {}
        mapping = mapping[part]
    mapping[path[-1]] = value


def _split_override(item: str, problems: list[str]):
    key, sep, text = item.partition("=")
    if not sep or not key:
        problems.append(f"--set {item!r}: expected section.key=value")
        return None, None
    return key.strip(), yaml.safe_load(text) if text.strip() else None


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training flags, shared by ``hemcap train`` and ``hemcap/train.py``."""
    parser.add_argument("--config", type=Path, help="YAML run config: a file, or a shipped config's name (blip_tiny)")
    parser.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters (lora.enabled=true)")
    parser.add_argument("--model", help="Hub id or local dir of a pretrained model to fine-tune "
                                        "(sets model.name_or_path, init=pretrained, backend=auto)")
    parser.add_argument("--data", help="prepared dataset dir (data.path)")
    parser.add_argument("--output-dir", help="where checkpoints, logs and the model go (train.output_dir)")
    parser.add_argument("--resume", help="'auto' (the latest checkpoint in the output dir; a damaged one falls back "
                                         "to the one before) or a checkpoint dir; refused when settings that change "
                                         "training differ from the checkpoint's, unless --force")
    parser.add_argument("--overwrite", action="store_true", default=None, help="start afresh in an existing output dir")
    parser.add_argument("--force", action="store_true", default=None,
                        help="resume although settings that change training (lr, batch size, seed, schedule, model, "
                             "data, augmentations, precision...) differ from the checkpoint's (train.force)")
    parser.add_argument("--threads", type=int, help="CPU threads (train.threads; default: the cores no other "
                                                     "process keeps busy, re-read every 30 s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key, e.g. --set train.lr=1e-4 (repeatable; value read as YAML)")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    flags = {name: getattr(args, name) for name in FLAG_KEYS}
    return load_config(args.config, args.overrides, **flags)
