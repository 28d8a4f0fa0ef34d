"""convify.core.maxtree: the exact max tree's weights, without a graph."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convify.core.maxtree import TreeForm, grouped_weight, max_tree, pairwise_max_levels, relu_levels


def run(levels, v):
    for a in levels[:-1]:
        v = (a @ v).relu()
    return levels[-1] @ v


@pytest.mark.parametrize("n", range(1, 12))
@pytest.mark.parametrize("signed", [True, False])
def test_levels_compute_the_max(n, signed):
    v = torch.randn(n, 500, dtype=torch.float64)
    v = v if signed else v.abs()
    levels = pairwise_max_levels(n, signed)
    assert len(levels) - 1 == relu_levels(n)
    assert torch.allclose(run(levels, v)[0], v.max(0).values, rtol=0, atol=1e-14)


def test_unsigned_levels_are_wrong_on_negative_values():
    """A test that can fail: one channel per carried value needs inputs >= 0."""
    v = torch.tensor([[-3.0], [-1.0], [-2.0]], dtype=torch.float64)
    assert run(pairwise_max_levels(3, signed=False), v)[0] != -1.0


@pytest.mark.parametrize("form", list(TreeForm))
def test_trees_are_grouped_convolutions_that_pool(form):
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    layers = max_tree((3, 2), (2, 1), (1, 2), signed=True, form=form)
    y = x
    for layer in layers:
        y = F.conv2d(y, grouped_weight(layer.weight, 3), None, layer.stride, layer.padding, layer.dilation, 3)
        y = y.relu() if layer.relu else y
    assert not layers[-1].relu and torch.allclose(y, F.max_pool2d(x, (3, 2), (2, 1), 0, (1, 2)), atol=1e-13)


def test_zero_padding_needs_a_non_negative_input():
    with pytest.raises(ValueError, match="non-negative input only"):
        max_tree((3, 3), (2, 2), (1, 1), signed=True, form=TreeForm.DIRECT, padding=(1, 1))
