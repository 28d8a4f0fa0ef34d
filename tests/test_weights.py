"""Pure weight and shape math, checked against PyTorch itself."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from convify.core import weights as W


@pytest.mark.parametrize("k,s,p,d", [t for t in itertools.product([1, 2, 3, 4, 5], [1, 2, 3], [0, 1, 2], [1, 2])
                                     if 2 * t[2] <= t[0]])
def test_ceil_mode_extra_pad_matches_pooling_at_every_length(k, s, p, d):
    for n in range(max(1, d * (k - 1) + 1 - 2 * p), 40):
        x = torch.zeros(1, 1, n)
        out = F.max_pool1d(x, k, s, p, d, ceil_mode=True).shape[-1]
        assert W.pool_output_size(n, k, s, p, d, True) == out
        assert W.conv_output_size(n, k, s, p, d, W.ceil_mode_extra_pad(k, s, p, d)) == out


def test_naive_stride_minus_one_padding_is_wrong():
    # k=2, s=2, p=1 at n=3: the naive extra pad s-1=1 adds a window that starts in the right padding
    n, k, s, p = 3, 2, 2, 1
    out = F.max_pool1d(torch.zeros(1, 1, n), k, s, p, ceil_mode=True).shape[-1]
    assert W.conv_output_size(n, k, s, p, 1, s - 1) != out
    assert W.conv_output_size(n, k, s, p, 1, W.ceil_mode_extra_pad(k, s, p, 1)) == out


@pytest.mark.parametrize("depthwise", [False, True])
def test_average_weight_computes_average_pooling(depthwise):
    x = torch.randn(2, 5, 11, 9, dtype=torch.float64)
    w = W.average_weight(5, (3, 2), depthwise=depthwise, dtype=torch.float64)
    got = F.conv2d(x, w, stride=(2, 1), padding=(1, 0), groups=5 if depthwise else 1)
    want = F.avg_pool2d(x, (3, 2), (2, 1), (1, 0), count_include_pad=True)
    assert torch.allclose(got, want, atol=1e-12)


def test_linear_to_conv_weight_is_exact():
    lin = torch.nn.Linear(4 * 3 * 5, 7).double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    w = W.linear_to_conv_weight(lin.weight, 4, (3, 5))
    got = F.conv2d(x, w, lin.bias).flatten(1)
    assert torch.allclose(got, lin(x.flatten(1)), atol=1e-12)
    with pytest.raises(ValueError, match="60 input features"):
        W.linear_to_conv_weight(lin.weight, 5, (3, 5))


def test_ntuple():
    assert W.ntuple(3, 2) == (3, 3)
    assert W.ntuple([2], 3) == (2, 2, 2)
    with pytest.raises(ValueError, match="expected 2 values"):
        W.ntuple((1, 2, 3), 2)


def test_compose_affine_is_the_chain_of_its_steps():
    fc1, fc2 = torch.nn.Linear(6, 5).double(), torch.nn.Linear(5, 3, bias=False).double()
    scale, shift = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    weight, bias = W.compose_affine([(fc1.weight, fc1.bias), (scale, shift), (fc2.weight, None)])
    assert weight.shape == (3, 6) and bias.shape == (3,)
    assert torch.allclose(x @ weight.T + bias, fc2(fc1(x) * scale + shift), atol=1e-12)
    with pytest.raises(ValueError, match="at least one step"):
        W.compose_affine([])


def test_flattened_head_to_gap_is_exact_on_spatially_constant_maps():
    """The data-free init of the paper's GAP head: the product of the head's
    Linear layers, summed over the positions; exact with identity activations
    on a map that is the same at every position, not on any other map."""
    fc1, fc2, fc3 = (torch.nn.Linear(4 * 3 * 5, 8).double(), torch.nn.Linear(8, 6).double(),
                     torch.nn.Linear(6, 2).double())
    head = lambda fmap: fc3(fc2(fc1(fmap.flatten(1))))
    weight, bias = W.flattened_head_to_gap([(m.weight, m.bias) for m in (fc1, fc2, fc3)], 4, (3, 5))
    assert weight.shape == (2, 4, 1, 1) and weight.dtype == torch.float64
    gap_head = lambda fmap: F.conv2d(fmap, weight, bias).mean((2, 3))
    constant = torch.randn(3, 4, 1, 1, dtype=torch.float64).expand(3, 4, 3, 5)
    with torch.no_grad():
        assert torch.allclose(gap_head(constant), head(constant), atol=1e-12)
        varying = torch.randn(3, 4, 3, 5, dtype=torch.float64)
        assert (gap_head(varying) - head(varying)).abs().max() > 1e-3


@pytest.mark.parametrize("k,s,d", [t for t in itertools.product([1, 2, 3, 5], [1, 2, 3, 4], [1, 2])])
def test_same_padding_matches_timm_and_gives_ceil_size(k, s, d):
    padding = pytest.importorskip("timm.layers.padding")
    for n in range(1, 30):
        total = padding.get_same_padding(n, k, s, d)
        assert W.same_pad_total(n, k, s, d) == total
        assert W.same_padding(n, k, s, d) == (total // 2, total - total // 2)  # the odd one right, as pad_same
        assert W.conv_output_size(n + total, k, s, 0, d) == -(-n // s)
        assert int(W.same_pad_total(torch.tensor(n), k, s, d)) == total  # the legacy exporter's traced sizes
