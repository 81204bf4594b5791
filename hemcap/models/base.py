"""The backend interface: what the engine, the trainer, hub and review may ask of a model.

``Backend`` (a ``typing.Protocol``) is the contract; ``BaseBackend`` implements the parts most
backends share (image inputs, tokenizer, saving with ``ModelInfo``, freezing the vision tower).
A backend is one module with one such class and one line in ``hemcap.models.registry``.

Rows are dicts with ``pixels`` (a float tensor in [0, 1] at ``image_size``) or ``image`` (a PIL
image, resized by ``hemcap.images.model_pixels`` exactly as the training cache was), plus
``caption`` when training.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, Sequence

from hemcap.models.info import BASE_MODEL_DIR, ModelInfo, write_model_info

if TYPE_CHECKING:
    from hemcap.config import ModelConfig
    from hemcap.engine import EngineSettings

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips


class ModelError(ValueError):
    """A model, tokenizer or adapter setting that cannot work; the message says what to change."""


class Generated(NamedTuple):
    """What ``generate_scored`` returns, one row each (a plain ``(ids, logprobs)`` pair is read as one)."""

    ids: Any
    """New token ids, rows x steps."""
    logprobs: Any
    """Their log-probabilities, rows x steps."""
    heads: dict | None = None
    """The attribute heads' log-probabilities per field from the same vision pass, when the model has a
    refiner (``hemcap.refine``): it then does not encode the images a second time."""


class Backend(Protocol):
    """A captioning model with its processor: batches in, token ids and log-probabilities out."""

    kind: ClassVar[str]  # its registry name
    model_types: ClassVar[tuple[str, ...]]  # HF config model_type values it runs ("*": any other)
    title: ClassVar[str]  # "BLIP captioning model": what model cards and the demo call it
    pipeline_tag: ClassVar[str]  # the Hub task: image-to-text, image-text-to-text
    vision_prefixes: ClassVar[tuple[str, ...]]  # module-name prefixes of the vision tower
    model: Any
    processor: Any
    info: ModelInfo
    base_dir: Path | None  # where a scratch base was saved, for its LoRA adapter

    @classmethod
    def build_scratch(cls, cfg: ModelConfig, captions: list[str]) -> tuple[Any, Any]:
        """(model, processor) with random weights and a tokenizer trained on ``captions``."""

    @classmethod
    def load_model(cls, name_or_path, dtype=None, quantize=None, revision=None, trust_remote_code=False) -> Any:
        """Pretrained weights (safetensors only) from a Hub id or a folder."""

    @classmethod
    def load_processor(cls, name_or_path, revision=None, trust_remote_code=False) -> Any:
        """The processor saved beside the weights."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def image_size(self) -> tuple[int, int]: ...

    @property
    def stop_token_ids(self) -> set[int]:
        """Token ids that end a caption."""

    def configure(self, cfg: ModelConfig) -> None:
        """Apply the training settings that live on the model rather than in its weights."""

    def collate(self, rows: Sequence[dict], train: bool) -> dict:
        """Model inputs for ``rows``; with ``train``, also ``labels`` (IGNORE_INDEX where no loss)."""

    def generate_scored(self, rows: Sequence[dict], settings: EngineSettings) -> Generated:
        """New token ids and their log-probabilities, one row each, decoded as ``settings`` say."""

    def save(self, out_dir: str | Path) -> Path:
        """Write weights (or adapter), processor and ``ModelInfo``; the folder is then a model."""


class BaseBackend:
    """What most backends share; subclasses add scratch building, collation and decoding."""

    kind: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    title: ClassVar[str] = "captioning model"
    pipeline_tag: ClassVar[str] = "image-text-to-text"
    vision_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model, processor, info: ModelInfo):
        self.model = model
        self.processor = processor
        self.info = info
        self.base_dir: Path | None = None

    @classmethod
    def load_model(cls, name_or_path, dtype=None, quantize=None, revision=None, trust_remote_code=False):
        from transformers import AutoModelForImageTextToText

        return load_hf_model(AutoModelForImageTextToText, name_or_path, dtype, quantize, revision, trust_remote_code)

    @classmethod
    def load_processor(cls, name_or_path, revision=None, trust_remote_code=False):
        from transformers import AutoProcessor

        try:
            return AutoProcessor.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        except OSError as error:
            raise ModelError(f"cannot load the processor of {name_or_path!r}: {error}") from error

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) the model takes; images are resized to it once, before training."""
        size = self.processor.image_processor.size
        size = size if isinstance(size, dict) else vars(size)
        if not size.get("height") or not size.get("width"):
            raise ModelError(f"image processor size {size} has no height/width; hemcap needs a fixed input size")
        return int(size["height"]), int(size["width"])

    @property
    def stop_token_ids(self) -> set[int]:
        tokenizer = self.tokenizer
        ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)}
        return {i for i in ids if i is not None}

    @property
    def vision_prefix(self) -> str | None:
        """Full module name of the vision tower (inside a PEFT wrapper too), or None."""
        names = [name for name, _ in self.model.named_modules()]
        for prefix in self.vision_prefixes:
            found = [n for n in names if n == prefix or n.endswith("." + prefix)]
            if found:
                return min(found, key=len)
        return None

    def configure(self, cfg: ModelConfig) -> None:
        if cfg.freeze_vision and not is_peft(self.model):  # under LoRA the whole base is frozen already
            log.info("vision tower frozen: %s parameters", f"{freeze_vision(self):,}")

    def image_kwargs(self, rows: Sequence[dict]) -> tuple[list, dict]:
        """The rows' images as [0, 1] tensors at ``image_size`` and the processor options for them."""
        import torch

        from hemcap.images import model_pixels

        pixels = [r["pixels"] if "pixels" in r
                  else torch.from_numpy(model_pixels(r["image"], self.image_size, self.info.centre_crop)) / 255
                  for r in rows]
        return pixels, {"do_resize": False, "do_rescale": False}

    def pixel_values(self, rows: Sequence[dict]):
        images, options = self.image_kwargs(rows)
        return self.processor.image_processor(images=images, return_tensors="pt", **options)["pixel_values"]

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if is_peft(self.model):  # embedding layers are saved through modules_to_save when trained
            self.model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
        else:
            self.model.save_pretrained(out_dir, safe_serialization=True)
        self.processor.save_pretrained(out_dir)
        if is_peft(self.model) and self.base_dir is not None:
            shutil.copytree(self.base_dir, out_dir / BASE_MODEL_DIR, dirs_exist_ok=True)
        self.info.adapter, self.info.image_size = is_peft(self.model), list(self.image_size)
        write_model_info(out_dir, self.info)  # last: a folder with its info is complete
        return out_dir

    def training_loss(self, model, batch: dict):
        """The loss of one training batch (``collate(rows, train=True)``) through ``model``, the
        backend's model as ``accelerate`` prepared it."""
        return model(**batch).loss

    def restore(self, folder: str | Path) -> None:
        """Rebuild what a saved folder holds beyond the transformers model (after ``load_trained``)."""

    def save_base(self, out_dir: str | Path) -> None:
        """Save a scratch base before LoRA wraps it: its adapter is useless without these weights."""
        self.save(out_dir)
        self.base_dir = Path(out_dir)


def load_hf_model(model_cls, name_or_path, dtype=None, quantize=None, revision=None, trust_remote_code=False):
    """``model_cls.from_pretrained`` from safetensors only; 4-bit through bitsandbytes when ``quantize`` is set."""
    options = dict(revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True)
    if quantize:
        options["quantization_config"] = _quantization_config(quantize)
    try:
        model = model_cls.from_pretrained(name_or_path, dtype=dtype, **options)
    except OSError as error:
        raise ModelError(f"cannot load {name_or_path!r}: {error}") from error
    return _prepare_quantized(model) if quantize else model


def _quantization_config(quantize: str):
    """QLoRA's nf4 with double quantization, computing in bf16 (Google's MedGemma recipe)."""
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        log.warning("QLoRA without CUDA runs on bitsandbytes' CPU backend: it works but is slow "
                    "(see docs/training.md); use plain LoRA on a CPU")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)


def _prepare_quantized(model):
    from peft import prepare_model_for_kbit_training

    # gradient checkpointing is switched on later, from the config, non-reentrant
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def focal_cross_entropy(logits, labels, gamma: float):
    """Cross-entropy with each term weighted by (1 - p)^gamma, p the probability given to its label
    (Lin et al. 2017: what the model already gets right counts less); mean over labelled positions."""
    import torch

    ce = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    weighted = (1 - torch.exp(-ce)).pow(gamma) * ce
    return weighted.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


def token_logprobs(model, out, num_beams: int):
    """Log-probability of each generated token; beam search scores are already normalised."""
    return model.compute_transition_scores(out.sequences, out.scores, getattr(out, "beam_indices", None),
                                           normalize_logits=num_beams == 1)


def model_device(model):
    return next(model.parameters()).device


def is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def freeze_vision(backend: BaseBackend) -> int:
    """Stop gradients to the vision tower; the number of parameters frozen."""
    prefix = backend.vision_prefix
    if prefix is None:
        raise ModelError(f"freeze_vision: no vision tower found (looked for {', '.join(backend.vision_prefixes)})")
    frozen = 0
    for name, param in backend.model.named_parameters():
        if name.startswith(prefix + "."):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list({id(p): p for p in model.parameters()}.values())  # tied weights once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def enable_gradient_checkpointing(backend: BaseBackend) -> None:
    """Recompute activations in backward, non-reentrant: it needs no input gradients, so it works
    with frozen embeddings under LoRA. Call it after ``add_lora``: PEFT, seeing checkpointing on,
    would hook the input embeddings for the reentrant kind, which breaks BLIP's in-place add."""
    model = backend.model
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
