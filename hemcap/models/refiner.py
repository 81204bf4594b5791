"""The refiner: a second look at chosen attributes, from the attribute heads and the nucleus geometry.

For each refined field, a multinomial logistic regression on the heads' log-probabilities of every
field and ``hemcap.morphometry``'s nucleus geometry (standardised), fitted on the training split
after training (``hemcap refine``, or ``train.refine`` at the end of a run). Its value replaces the
caption's for that field and the caption is the schema's sentence for the result, as under
test-time voting (``hemcap.engine``). Saved beside the weights (``refiner.safetensors``) and
described in ``ModelInfo.refiner``; ``restore`` rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

import torch

REFINER_FILE = "refiner.safetensors"
L2 = 0.5  # scikit-learn's LogisticRegression(C=1): 0.5 |W|^2 beside the summed cross-entropy


class Refiner(torch.nn.Module):
    """Standardised inputs, then one ``Linear(inputs, number of values)`` per refined field."""

    def __init__(self, inputs: int, sizes: dict[str, int]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(inputs))
        self.register_buffer("std", torch.ones(inputs))
        self.linear = torch.nn.ModuleDict({name: torch.nn.Linear(inputs, n) for name, n in sizes.items()})

    def forward(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        scaled = (inputs - self.mean) / self.std
        return {name: layer(scaled) for name, layer in self.linear.items()}


def refiner_inputs(head_logprobs: dict[str, torch.Tensor], geometry: torch.Tensor) -> torch.Tensor:
    """One row per cell: every field's heads log-probabilities (in the heads' order), then the geometry."""
    return torch.cat([*head_logprobs.values(), geometry], dim=1).float()


def fit(inputs: torch.Tensor, labels: dict[str, torch.Tensor], sizes: dict[str, int]) -> Refiner:
    """Fit each field's regression (L-BFGS to convergence, ``L2``); rows labelled -1 are left out."""
    refiner = Refiner(inputs.shape[1], sizes)
    refiner.mean.copy_(inputs.mean(0))
    refiner.std.copy_(inputs.std(0).clamp_min(1e-6))  # a constant input (never an erosion survivor) stays 0
    scaled = (inputs - refiner.mean) / refiner.std
    for name, layer in refiner.linear.items():
        known = labels[name] >= 0
        _fit_one(layer, scaled[known], labels[name][known])
    return refiner.eval()


def _fit_one(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> None:
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=500, tolerance_grad=1e-6,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), y, reduction="sum") + L2 * layer.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def save(refiner: Refiner, folder: str | Path) -> None:
    from safetensors.torch import save_file

    from hemcap.fileio import atomic_path

    with atomic_path(Path(folder) / REFINER_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in refiner.state_dict().items()}, str(tmp))


def restore(folder: str | Path, spec: dict) -> Refiner:
    """The refiner ``spec`` (``ModelInfo.refiner``) describes, with its weights from ``folder``."""
    from safetensors.torch import load_file

    refiner = Refiner(spec["inputs"], spec["fields"])
    refiner.load_state_dict(load_file(Path(folder) / REFINER_FILE))  # strict: a lost refiner is an error
    return refiner.eval()
