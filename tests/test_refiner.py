"""The refiner's regressions: they learn what the inputs say, skip unlabelled rows, and reload exactly."""

import torch

from hemcap.models import refiner


def separable(n=200, seed=0):
    """Two features; the class is which of three thirds feature 0 falls in; feature 1 is noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * torch.tensor([30.0, 1.0]) + torch.tensor([100.0, 0.0])  # far from 0, unscaled
    return x, ((x[:, 0] - 100) // 10).long().clamp(max=2)


def test_fit_learns_a_separable_field_and_skips_unlabelled_rows():
    x, y = separable()
    noisy = y.clone()
    noisy[:50] = -1  # unlabelled: left out, not a class
    fitted = refiner.fit(x, {"nucleus_shape": noisy}, {"nucleus_shape": 3})
    predicted = fitted(x)["nucleus_shape"].argmax(1)
    assert (predicted == y).float().mean() > 0.95


def test_save_and_restore_give_the_same_logits(tmp_path):
    x, y = separable()
    fitted = refiner.fit(x, {"cell_size": y}, {"cell_size": 3})
    refiner.save(fitted, tmp_path)
    again = refiner.restore(tmp_path, {"inputs": 2, "fields": {"cell_size": 3}})
    assert torch.equal(again(x)["cell_size"], fitted(x)["cell_size"])


def test_inputs_are_the_heads_log_probabilities_then_the_geometry():
    heads = {"a": torch.log(torch.tensor([[0.25, 0.75]])), "b": torch.log(torch.tensor([[1.0]]))}
    row = refiner.refiner_inputs(heads, torch.tensor([[3.0, 4.0]]))
    expected = torch.tensor([[torch.tensor(0.25).log(), torch.tensor(0.75).log(), 0.0, 3.0, 4.0]])
    assert torch.allclose(row, expected)
