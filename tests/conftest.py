"""Shared test helpers: non-degenerate random weights and relative errors.

torchvision models built with ``weights=None`` can be nearly constant in their
input (googlenet's truncated-normal init with its BatchNorms is), and then an
equivalence test proves nothing. ``reinit`` gives every model Kaiming weights
and random BatchNorm statistics; ``assert_input_dependent`` checks it worked.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

torch.set_num_threads(int(os.environ.get("CONVIFY_TEST_THREADS", "2")))



def reinit(model: nn.Module, seed: int = 0) -> nn.Module:
    """Kaiming weights, small random biases and random BatchNorm statistics, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``, the tolerance measure of the issues."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_input_dependent(outputs: torch.Tensor, min_ratio: float = 1e-3) -> None:
    """Outputs for different inputs must differ, or comparing them proves nothing."""
    spread = (outputs - outputs.mean(0, keepdim=True)).abs().max()
    scale = outputs.abs().max().clamp_min(1e-30)
    assert spread / scale > min_ratio, f"outputs barely depend on the input (spread/scale = {spread / scale:.2e})"


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, so that what it draws
    (inputs, default initializations, shuffles) is the same on every run,
    alone or in the suite. The subprocesses the tests start seed themselves:
    the CLI (``--init kaiming``, its random inputs), the demo, the examples and
    the torchrun worker."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
