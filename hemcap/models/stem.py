"""A convolutional stem for a scratch vision tower (``model.vision_stem: conv``).

A ViT cuts the image into 16 px patches with one strided convolution: on 6k images from random
weights it has to learn edges, nuclei and granules through that single linear map. Xiao et al.
("Early convolutions help transformers see better", NeurIPS 2021) replace it with a few stride-2
3x3 convolutions: the same tokens come out, optimisation is steadier and accuracy higher. Here
``log2(patch_size)`` of them (32-64-128-256 channels at patch 16), each with batch norm and ReLU,
then a 1x1 convolution to the tower's width.

The stem takes the place of ``vision_model.embeddings.patch_embedding``, so its weights are saved
in the model's own safetensors under that name; ``ModelInfo.vision_stem`` describes it and
``restore`` rebuilds it when the folder is loaded (transformers alone would build the patch
convolution, find the stem's weights unknown, and give a tower with a random patch layer).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn

STEMS = ("patch", "conv")  # patch: the model's own patchify convolution
PREFIX = "vision_model.embeddings.patch_embedding."  # where the stem sits, and its weights' names
WIDTHS = (32, 64, 128, 256, 256, 256)  # channels after each stride-2 convolution (first log2(patch) used)


class ConvStem(nn.Module):
    """Stride-2 3x3 convolutions (batch norm, ReLU) down to the patch grid, then 1x1 to ``dim``."""

    def __init__(self, dim: int, widths: list[int]):
        super().__init__()
        layers, channels = [], 3
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.layers = nn.Sequential(*layers, nn.Conv2d(channels, dim, 1))

    @property
    def weight(self) -> torch.Tensor:
        """The first convolution's weight: BLIP's embeddings read the patch layer's ``weight.dtype``."""
        return self.layers[0].weight

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # oneDNN's channels-last kernels: in fp32 on a 2-core AVX2 EPYC the 256 px stem 1.26-1.32x as fast,
        # the recipe's training step 1.12x (eval/bench_stem_layout.py; BENCHMARKS.md "The whole recipe on a
        # machine without native bf16"). The weights stay contiguous, as safetensors saves them.
        return self.layers(pixels.contiguous(memory_format=torch.channels_last))


def spec_for(vision_config) -> dict:
    """The stem for a tower: one stride-2 convolution per halving of the patch size."""
    halvings = math.log2(vision_config.patch_size)
    if halvings != int(halvings) or not 1 <= halvings <= len(WIDTHS):
        raise ValueError(f"model.vision_stem=conv needs a patch_size of 2 to {2 ** len(WIDTHS)} that is a power "
                         f"of two, not {vision_config.patch_size}")
    return {"kind": "conv", "dim": vision_config.hidden_size, "widths": list(WIDTHS[: int(halvings)])}


def attach(model, spec: dict) -> None:
    """Put a fresh stem in place of the vision tower's patch convolution."""
    stem = ConvStem(spec["dim"], spec["widths"])
    stem.spec = spec
    model.vision_model.embeddings.patch_embedding = stem


def spec_of(model) -> dict | None:
    """What ``ModelInfo.vision_stem`` records of ``model`` (inside a PEFT wrapper too); None: no stem."""
    embeddings = [m for name, m in model.named_modules() if name.endswith("vision_model.embeddings")]
    return getattr(embeddings[0].patch_embedding, "spec", None) if embeddings else None


def restore(model, folder: str | Path, spec: dict) -> None:
    """Rebuild the stem ``spec`` describes, with its weights from ``folder``'s safetensors."""
    from safetensors import safe_open

    placeholder = model.vision_model.embeddings.patch_embedding  # the loaded model's dtype, device and mode
    attach(model, spec)
    stem, weights = model.vision_model.embeddings.patch_embedding, {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as file:
            weights.update({k[len(PREFIX):]: file.get_tensor(k) for k in file.keys() if k.startswith(PREFIX)})
    stem.load_state_dict(weights)  # strict: a stem without its weights is an error, not a random one
    stem.to(dtype=placeholder.weight.dtype, device=placeholder.weight.device)
    stem.train(placeholder.training)  # a loaded model is in eval mode: its batch norms use their running statistics


def saved_spec(name_or_path) -> dict | None:
    """The stem a saved hemcap model folder records (``ModelInfo.vision_stem``); None for others."""
    from hemcap.models.info import INFO_FILE, read_model_info

    if not (Path(str(name_or_path)) / INFO_FILE).is_file():
        return None  # a Hub id or a plain transformers folder
    return read_model_info(name_or_path).vision_stem


@contextlib.contextmanager
def quiet_transformers():
    """transformers reports the stem's weights as unknown and the patch convolution as missing while
    it builds the plain model; ``restore`` replaces both, so the report would only mislead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
