"""Tracing, shape propagation, probe inputs and module helpers."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convify import graph as G
from convify.errors import TraceError


class SamePool(nn.MaxPool2d):
    def forward(self, x):
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-float("inf")), 2)


def test_tracer_keeps_pool_subclasses_opaque():
    gm = G.trace(nn.Sequential(nn.Conv2d(3, 3, 1), SamePool(2)), (nn.MaxPool2d,))
    ops = [(n.op, str(n.target)) for n in gm.graph.nodes]
    assert ("call_module", "1") in ops
    assert not any("pad" in t for _, t in ops)


def test_trace_error_carries_fx_reason():
    class Bad(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError, match="torch.fx cannot trace Bad: .*"):
        G.trace(Bad())


def test_shape_propagation_records_shapes_and_falls_back_to_real_data():
    class NeedsData(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y * y.abs().max().item()  # .item() cannot run on meta tensors

    gm = G.trace(NeedsData())
    G.propagate_shapes(gm, torch.randn(2, 3, 9, 9))
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    assert G.info(conv).shape == (2, 4, 7, 7) and G.info(conv).device.type == "cpu"


def test_eval_mode_restores_each_flag():
    model = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2)).train()
    model[1].eval()
    with G.eval_mode(model):
        assert not model.training and not model[0].training
    assert model.training and model[0].training and not model[1].training


def test_free_name_and_set_submodule():
    root = nn.Module()
    G.set_submodule(root, "a.b.pool", nn.Identity())
    assert isinstance(root.get_submodule("a.b.pool"), nn.Identity)
    assert G.free_name(root, "a.b.pool") == "a.b.pool@1"
    assert G.free_name(root, "a.b.conv") == "a.b.conv"


def test_scope_names_from_module_stack():
    class Inner(nn.Module):
        def forward(self, x):
            return F.max_pool2d(x, 2)

    gm = G.trace(nn.Sequential(nn.Conv2d(1, 1, 1), Inner()))
    call = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert G.scope_of(call) == "1"


def test_convify_leaf_modules_stay_one_call_when_retraced():
    from convify.head_matmul import MatmulConv2d

    gm = G.trace(nn.Sequential(MatmulConv2d(4, 3, 2), nn.ReLU()))
    assert [n.op for n in gm.graph.nodes][1] == "call_module"
    assert type(gm.get_submodule("0")) is MatmulConv2d


def test_meta_shape_propagation_shortcuts_shape_preserving_modules():
    """On meta tensors, BatchNorm and activations hand their input on (no fallback to a real forward)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)).eval()
    gm = G.trace(model, (nn.MaxPool2d,))
    with torch.no_grad(), G.meta_weights(gm):
        G.ShapeProp(gm, shortcut_shape_preserving=True).run(torch.randn(1, 3, 10, 10, device="meta"))
    assert [G.info(n).shape for n in gm.graph.nodes if n.op == "call_module"] == [
        (1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 4, 4)]
