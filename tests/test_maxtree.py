"""convify.core.maxtree: the exact max tree's weights, without a graph."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convify.core.maxtree import TreeForm, depthwise_chain, grouped_weight, max_tree, pairwise_max_levels, relu_levels


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


@pytest.mark.parametrize("form", [TreeForm.DIRECT, TreeForm.SEPARABLE])
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


def run_chain(chains, x, channels):
    z = x
    for _, chain in chains:
        t = None
        for step in chain:
            u = F.conv2d(z, grouped_weight(step.weight, channels), None, step.stride, step.padding, step.dilation,
                         channels)
            t = u if t is None else u + t
            t = t.relu() if step.relu else t
        z = t
    return z


@pytest.mark.parametrize("kernel,stride,dilation", [((3, 2), (2, 1), (1, 2)), ((4, 1), (1, 3), (2, 1)),
                                                    ((1, 1), (2, 2), (1, 1)), ((5, 3), (1, 1), (1, 1))])
def test_depthwise_chains_pool_any_sign(kernel, stride, dilation):
    x = torch.randn(2, 3, 13, 12, dtype=torch.float64) * 10
    chains = depthwise_chain(kernel, stride, dilation)
    assert all(step.weight.shape[:2] == (1, 1) for _, chain in chains for step in chain)  # depthwise
    assert [(axis, len(chain)) for axis, chain in chains] == (
        [(a, kernel[a]) for a in reversed(range(2)) if kernel[a] > 1] or [(1, 1)])
    want = F.max_pool2d(x, kernel, stride, 0, dilation)
    assert torch.allclose(run_chain(chains, x, 3), want, rtol=0, atol=1e-12)


def test_depthwise_chain_with_zeros_inside_needs_a_non_negative_input():
    """A test that can fail: zero padding is exact on inputs >= 0 only."""
    x = -torch.rand(1, 2, 8, 8, dtype=torch.float64) - 1
    chains = depthwise_chain((3, 3), (2, 2), (1, 1), padding=(1, 1))
    assert torch.allclose(run_chain(chains, x.abs(), 2), F.max_pool2d(x.abs(), 3, 2, 1), atol=1e-12)
    assert not torch.allclose(run_chain(chains, x, 2), F.max_pool2d(x, 3, 2, 1), atol=1e-3)


def test_max_tree_sends_the_depthwise_form_to_its_chain():
    with pytest.raises(ValueError, match="depthwise_chain"):
        max_tree((3, 3), (2, 2), (1, 1), signed=True, form=TreeForm.CHAIN)
