"""Attribute heads: a linear classifier per schema field on the vision tower's [CLS] feature,
trained beside the caption loss (``model.attribute_loss`` is its weight).

WBCAtt's own baseline (a ResNet50 with a head per attribute) supervises the image features
attribute by attribute; a captioner learns them only through the words of its captions. The heads
shape the features and nothing else: captions are still all a model generates and all that is scored.
They are saved beside the weights (``attribute_heads.safetensors``; the transformers model is saved
without them, so it reloads as a plain model anywhere) and described in ``ModelInfo.attribute_heads``,
from which ``restore`` rebuilds them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch

from hemcap.models.base import IGNORE_INDEX, focal_cross_entropy

HEADS = "attribute_heads"  # the submodule's name on the model
HEADS_FILE = "attribute_heads.safetensors"


class AttributeHeads(torch.nn.Module):
    """One ``Linear(hidden, number of values)`` per field, in the schema's field order."""

    def __init__(self, hidden: int, sizes: dict[str, int]):
        super().__init__()
        self.fields = list(sizes)
        self.linear = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, n) for name, n in sizes.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: self.linear[name](features) for name in self.fields}

    def fp32_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each field's logits in fp32, also under the training loop's (or a caller's) autocast."""
        with torch.autocast(features.device.type, enabled=False):
            return self(features.float())

    def loss(self, features: torch.Tensor, labels: torch.Tensor, focal: float = 0.0) -> torch.Tensor:
        """Mean over fields of each field's cross-entropy (labels: one column per field; ``focal``:
        its gamma), in fp32 also under the training loop's autocast."""
        logits = self.fp32_logits(features)
        losses = [focal_cross_entropy(logits[name], labels[:, i], focal) for i, name in enumerate(self.fields)]
        return torch.stack(losses).mean()  # gamma 0: each field's plain cross-entropy


def attach(model, hidden: int, schema, weight: float) -> dict:
    """Give ``model`` fresh heads for every field of ``schema``; the spec ``ModelInfo`` keeps."""
    sizes = {name: len(schema.values(name)) for name in schema.field_names}
    setattr(model, HEADS, AttributeHeads(hidden, sizes))
    return {"weight": weight, "hidden": hidden, "fields": sizes}


def restore(model, folder: str | Path, spec: dict) -> None:
    """Rebuild the heads ``spec`` describes, with their weights from ``folder``."""
    from safetensors.torch import load_file

    heads = AttributeHeads(spec["hidden"], spec["fields"])
    heads.load_state_dict(load_file(Path(folder) / HEADS_FILE))  # strict: lost heads are an error, not random ones
    setattr(model, HEADS, heads)


def save(heads: AttributeHeads, folder: str | Path) -> None:
    from safetensors.torch import save_file

    from hemcap.fileio import atomic_path

    with atomic_path(Path(folder) / HEADS_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(tmp))


@contextlib.contextmanager
def detached(model) -> Iterator[AttributeHeads | None]:
    """The model without its heads for the block (so transformers saves a plain model), then with them."""
    heads = getattr(model, HEADS, None)
    if heads is not None:
        delattr(model, HEADS)
    try:
        yield heads
    finally:
        if heads is not None:
            setattr(model, HEADS, heads)


def heads_of(model) -> AttributeHeads | None:
    """The heads of a model, through the wrapper ``accelerate`` may have put around it."""
    return getattr(getattr(model, "module", model), HEADS, None)


def labels(rows: Sequence[dict], schema) -> torch.Tensor:
    """Each row's value index per field, read from its training caption (training captions parse
    back exactly: ``parse(render(a)) == a``); IGNORE_INDEX where it states none."""
    from hemcap.parsing import compiled_parser

    parse = compiled_parser(schema).parse
    index = {name: {v: i for i, v in enumerate(schema.values(name))} for name in schema.field_names}
    return torch.tensor([[index[name].get(value, IGNORE_INDEX) for name, value in parse(row["caption"]).items()]
                         for row in rows], dtype=torch.long)
