"""LoRA: wrap a backend's model in PEFT adapters after checking where they land; merge them back."""

from __future__ import annotations

import dataclasses
import re

from hemcap.config import LoraConfig
from hemcap.models.base import BaseBackend, ModelError, is_peft
from hemcap.models.info import BASE_MODEL_DIR


def add_lora(backend: BaseBackend, cfg: LoraConfig, freeze_vision: bool) -> list[str]:
    """Wrap ``backend.model`` in LoRA adapters; the names of the modules they wrap.

    Targets are checked first: a target that matches nothing, or one inside a frozen vision
    tower, is an error that lists the model's linear layers. Adapter weights are kept in fp32
    whatever the base's dtype, so fp16/bf16 training updates them at full precision.
    """
    import peft
    import torch

    frozen_prefix = backend.vision_prefix if freeze_vision else None
    targets = lora_targets(backend.model, cfg.target_modules, frozen_prefix)
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                             target_modules=targets, modules_to_save=cfg.modules_to_save or None)
    backend.model = peft.get_peft_model(backend.model, config)
    if backend.base_dir is not None:  # a scratch base, saved inside every adapter folder
        backend.model.peft_config["default"].base_model_name_or_path = BASE_MODEL_DIR
        backend.info.base_model = BASE_MODEL_DIR
    for param in backend.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return targets


def lora_targets(model, spec: list[str] | str, frozen_prefix: str | None = None) -> list[str]:
    """Full names of the modules ``spec`` selects, as PEFT matches them; errors list what the model has.

    ``spec`` is ``"all-linear"`` (every linear layer but the output head, minus a frozen vision
    tower), one regular expression (full match), or a list of names matched as suffixes.
    """
    import torch

    output = model.get_output_embeddings()
    named = [(n, m) for n, m in model.named_modules() if n]
    if spec == "all-linear":
        chosen = [n for n, m in named if isinstance(m, torch.nn.Linear) and m is not output
                  and not (frozen_prefix and n.startswith(frozen_prefix + "."))]
        if not chosen:
            raise ModelError("lora.target_modules=all-linear found no linear layers outside the frozen vision tower")
        return chosen
    chosen = _match_targets(named, spec, _linear_layer_names(model))
    inside = [n for n in chosen if frozen_prefix and n.startswith(frozen_prefix + ".")]
    if inside:
        raise ModelError(f"lora.target_modules selects {len(inside)} module(s) in the frozen vision tower "
                         f"({frozen_prefix}), e.g. {', '.join(inside[:3])}; narrow the targets or set "
                         f"model.freeze_vision=false")
    return chosen


def _match_targets(named, spec, linear_names: str) -> list[str]:
    if isinstance(spec, str):
        chosen = [n for n, _ in named if re.fullmatch(spec, n)]
        if not chosen:
            raise ModelError(f"lora.target_modules regex {spec!r} matches no module. {linear_names}")
        return chosen
    chosen, unmatched = [], []
    for target in spec:
        hits = [n for n, _ in named if n == target or n.endswith("." + target)]
        chosen += hits
        unmatched += [] if hits else [target]
    if unmatched:
        raise ModelError(f"lora.target_modules {unmatched} match no module. {linear_names}")
    return sorted(set(chosen))


def _linear_layer_names(model, limit: int = 60) -> str:
    """The model's linear layers with layer numbers folded (``...layer.*.crossattention.self.query``)."""
    import torch

    names = sorted({re.sub(r"\.\d+(?=\.|$)", ".*", n) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear)})
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return "The model's linear layers are: " + ", ".join(names[:limit]) + more


def merge_lora(backend: BaseBackend) -> BaseBackend:
    """The same backend with its LoRA adapters merged into the base weights."""
    if not is_peft(backend.model):
        raise ModelError("the model has no LoRA adapter to merge")
    base = None if backend.info.base_model == BASE_MODEL_DIR else backend.info.base_model  # a scratch base is gone
    info = dataclasses.replace(backend.info, adapter=False, base_model=base)
    return type(backend)(backend.model.merge_and_unload(), backend.processor, info)
