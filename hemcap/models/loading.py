"""Building a backend from a run config, and reloading a saved model folder.

``load_backend`` builds what a ``ModelConfig`` describes (a Hub id, a local folder, or
``init: scratch``: random weights and a tokenizer trained on the training captions) and gives it
a fresh ``ModelInfo`` with the schema its captions will speak. ``load_trained`` reloads a folder
that ``Backend.save`` wrote, from its ``ModelInfo`` alone: full weights, or an adapter on its base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from hemcap.config import ModelConfig
from hemcap.models.base import ModelError
from hemcap.models.info import ModelInfo, find_model_dir, read_model_info
from hemcap.models.registry import backend_class, backend_for_model_type

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what peft's save_pretrained(safe_serialization=True) writes


def load_backend(cfg: ModelConfig, captions: Sequence[str] = (), dtype=None, quantize: str | None = None,
                 schema=None):
    """The backend ``cfg`` describes, speaking ``schema`` (a Schema, a shipped name or a YAML path;
    default wbcatt). ``captions`` train the tokenizer for init=scratch."""
    from hemcap.schema import get_schema

    kind = cfg.backend if cfg.backend != "auto" else detect_backend(cfg)
    cls = backend_class(kind)
    if cfg.init == "scratch":
        if not captions:
            raise ModelError("init=scratch trains its tokenizer on the training captions, and none were given")
        model, processor = cls.build_scratch(cfg, list(captions))
        if dtype is not None:
            model.to(dtype)
    else:
        model = cls.load_model(cfg.name_or_path, dtype=dtype, quantize=quantize, revision=cfg.revision,
                               trust_remote_code=cfg.trust_remote_code)
        processor = cls.load_processor(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    backend = cls(model, processor, new_info(cfg, kind, get_schema(schema or "wbcatt")))
    backend.configure(cfg)
    return backend


def new_info(cfg: ModelConfig, kind: str, schema) -> ModelInfo:
    """The info of a model about to be trained: backend, prompts, schema, where its weights came from."""
    return ModelInfo(backend=kind, schema=dict(schema.raw), base_model=cfg.name_or_path if cfg.init == "pretrained"
                     else None, prompt=cfg.prompt, system_prompt=cfg.system_prompt, max_length=cfg.max_length)


def detect_backend(cfg: ModelConfig) -> str:
    """The registry name of the backend that runs ``cfg.name_or_path``, from its HF config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except OSError as error:
        raise ModelError(f"cannot load the config of {cfg.name_or_path!r} (a Hub id needs the network or a cached "
                         f"copy; a local dir needs config.json): {error}") from error
    return backend_for_model_type(config.model_type)


def load_trained(path: str | Path, dtype=None, quantize: str | None = None, is_trainable: bool = False):
    """The backend saved in ``path`` (a model folder, a checkpoint, or a run's output dir)."""
    path = find_model_dir(path)
    info = read_model_info(path)
    cls = backend_class(info.backend)
    model = cls.load_model(_weights_dir(path, info), dtype=dtype, quantize=quantize)
    if info.adapter:
        from peft import PeftModel

        _require_safetensors(path)
        model = PeftModel.from_pretrained(model, path, is_trainable=is_trainable)
    backend = cls(model, cls.load_processor(path), info)
    backend.restore(path)
    return backend


def _require_safetensors(path: Path) -> None:
    """PEFT would fall back to ``adapter_model.bin``: a pickle, which can run code as it loads."""
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ModelError(f"{path}: the adapter has no {ADAPTER_WEIGHTS} (hemcap loads weights from safetensors only; "
                         "an adapter_model.bin is a pickle, which can run code as it loads)")


def _weights_dir(path: Path, info: ModelInfo) -> str | Path:
    """Full weights live in ``path``; an adapter's base in a folder beside them, or on the Hub."""
    if not info.adapter:
        return path
    if not info.base_model:
        raise ModelError(f"{path}: the model info says it is an adapter but names no base_model")
    return path / info.base_model if (path / info.base_model).is_dir() else info.base_model
